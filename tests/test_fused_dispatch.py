"""The fused dispatch: a round of one routing block routed and copied in one launch (a2a.ops.dispatch).

Every program routes the whole block on registers and keeps its token's entries; each waits for the
previous round's gathers itself before it stores into a peer; the last program of the election
records what a program could not see (the trouble words) as the rank's fault, writes the counters
and runs the dispatch barrier. It runs only where every rank's grid fits on the GPU at once
(`configs.fused_dispatch_max_tokens`) and top_k <= 8; `A2A_FUSED_DISPATCH=0` turns it off. Its
outputs (rows, counters, top-k entries, invalid count) must equal the two-launch path's bit for
bit, and a wait it could not finish must end as a fault on every rank with no row sent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import a2a
from a2a.layout import RoundState
from a2a.ops import configs
from a2a.ops import launch as launch_module
from a2a.ops.context import resolve_context
from a2a.runtime.protocol import FLAG_EPOCH_MASK, PHASE_NAMES, Phase
from tests.support.process_rounds import HIDDEN, NUM_EXPERTS, TOP_K, RoundInputs
from tests.support.rounds import FunctionalRound, run_and_check
from tests.support.strategies import RoundCase

DISPATCH_KERNELS = ("_route_kernel", "_fused_dispatch_kernel")


@pytest.mark.parametrize("resident, tiles, ep_size", [(660, 2, 8), (1056, 4, 8), (100_000, 1, 2), (528, 4, 64),
                                                      (64, 7, 4)])  # fmt: skip
def test_the_capacity_rule_keeps_every_spinning_program_resident(resident, tiles, ep_size):
    """As the fused combine's rule (every program of every rank of two instances may spin at once),
    capped at one routing block."""
    most = configs.fused_dispatch_max_tokens(resident, tiles, ep_size)
    spinning = lambda tokens: configs.FUSED_COMBINE_INSTANCES * ep_size * (tokens * tiles + configs.OTHER_WAITING_PROGRAMS)  # noqa: E731
    block = configs.FUSED_DISPATCH_BLOCKS[-1]
    assert most <= block
    if most >= 1:
        assert spinning(most) <= resident
    if most < block:
        assert spinning(max(most, 0) + 1) > resident


def test_each_round_gets_the_smallest_block_that_holds_it():
    assert [configs.fused_dispatch_block(n) for n in (0, 1, 16, 17, 64)] == [16, 16, 16, 64, 64]
    with pytest.raises(StopIteration):
        configs.fused_dispatch_block(65)


CASE = RoundCase(ep_size=4, num_tokens=(3, 0, 4, 2), top_k=4, num_experts=12, routing="random",
                 payload_specs=((torch.bfloat16, 96), (torch.int32, 4), (torch.uint8, 3)), runtime_max_tokens=7,
                 max_num_tokens=8, hidden=96, combine_dtype=torch.bfloat16, seed=3)  # fmt: skip


def _recording(monkeypatch) -> list[tuple[int, str]]:
    """(token rows, kernel) of every routing or fused-dispatch launch from now on."""
    launches = []
    original_call = launch_module.BoundLaunch.__call__

    def recording_call(self, grid, *values):
        name = self.launch.kernel.fn.__name__
        if name in DISPATCH_KERNELS:  # the token rows: route(grid, experts, count, rows, blocks), fused(grid, sources, experts, count, rows)
            launches.append((values[2] if name == "_route_kernel" else values[3], name))
        return original_call(self, grid, *values)

    monkeypatch.setattr(launch_module.BoundLaunch, "__call__", recording_call)
    return launches


@pytest.mark.parametrize("allowed", ["1", "0"])
def test_rounds_fused_and_apart_are_exact_and_leave_no_trouble(device, monkeypatch, allowed):
    """Rounds on one workspace whose token counts cross both fused blocks and the fused limit (blocks
    of 2 and 4 tokens here, so interpreted rounds stay short), ranks of one round on either side,
    ids out of range and repeated owners drawn by the case: every round exact against the reference
    (rows, send and receive counters, top-k entries, invalid count, guard bytes, combine), the fused
    launch used exactly up to the plan's limit and with the smallest block that holds the round, and
    every rank's trouble words zero after every round."""
    monkeypatch.setenv("A2A_FUSED_DISPATCH", allowed)
    monkeypatch.setattr(configs, "FUSED_DISPATCH_BLOCKS", (2, 4))  # plans read these when built
    monkeypatch.setattr(configs, "INTERPRETED_FUSED_DISPATCH_TOKENS", 4)
    launches = _recording(monkeypatch)
    rounds = [(3, 0, 4, 2), (1, 1, 1, 1), (5, 2, 0, 7), (0, 0, 0, 0), (4, 6, 2, 3), (2, 2, 2, 2)]
    run = FunctionalRound.create(CASE, device)
    for seed, counts in enumerate(rounds):
        case = dataclasses.replace(CASE, num_tokens=counts, seed=seed, routing="random" if seed % 2 else "with_invalid")
        run_and_check(case, device, seed % 2 == 0, run)
        for rank in range(CASE.ep_size):
            context = resolve_context(run.workspace, run.metainfo, rank)
            assert context.round_words(RoundState.ORDERING_TROUBLE, 4).cpu().tolist() == [0, 0, 0, 0], (seed, rank)
    limits = {context.plans[key].fused_max_tokens
              for context in (resolve_context(run.workspace, run.metainfo, r) for r in range(CASE.ep_size))
              for key in context.plans if key[0] == "dispatch"}  # fmt: skip
    assert len(launches) == len(rounds) * CASE.ep_size
    if allowed == "0":
        assert limits == {-1} and {name for _, name in launches} == {"_route_kernel"}
        return
    assert len(limits) == 1, limits  # every rank's plan on one GPU computes the same limit
    limit = limits.pop()
    if device == "cpu":
        assert limit == 4
    assert limit >= 1, limit  # a 1-token round of 4 ranks fits on any GPU
    expected = [(rows, "_fused_dispatch_kernel" if rows <= limit else "_route_kernel") for rows, _ in launches]
    assert launches == expected, (limit, launches)
    assert {rows for rows, name in launches if name == "_fused_dispatch_kernel"} >= {0, 1, 2}


def test_a_wide_top_k_keeps_two_launches(device, monkeypatch):
    """top_k 9 (K_PAD 16) is wider than the fused copy's one store per tile: routing and copy launch apart."""
    launches = _recording(monkeypatch)
    case = dataclasses.replace(CASE, top_k=9, num_experts=24, num_tokens=(2, 1, 0, 3))
    run_and_check(case, device)
    assert {name for _, name in launches} == {"_route_kernel"}


def test_a_previous_gather_that_never_ends_fails_every_rank_and_sends_nothing(device, monkeypatch):
    """Rank 0 sees rank 1's gather flag of the last round as never raised (written back to the
    round before's value): its dispatch must time out in its wait for the previous gathers naming
    rank 1, store no row into rank 1 (which sends none itself this round), and leave no trouble
    words; rank 1 then sees rank 0's poison. On the GPU every program of the fused launch times out
    on its own and its last program records the fault; on the CPU the host waits."""
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", "1")
    launches = _recording(monkeypatch)
    world = a2a.SimulatedWorld(2, device)
    moes = [a2a.MoeAlltoAll(a2a.Mapping(2, r), 8, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN, world=world)
            for r in range(2)]  # fmt: skip
    inputs = RoundInputs.draw([4, 3], 4, seed=5)
    for rank, moe in enumerate(moes):  # one healthy round
        moe.dispatch(inputs.experts[rank].to(world.device), inputs.payloads(rank, world.device), 4)
    for moe in moes:
        moe.combine(torch.ones(2, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 4)
    world.synchronize()
    zero = moes[0]._rank_workspace
    layout = zero.layout
    flag = zero.own(layout.gather_flags_offset + 4 * 1, 1)
    flag.copy_((flag - 1) & FLAG_EPOCH_MASK)  # rank 1's gather of the last round, as rank 0 sees it
    payload_region = slice(layout.payload_offset, moes[1].workspace.shape[1])
    before = moes[1].workspace[1, payload_region].cpu().clone()
    second = RoundInputs.draw([4, 0], 4, seed=6)
    errors = {}
    for rank, moe in enumerate(moes):
        try:
            moe.dispatch(second.experts[rank].to(world.device), second.payloads(rank, world.device), 4)
            moe.synchronize()
        except a2a.A2AFaultError as error:
            errors[rank] = error
    world.synchronize()
    for rank, moe in enumerate(moes):
        if rank not in errors:
            with pytest.raises(a2a.A2AFaultError) as info:
                moe.synchronize()
            errors[rank] = info.value
    assert isinstance(errors[0], a2a.A2ATimeoutError), errors[0]
    assert errors[0].missing_ranks == (1,) and errors[0].what == PHASE_NAMES[Phase.ORDERING], errors[0]
    assert isinstance(errors[1], a2a.A2APeerFailedError) and 0 in errors[1].failed_ranks, errors[1]
    assert torch.equal(moes[1].workspace[1, payload_region].cpu(), before), "rank 0 sent rows without the ordering"
    assert zero.round_words(RoundState.ORDERING_TROUBLE, 4).cpu().tolist() == [0, 0, 0, 0]
    assert {name for _, name in launches} == {"_fused_dispatch_kernel"}
    for moe in moes:
        moe._reset_workspace()
