"""A peer library next to a2a in `bench.run`: any module with FlashInfer's functional MoE
all-to-all API, driven on the same inputs, one stream per simulated rank, results checked.

    python -m bench.run ... --baseline flashinfer.comm      # an installed FlashInfer
    source .fi/setup.sh && python -m bench.run ... --baseline fi_functional   # ../shared/fi-baseline

The module must expose FlashInfer 0.7's `moe_a2a_get_workspace_size_per_rank(ep_size,
max_num_tokens, total_dispatch_payload_size_per_token, combine_payload_size_per_token)`,
`moe_a2a_initialize(workspace, ep_rank, ep_size, max_num_tokens)`, `moe_a2a_dispatch(...)` (three
return values), `moe_a2a_combine(...)` and `moe_a2a_wrap_payload_tensor_in_workspace(...)`
(a2a itself does, which is how the CPU tests drive this class).

Checked the same way as a2a, allowing for FlashInfer's receive order (its slots come from atomics,
so rows arrive in any order): every source's received rows, as a set, equal the reference's; the
combine runs with identity experts (each rank's combine plane = its received hidden rows), so
every output row must equal its token times the number of distinct ranks its top-k reached.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from a2a import reference

# FlashInfer's combine spins in every CTA: on ONE GPU the ranks' combines only all make progress
# while every rank's CTAs are resident at once, about ep_size * tokens <= 264 on an H100 / H200
# (../shared/fi-baseline/fi_functional.py); a larger simulated combine hangs until its trap.
MAX_CONCURRENT_COMBINE_ROWS = 256


def load(name: str | None) -> ModuleType | None:
    """The baseline module `name`; None for "none". Default (None): `flashinfer.comm` if it imports."""
    if name == "none":
        return None
    if name is None:
        try:
            return importlib.import_module("flashinfer.comm")
        except ImportError:
            return None
    return importlib.import_module(name)


class FunctionalBaseline:
    """One configuration's round through `module`'s functional API: the same experts and payloads
    as a2a's round, its own workspace (one `[ep_size, size]` tensor: every rank's segment on this
    device)."""

    def __init__(self, module: ModuleType, world, experts: list[torch.Tensor], payloads: list[list[torch.Tensor]],
                 tokens: int, hidden: int, num_experts: int):  # fmt: skip
        self.module, self.world = module, world
        self.experts, self.payloads = experts, payloads
        self.ep_size, self.tokens, self.hidden = world.ep_size, tokens, hidden
        self.top_k, self.num_experts = experts[0].shape[1], num_experts
        dispatch_bytes = sum(p.shape[1] * p.element_size() for p in payloads[0])
        size = module.moe_a2a_get_workspace_size_per_rank(self.ep_size, tokens, dispatch_bytes, 2 * hidden)
        self.workspace = torch.zeros(self.ep_size, size, dtype=torch.uint8, device=world.device)
        self.metainfo = [module.moe_a2a_initialize(self.workspace, r, self.ep_size, tokens) for r in range(self.ep_size)]
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        self.recv: list[list[torch.Tensor]] = [[] for _ in range(self.ep_size)]
        self.offsets = [0] * self.ep_size

    @property
    def combine_runs_concurrently(self) -> bool:
        """Whether every rank's combine can run at once on one device (see MAX_CONCURRENT_COMBINE_ROWS)."""
        return self.world.device.type != "cuda" or self.ep_size * self.tokens <= MAX_CONCURRENT_COMBINE_ROWS

    def dispatch(self) -> None:
        for r in range(self.ep_size):
            # Fork the rank stream from the caller's, as a2a's own ops do: a capture that never
            # forked into the rank streams is invalidated when it joins them (seen on an H200).
            self.world.wait_for_caller(r)
            with self.world.stream(r).activate():
                recv, offset, _ = self.module.moe_a2a_dispatch(
                    self.experts[r], self.payloads[r], self.workspace, self.metainfo[r], self.tokens, r, self.ep_size,
                    self.top_k, self.num_experts)  # fmt: skip
            self.recv[r], self.offsets[r] = list(recv), offset

    def planes(self) -> list[torch.Tensor]:
        """Each rank's combine plane in the workspace (after a dispatch: its offset is that round's)."""
        row_bytes = self.ep_size * self.tokens * 2 * self.hidden
        return [self.module.moe_a2a_wrap_payload_tensor_in_workspace(
                    self.workspace[r], [self.ep_size, self.tokens], self.offsets[r], self.offsets[r] + row_bytes,
                    torch.bfloat16) for r in range(self.ep_size)]  # fmt: skip

    def fill_planes(self) -> list[torch.Tensor]:
        """Identity experts: each rank's combine plane = its received hidden rows (payload 0)."""
        planes = self.planes()
        for r, plane in enumerate(planes):
            self.world.wait_for_caller(r)
            with self.world.stream(r).activate():
                plane.copy_(self.recv[r][0])
        return planes

    def combine(self, planes: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for r in range(self.ep_size):
            self.world.wait_for_caller(r)
            with self.world.stream(r).activate():
                outputs.append(self.module.moe_a2a_combine(
                    planes[r], self.tokens, self.workspace, self.metainfo[r], self.tokens, r, self.ep_size, self.top_k,
                    self.offsets[r], payload_in_workspace=True))  # fmt: skip
        return outputs

    def check(self) -> None:
        """One eager round: received rows per source as sets, then (where it can run) the combine."""
        self.dispatch()
        self.world.synchronize()
        experts = [e.cpu() for e in self.experts]
        expected = reference.dispatch(experts, [[p.cpu() for p in ps] for ps in self.payloads], self.num_experts,
                                      self.tokens)  # fmt: skip
        for r in range(self.ep_size):
            counts = expected.recv_counts[r]
            for p, (got, want) in enumerate(zip(self.recv[r], expected.recv_payloads[r])):
                for source in range(self.ep_size):
                    n = int(counts[source])
                    if _row_set(got.cpu()[source, :n]) != _row_set(want[source, :n]):
                        raise AssertionError(f"baseline dispatch: payload {p} from rank {source} on rank {r} differs")
        if not self.combine_runs_concurrently:
            return
        outputs = self.combine(self.fill_planes())
        self.world.synchronize()
        for r, out in enumerate(outputs):
            reached = (expected.routing[r].topk_target_ranks >= 0).sum(dim=1)  # distinct ranks (repeats are -1)
            want = (self.payloads[r][0].cpu().float() * reached[:, None].float()).to(torch.bfloat16)
            if not torch.equal(out.cpu().view(torch.uint8), want.view(torch.uint8)):
                raise AssertionError(f"baseline combine (identity experts) differs on rank {r}")


def _row_set(rows: torch.Tensor) -> list[tuple[int, int]]:
    """A sorted fingerprint of a `[n, W]` tensor's rows, each by two weighted byte sums."""
    if rows.shape[0] == 0:  # a source that sent this rank nothing (a 1-token round)
        return []
    data = rows.contiguous().view(torch.uint8).reshape(rows.shape[0], -1).to(torch.int64)
    positions = torch.arange(data.shape[1], dtype=torch.int64)
    first = (data * (positions * 2654435761 % 1000003 + 1)).sum(dim=1)
    second = (data * (positions * 40503 % 65521 + 7)).sum(dim=1)
    return sorted(zip(first.tolist(), second.tolist()))
