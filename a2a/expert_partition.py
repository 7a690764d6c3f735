"""Which rank owns which expert: contiguous ownership, the first `num_experts % ep_size` ranks one more."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPartition:
    """Rank `r < remainder` owns `base + 1` experts, the others `base`; ranges are contiguous."""

    num_experts: int
    ep_size: int

    @property
    def base(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def remainder(self) -> int:
        return self.num_experts % self.ep_size

    def experts_of(self, rank: int) -> range:
        start = rank * self.base + min(rank, self.remainder)
        return range(start, start + self.base + (1 if rank < self.remainder else 0))

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Owner rank of each id; -1 where the id is outside [0, num_experts)."""
        ids = expert_ids.to(torch.int64)
        valid = (ids >= 0) & (ids < self.num_experts)
        safe = torch.where(valid, ids, torch.zeros_like(ids))
        split = self.remainder * (self.base + 1)
        big = safe // (self.base + 1)
        small = self.remainder + (safe - split) // max(self.base, 1)
        owner = torch.where(safe < split, big, small)
        return torch.where(valid, owner, torch.full_like(owner, -1)).to(torch.int32)
