"""Hypothesis strategies for a2a rounds: routings, shapes, dtypes, rank counts.

A drawn `RoundCase` is everything one round needs on every rank; tensors are built on the CPU with
a seeded generator and moved to the test's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from a2a.layout import MAX_TOP_K
from tests.support import round_inputs

PAYLOAD_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.int32,
    torch.uint8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
COMBINE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ROUTINGS = list(round_inputs.ROUTINGS)


@dataclass(frozen=True)
class RoundCase:
    ep_size: int
    num_tokens: tuple[int, ...]  # per rank
    top_k: int
    num_experts: int
    routing: str
    payload_specs: tuple[tuple[torch.dtype, int], ...]  # (dtype, width) per payload
    runtime_max_tokens: int
    max_num_tokens: int
    hidden: int
    combine_dtype: torch.dtype
    seed: int

    def experts(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return [round_inputs.expert_ids(n, self.top_k, self.num_experts, generator, routing=self.routing, rank=rank,
                                        ep_size=self.ep_size) for rank, n in enumerate(self.num_tokens)]  # fmt: skip

    def payloads(self) -> list[list[torch.Tensor]]:
        """Random bytes reinterpreted as each dtype (NaN patterns included: compared as bytes)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        return [[round_inputs.payload_bytes(n, dtype, width, generator) for dtype, width in self.payload_specs]
                for n in self.num_tokens]  # fmt: skip

    def expert_outputs(self, valid_rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per rank `[ep, rt, hidden]` of combine_dtype; stale rows are NaN so reading one shows."""
        generator = torch.Generator().manual_seed(self.seed + 2)
        return [round_inputs.expert_outputs(self.ep_size, self.runtime_max_tokens, self.hidden, generator,
                                            self.combine_dtype, stale=~valid) for valid in valid_rows]  # fmt: skip


@st.composite
def round_cases(draw, max_ranks: int = 8, max_tokens: int = 12, max_payloads: int = 4) -> RoundCase:
    ep_size = draw(st.integers(1, max_ranks))
    num_experts = draw(st.integers(ep_size, max(ep_size, 4) * 4))
    top_k = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 13, MAX_TOP_K]))
    counts = draw(st.lists(st.integers(0, max_tokens), min_size=ep_size, max_size=ep_size))
    if draw(st.booleans()) and ep_size > 1:
        counts[draw(st.integers(0, ep_size - 1))] = 0  # a zero-token rank
    runtime_max_tokens = max(max(counts), 1) + draw(st.integers(0, 3))
    max_num_tokens = runtime_max_tokens + draw(st.integers(0, 5))
    num_payloads = draw(st.integers(1, max_payloads))
    payload_specs = tuple(
        (draw(st.sampled_from(PAYLOAD_DTYPES)), draw(st.integers(1, 40))) for _ in range(num_payloads)
    )
    return RoundCase(
        ep_size=ep_size,
        num_tokens=tuple(counts),
        top_k=top_k,
        num_experts=num_experts,
        routing=draw(st.sampled_from(ROUTINGS)),
        payload_specs=payload_specs,
        runtime_max_tokens=runtime_max_tokens,
        max_num_tokens=max_num_tokens,
        hidden=draw(st.integers(1, 48)),
        combine_dtype=draw(st.sampled_from(COMBINE_DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
