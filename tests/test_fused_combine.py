"""The fused combine: a small round's combine barrier and gather in one launch (a2a.ops.combine).

The first program to start does the barrier program's work and opens a gate; the others wait for
it, then every program gathers; the last resets the arrival and gate words. It runs only where
every rank's grid fits on the GPU at once (`configs.fused_combine_max_tokens`), since all of its
programs spin; `A2A_FUSED_COMBINE=0` turns it off. Results must not change, and a gate left open
would let the next combine read before its peers are ready, so the words must be zero after
every round."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import a2a
from a2a.layout import RoundState
from a2a.ops import configs
from a2a.ops import launch as launch_module
from a2a.ops.context import resolve_context
from tests.conftest import requires_cuda
from tests.support.rounds import FunctionalRound, run_and_check, world_for
from tests.support.strategies import RoundCase


@pytest.mark.parametrize("resident, tiles, ep_size", [(1056, 4, 8), (2112, 4, 8), (1056, 1, 8), (528, 4, 64),
                                                      (100_000, 1, 2), (64, 7, 4)])  # fmt: skip
def test_the_capacity_rule_keeps_every_spinning_program_resident(resident, tiles, ep_size):
    """The largest fused round leaves room, on one GPU holding `resident` programs, for every rank
    of two instances with its grid and its other waiting programs; one token more would not fit
    (unless the small-round cap is what stopped it)."""
    most = configs.fused_combine_max_tokens(resident, tiles, ep_size)
    spinning = lambda tokens: configs.FUSED_COMBINE_INSTANCES * ep_size * (tokens * tiles + configs.OTHER_WAITING_PROGRAMS)  # noqa: E731
    assert most <= configs.SMALL_ROUND_TOKENS
    if most >= 1:
        assert spinning(most) <= resident
    if most < configs.SMALL_ROUND_TOKENS:
        assert spinning(max(most, 0) + 1) > resident


CASE = RoundCase(ep_size=4, num_tokens=(3, 0, 11, 2), top_k=4, num_experts=12, routing="random",
                 payload_specs=((torch.bfloat16, 96), (torch.int32, 4)), runtime_max_tokens=11, max_num_tokens=16,
                 hidden=96, combine_dtype=torch.bfloat16, seed=3)  # fmt: skip


def _combine_words(run: FunctionalRound, rank: int) -> list[int]:
    """(arrivals, gate) of a rank's round state, after its stream is done."""
    context = resolve_context(run.workspace, run.metainfo, rank)
    return context.round_words(RoundState.COMBINE_ARRIVALS, 2).cpu().tolist()


@pytest.mark.parametrize("allowed", ["1", "0"])
@pytest.mark.parametrize("in_workspace", [False, True])
def test_rounds_fused_and_apart_are_exact_and_leave_the_gate_closed(device, monkeypatch, allowed, in_workspace):
    """Rounds on one workspace whose token counts cross the fused limit both ways (ranks of one
    round on either side of it), staged or in-workspace combine: each exact against the reference
    (poisoned outputs, guard bytes), the fused launch used exactly where the plan's limit allows
    (on the CPU every small round; on a GPU at least the smallest rounds here), and every rank's
    arrival and gate words zero after every round."""
    monkeypatch.setenv("A2A_FUSED_COMBINE", allowed)
    launches = []  # (rank's token rows, fused?) of every gather launch
    original_call = launch_module.BoundLaunch.__call__

    def recording_call(self, grid, *values):
        name = self.launch.kernel.fn.__name__
        if name in ("_combine_kernel", "_fused_combine_kernel"):
            launches.append((grid[0], name == "_fused_combine_kernel"))
        return original_call(self, grid, *values)

    monkeypatch.setattr(launch_module.BoundLaunch, "__call__", recording_call)
    small = 6  # a small-round limit that keeps the interpreted rounds short; plans read it when built
    monkeypatch.setattr(configs, "SMALL_ROUND_TOKENS", small)
    rounds = [(3, 0, 11, 2), (1, 1, 1, 1), (small + 1, 3, 0, small), (0, 0, 0, 0), (small, small + 4, 5, 2)]
    run = FunctionalRound.create(dataclasses.replace(CASE, runtime_max_tokens=small + 5), device)
    for seed, counts in enumerate(rounds):
        case = dataclasses.replace(CASE, num_tokens=counts, runtime_max_tokens=small + 5, seed=seed)
        run_and_check(case, device, in_workspace, run)
        for rank in range(CASE.ep_size):
            assert _combine_words(run, rank) == [0, 0], (seed, rank)
    limits = {resolve_context(run.workspace, run.metainfo, r).plans[key].fused_max_tokens
              for r in range(CASE.ep_size) for key in resolve_context(run.workspace, run.metainfo, r).plans
              if key[0] == "combine"}  # fmt: skip
    assert len(launches) == len(rounds) * CASE.ep_size
    if allowed == "0":
        assert limits == {-1} and not any(fused for _, fused in launches)
        return
    assert len(limits) == 1, limits  # every rank's plan on one GPU computes the same limit
    limit = limits.pop()
    if device == "cpu":
        assert limit == small
    assert limit >= 1, limit  # a 1-token round of 4 ranks fits on any GPU (here: up to `small` tokens)
    assert [fused for _, fused in launches] == [rows <= limit for rows, _ in launches], (limit, launches)


@requires_cuda
def test_a_captured_round_launches_apart_and_replays_exactly(monkeypatch):
    """Eager small rounds fuse; the same round captured in a CUDA graph launches the barrier and the
    gather apart (in a graph the two finish sooner), and its replay matches the eager round."""
    monkeypatch.setenv("A2A_FUSED_COMBINE", "1")
    ep, top_k, experts_n, hidden, rt = 4, 3, 12, 128, 8
    world = world_for(ep, "cuda")
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(ep, r), rt, top_k, experts_n, hidden_size=hidden, world=world)
             for r in range(ep)]  # fmt: skip
    generator = torch.Generator().manual_seed(11)
    counts = [5, 0, 8, 1]
    experts = [torch.rand(n, experts_n, generator=generator).topk(top_k, dim=1).indices.to(torch.int32).cuda()
               for n in counts]  # fmt: skip
    hiddens = [torch.randn(n, hidden, generator=generator).to(torch.bfloat16).cuda() for n in counts]
    planes = [torch.randn(ep, rt, hidden, generator=generator).to(torch.bfloat16).cuda() for _ in counts]
    fused = []
    original_call = launch_module.BoundLaunch.__call__

    def recording_call(self, grid, *values):
        name = self.launch.kernel.fn.__name__
        if name in ("_combine_kernel", "_fused_combine_kernel"):
            fused.append(name == "_fused_combine_kernel")
        return original_call(self, grid, *values)

    monkeypatch.setattr(launch_module.BoundLaunch, "__call__", recording_call)

    def round_():
        for moe, e, h in zip(ranks, experts, hiddens):
            moe.dispatch(e, [h], rt)
        outs = []
        for r, moe in enumerate(ranks):
            plane = moe.get_combine_payload_tensor_in_workspace(rt, hidden, torch.bfloat16)
            with world.stream(r).activate():
                plane.copy_(planes[r])  # stands in for the rank's experts
            outs.append(moe.combine(plane, rt, payload_in_workspace=True))
        world.join_into_caller()
        return outs

    eager = [o.clone() for o in round_()]
    torch.cuda.synchronize()
    assert fused == [True] * ep
    graph = torch.cuda.CUDAGraph()
    capture_stream = torch.cuda.Stream()
    with torch.cuda.stream(capture_stream):
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=capture_stream):
            outs = round_()
    assert fused == [True] * ep + [False] * ep
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for r in range(ep):
            assert torch.equal(outs[r].view(torch.int16), eager[r].view(torch.int16)), r
