"""Programmatic dependent launch (PDL): on sm_90 and later every a2a kernel is launched so it may
start while the previous kernel on its stream finishes, and waits for it (griddepcontrol.wait)
before any load or store; `A2A_PDL=0` or `enable_pdl=False` turns it off. Results must not change.

That every kernel waits for its predecessor is checked on its sm_90 code (tests/test_gpu_compile.py);
the rest of the GPU suite runs with PDL on, as engines get it by default."""

from __future__ import annotations

import pytest
import torch

from a2a import envs
from a2a.ops.context import resolve_context
from a2a.ops.launch import BoundLaunch, use_pdl
from tests.conftest import requires_cuda
from tests.support.rounds import FunctionalRound, run_and_check
from tests.support.strategies import RoundCase


@pytest.mark.parametrize("name, allowed", [("A2A_PDL", envs.pdl_allowed),
                                           ("A2A_FUSED_COMBINE", envs.fused_combine_allowed),
                                           ("A2A_FUSED_DISPATCH", envs.fused_dispatch_allowed)])  # fmt: skip
def test_each_launch_switch_is_read_and_checked(monkeypatch, name, allowed):
    """The on/off launch switches (PDL, the fused combine, the fused dispatch): on by default, 0
    turns it off, anything but 0 or 1 is refused naming the variable."""
    monkeypatch.delenv(name, raising=False)
    assert allowed()
    monkeypatch.setenv(name, "0")
    assert not allowed()
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1"):
        allowed()


def test_pdl_is_never_used_where_it_cannot_or_must_not_be(monkeypatch):
    monkeypatch.setenv("A2A_PDL", "1")
    assert not use_pdl(torch.device("cpu"), True)  # the CPU path never uses it
    assert not use_pdl(torch.device("cuda", 0), False)  # FlashInfer's enable_pdl=False, before any CUDA call


def _bound_launches(plan: object) -> list[BoundLaunch]:
    found = []
    for value in vars(plan).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            for inner in item if isinstance(item, tuple) else [item]:
                if isinstance(inner, BoundLaunch):
                    found.append(inner)
    return found


CASE = RoundCase(ep_size=4, num_tokens=(9, 0, 33, 2), top_k=4, num_experts=12, routing="random",
                 payload_specs=((torch.bfloat16, 96), (torch.int32, 4)), runtime_max_tokens=33, max_num_tokens=40,
                 hidden=96, combine_dtype=torch.bfloat16, seed=3)  # fmt: skip


@requires_cuda
@pytest.mark.parametrize("allowed", ["1", "0"])
@pytest.mark.parametrize("in_workspace", [False, True])
def test_rounds_are_exact_with_and_without_pdl(monkeypatch, allowed, in_workspace):
    """Three rounds in a row on one workspace (staged or in-workspace combine): each exact against
    the reference, every plan's launches with PDL exactly when it is allowed and the GPU has it."""
    monkeypatch.setenv("A2A_PDL", allowed)
    run = FunctionalRound.create(CASE, "cuda")
    for seed in range(3):
        run_and_check(RoundCase(**{**vars(CASE), "seed": seed}), "cuda", in_workspace, run)
    expected = allowed == "1" and torch.cuda.get_device_capability() >= (9, 0)
    for rank in range(CASE.ep_size):
        plans = resolve_context(run.workspace, run.metainfo, rank).plans.values()
        launches = [launch for plan in plans for launch in _bound_launches(plan)]
        assert len(launches) >= 4, launches  # routing (two variants), copy, barrier, gather(s)
        for launch in launches:
            assert launch.launch.constexprs["PDL"] is expected, launch.launch.kernel
            if launch.fast:  # the compiled launcher's own flag, what cuLaunchKernelEx gets
                assert bool(launch._head[2]) is expected, launch.launch.kernel


@requires_cuda
@pytest.mark.parametrize("allowed", ["1", "0"])
def test_the_class_path_sanitizes_with_the_same_launch_mode(monkeypatch, allowed):
    """MoeAlltoAll's dispatch with a sanitized expert-id payload: the sanitize launch uses PDL
    exactly when the rest does, and the sanitized plane equals the reference's."""
    from a2a import reference
    import a2a

    monkeypatch.setenv("A2A_PDL", allowed)
    ep, top_k, experts_n, hidden, rt = 4, 3, 10, 64, 8
    world = a2a.SimulatedWorld(ep, "cuda")
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(ep, r), rt, top_k, experts_n, hidden_size=hidden, world=world)
             for r in range(ep)]  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    counts = [int(n) for n in torch.randint(0, rt + 1, (ep,), generator=generator)]
    experts = [torch.rand(n, experts_n, generator=generator).topk(top_k, dim=1).indices.to(torch.int32) for n in counts]
    hiddens = [torch.randn(n, hidden, generator=generator).to(torch.bfloat16) for n in counts]
    recv = [moe.dispatch(e.cuda(), [h.cuda(), e.cuda()], rt, invalid_token_expert_id=-1, expert_id_payload_index=1)
            for moe, e, h in zip(ranks, experts, hiddens)]  # fmt: skip
    world.synchronize()
    expected = reference.dispatch(experts, [[h, e] for h, e in zip(hiddens, experts)], experts_n, rt)
    for r in range(ep):
        want = reference.sanitize(expected.recv_payloads[r][1], expected.recv_counts[r], -1)
        assert torch.equal(recv[r][1].cpu(), want), r
    expected_pdl = allowed == "1" and torch.cuda.get_device_capability() >= (9, 0)
    for moe in ranks:
        sanitizes = [plan for plan in moe._context.plans.values()
                     if isinstance(plan, BoundLaunch) and plan.launch.kernel.__name__ == "_sanitize_kernel"]  # fmt: skip
        assert len(sanitizes) == 1 and sanitizes[0].launch.constexprs["PDL"] is expected_pdl
        plane = moe.get_combine_payload_tensor_in_workspace(rt, hidden, torch.bfloat16)
        with world.stream(moe.ep_rank).activate():
            plane.zero_()
        moe.combine(plane, rt, payload_in_workspace=True)
    world.synchronize()
