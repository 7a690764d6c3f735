"""Property tests: whole rounds (dispatch -> sanitize -> combine) through the Triton kernels against
the pure-torch reference, on drawn routings, shapes, dtypes and rank counts."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a2a
from a2a import reference
from a2a.layout import ROUTE_BLOCK_TOKENS
from a2a.ops import launch as launch_module
from tests.conftest import HAS_CUDA
from tests.support.rounds import FunctionalRound, run_and_check
from tests.support.strategies import RoundCase, round_cases

# In CI (no CUDA) these three tests put 220 drawn rounds through the interpreted kernels. On a GPU
# machine nearly every drawn shape is a new kernel variant to compile (seconds each), so fewer.
EXAMPLES = {"round": 140, "sanitize": 40, "repeat": 40} if not HAS_CUDA else {"round": 40, "sanitize": 12, "repeat": 12}


@settings(max_examples=EXAMPLES["round"])
@given(case=round_cases(), in_workspace=st.booleans())
def test_round_matches_reference(device, case, in_workspace):
    run_and_check(case, device, in_workspace)


@settings(max_examples=EXAMPLES["sanitize"])
@given(case=round_cases(max_payloads=1), invalid_id=st.sampled_from([-1, -3, 2**31 - 1]))
def test_sanitize_marks_exactly_the_stale_rows(device, case, invalid_id):
    case = dataclasses.replace(case, payload_specs=((torch.int32, case.top_k),))
    run = FunctionalRound.create(case, device)
    run.poison()
    experts = case.experts()
    # The expert ids themselves are the payload: that is the plane sanitize is meant for.
    recv, _ = run.dispatch([e.to(device) for e in experts], [[e.to(device)] for e in experts])
    expected = reference.dispatch(experts, [[e] for e in experts], case.num_experts, case.runtime_max_tokens)
    for rank in range(case.ep_size):
        with run.world.stream(rank).activate():
            a2a.moe_a2a_sanitize_expert_ids(recv[rank][0], run.workspace, run.metainfo, rank, invalid_id)
    run.world.synchronize()
    for rank in range(case.ep_size):
        want = reference.sanitize(expected.recv_payloads[rank][0], expected.recv_counts[rank], invalid_id)
        assert torch.equal(recv[rank][0].cpu(), want), f"rank {rank}"


@settings(max_examples=EXAMPLES["repeat"])
@given(first=round_cases(max_ranks=4, max_payloads=2), second_seed=st.integers(0, 2**31 - 1))
def test_back_to_back_rounds_reuse_the_workspace(device, first, second_seed):
    """Two rounds on one workspace: flags, counters and slots of round 1 must not leak into round 2."""
    run = FunctionalRound.create(first, device)
    generator = torch.Generator().manual_seed(second_seed)
    counts = tuple(int(c) for c in torch.randint(0, first.runtime_max_tokens + 1, (first.ep_size,), generator=generator))
    second = dataclasses.replace(first, num_tokens=counts, seed=second_seed)
    for case in (first, second):
        run_and_check(case, device, run=run)


def test_rounds_across_the_single_block_boundary_reuse_one_plan(device):
    """One workspace, one rt, token counts crossing routing's single-block limit both ways: a plan
    built for one block must route a multi-block round with the multi-block variant (the
    single-block one would give every block offset zero: wrong slots), and back."""
    limit = ROUTE_BLOCK_TOKENS
    rt = 3 * limit
    first = RoundCase(ep_size=3, num_tokens=(5, 2, 0), top_k=4, num_experts=9, routing="random",
                      payload_specs=((torch.bfloat16, 8), (torch.int32, 4)), runtime_max_tokens=rt,
                      max_num_tokens=rt, hidden=8, combine_dtype=torch.bfloat16, seed=0)  # fmt: skip
    run = FunctionalRound.create(first, device)
    for seed, counts in enumerate([(5, 2, 0), (5, limit + 66, 0), (limit, limit + 1, rt), (rt, 1, limit), (2, 3, 1)]):
        run_and_check(dataclasses.replace(first, num_tokens=counts, seed=seed), device, run=run)


def test_small_and_large_rounds_gather_with_their_own_tiles(device, monkeypatch):
    """A combine plan binds the gather's small-round and larger-round configs (here forced apart:
    16 columns per program and 32) and picks by the call's token count: rounds crossing
    SMALL_ROUND_TOKENS both ways on one workspace, each exact. On the CPU a small round's gate and
    gather are one fused launch (with the small-round tile) up to GATHER_COMPARE_MAX_TOKENS; on
    CUDA whether it fuses depends on the GPU's capacity, so only the tile is checked there."""
    from a2a.ops import configs

    small = configs.SMALL_ROUND_TOKENS
    chosen = []

    def forced(hidden, element_bytes, top_k, ep_size, small_rounds=False):
        chosen.append(small_rounds)
        return configs.TileConfig(16, 1) if small_rounds else configs.TileConfig(32, 2)

    monkeypatch.setattr(configs, "combine_config", forced)
    gather_tiles = []  # the column tiles of every gather launch (40 columns: 3 of 16, or 2 of 32)
    fused = []  # whether each gather launch was the fused one
    original_call = launch_module.BoundLaunch.__call__

    def recording_call(self, grid, *values):
        if self.launch.kernel.fn.__name__ in ("_combine_kernel", "_fused_combine_kernel"):
            gather_tiles.append(grid[1])
            fused.append(self.launch.kernel.fn.__name__ == "_fused_combine_kernel")
        return original_call(self, grid, *values)

    monkeypatch.setattr(launch_module.BoundLaunch, "__call__", recording_call)
    rt = small + 40
    first = RoundCase(ep_size=2, num_tokens=(3, 0), top_k=3, num_experts=5, routing="random",
                      payload_specs=((torch.bfloat16, 8),), runtime_max_tokens=rt, max_num_tokens=rt, hidden=40,
                      combine_dtype=torch.bfloat16, seed=0)  # fmt: skip
    run = FunctionalRound.create(first, device)
    rounds = [(3, 0), (small + 1, 7), (rt, small), (small, small + 2), (1, 2)]
    for seed, counts in enumerate(rounds):
        run_and_check(dataclasses.replace(first, num_tokens=counts, seed=seed), device, run=run)
    assert set(chosen) == {True, False}
    assert gather_tiles == [2 if n > small else 3 for counts in rounds for n in counts]
    if device == "cpu":  # every small round whose gather compares the signatures, as the fused one does
        fused_limit = min(small, configs.GATHER_COMPARE_MAX_TOKENS)
        assert fused == [n <= fused_limit for counts in rounds for n in counts]
