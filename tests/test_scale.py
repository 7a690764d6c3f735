"""Larger worlds: the rank limit, realistic shapes on the GPU, bitwise reproducibility."""

from __future__ import annotations

import dataclasses

import torch

from a2a.runtime.simulated import MAX_SIMULATED_CUDA_RANKS
from tests.conftest import requires_cuda
from tests.support.rounds import as_bytes, run_and_check
from tests.support.strategies import RoundCase


def test_the_rank_limit(device):
    """64 ranks (a2a's limit) on the CPU; 31 on one GPU (the simulated world's limit there)."""
    ep_size = 64 if device == "cpu" else MAX_SIMULATED_CUDA_RANKS
    counts = tuple((r * 7) % 4 for r in range(ep_size))
    case = RoundCase(
        ep_size=ep_size, num_tokens=counts, top_k=4, num_experts=130, routing="random",
        payload_specs=((torch.bfloat16, 8), (torch.int32, 4)), runtime_max_tokens=3, max_num_tokens=3,
        hidden=8, combine_dtype=torch.bfloat16, seed=64,
    )  # fmt: skip
    run_and_check(case, device)


@requires_cuda
def test_deepseek_like_round_on_the_gpu():
    """8 ranks x up to 512 tokens, hidden 7168, top-8 of 256 experts, fp8 + scales + ids + weights:
    thousands of programs of 8 ranks in flight on one GPU at once."""
    counts = (512, 0, 1, 300, 512, 77, 256, 129)
    case = RoundCase(
        ep_size=8, num_tokens=counts, top_k=8, num_experts=256, routing="distinct",
        payload_specs=((torch.float8_e4m3fn, 7168), (torch.float32, 56), (torch.int32, 8), (torch.float32, 8)),
        runtime_max_tokens=512, max_num_tokens=1024, hidden=7168, combine_dtype=torch.bfloat16, seed=7,
    )  # fmt: skip
    run_and_check(case, "cuda", in_workspace=True)
    run_and_check(dataclasses.replace(case, seed=8), "cuda", in_workspace=False)


@requires_cuda
def test_two_runs_are_bitwise_identical():
    counts = (300, 200, 0, 256)
    case = RoundCase(
        ep_size=4, num_tokens=counts, top_k=6, num_experts=64, routing="skewed",
        payload_specs=((torch.bfloat16, 2880), (torch.int32, 6)), runtime_max_tokens=300, max_num_tokens=300,
        hidden=2880, combine_dtype=torch.bfloat16, seed=11,
    )  # fmt: skip
    first_recv, first_out = run_and_check(case, "cuda")
    first = [[as_bytes(p.cpu()).clone() for p in ps] for ps in first_recv], [as_bytes(o.cpu()) for o in first_out]
    second_recv, second_out = run_and_check(case, "cuda")
    for rank in range(case.ep_size):
        assert torch.equal(first[1][rank], as_bytes(second_out[rank].cpu()))
        for p, plane in enumerate(second_recv[rank]):
            # Poisoned before each run: equal planes mean equal valid rows and equally untouched stale rows.
            assert torch.equal(first[0][rank][p], as_bytes(plane.cpu())), (rank, p)
