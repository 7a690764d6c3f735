"""Active-rank mask: inactive ranks are neither sent to nor waited for (they run nothing), their
top-k entries become -1, combine sums the rest, sanitize treats their rows as empty."""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a import reference
from tests.support.rounds import as_bytes

EP, TOP_K, EXPERTS, HIDDEN, RT = 4, 3, 10, 40, 6


def _inputs(seed: int, inactive: set[int]):
    generator = torch.Generator().manual_seed(seed)
    counts = [0 if r in inactive else int(n) for r, n in enumerate(torch.randint(1, RT + 1, (EP,), generator=generator))]
    experts = [torch.rand(n, EXPERTS, generator=generator).topk(TOP_K, dim=1).indices.to(torch.int32) for n in counts]
    hiddens = [torch.randn(n, HIDDEN, generator=generator).to(torch.bfloat16) for n in counts]
    outputs = [torch.randn(EP, RT, HIDDEN, generator=generator).to(torch.bfloat16) for _ in range(EP)]
    return counts, experts, hiddens, outputs


def _round(world, ranks, seed: int, inactive: set[int]) -> None:
    """One round among the active ranks, checked against the reference."""
    active = [r for r in range(EP) if r not in inactive]
    counts, experts, hiddens, outputs = _inputs(seed, inactive)
    device = world.device
    for r in active:
        ranks[r].set_active_ranks(active if inactive else None)
    recv = {r: ranks[r].dispatch(experts[r].to(device), [hiddens[r].to(device), experts[r].to(device)], RT,
                                 invalid_token_expert_id=-1, expert_id_payload_index=1) for r in active}  # fmt: skip
    world.synchronize()
    expected = reference.dispatch(experts, [[h, e] for h, e in zip(hiddens, experts)], EXPERTS, RT, active)
    for r in active:
        route = expected.routing[r]
        if counts[r]:
            sent_to_inactive = torch.isin(route.topk_target_ranks, torch.tensor(sorted(inactive) or [-2]))
            assert not sent_to_inactive.any()
        valid = expected.valid_rows(r)
        assert not valid[sorted(inactive)].any() if inactive else True
        assert torch.equal(as_bytes(recv[r][0].cpu()[valid]), as_bytes(expected.recv_payloads[r][0][valid])), (seed, r)
        sanitized = reference.sanitize(expected.recv_payloads[r][1], expected.recv_counts[r], -1)
        assert torch.equal(recv[r][1].cpu(), sanitized), f"sanitized ids of rank {r} (stale rows of inactive sources?)"
    combined = {}
    for r in active:
        plane = ranks[r].get_combine_payload_tensor_in_workspace(RT, HIDDEN, torch.bfloat16)
        with world.stream(r).activate():
            plane.copy_(outputs[r].to(device))
        combined[r] = ranks[r].combine(plane, RT, payload_in_workspace=True)
    world.synchronize()
    want = reference.combine(outputs, expected.routing, counts)
    for r in active:
        assert torch.equal(as_bytes(combined[r].cpu()), as_bytes(want[r])), (seed, r)


def test_rounds_with_an_inactive_rank_after_full_rounds(device):
    world = a2a.SimulatedWorld(EP, device)
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(EP, r), RT, TOP_K, EXPERTS, hidden_size=HIDDEN, world=world) for r in range(EP)]
    _round(world, ranks, 0, set())  # leaves recv counters of every source behind
    _round(world, ranks, 1, {2})  # rank 2 "failed": runs nothing from here on
    _round(world, ranks, 2, {2, 0})
    for moe in ranks:
        moe._reset_workspace()


def test_active_rank_mask_is_checked(device):
    world = a2a.SimulatedWorld(2, device)
    moe = a2a.MoeAlltoAll(a2a.Mapping(2, 0), RT, TOP_K, EXPERTS, hidden_size=HIDDEN, world=world)
    with pytest.raises(ValueError, match="must include this rank"):
        moe.set_active_ranks([1])
    with pytest.raises(ValueError, match="active rank must be in"):
        moe.set_active_ranks([0, 2])
    experts = torch.zeros(1, TOP_K, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"active_rank_mask must only set bits 0..1"):
        a2a.moe_a2a_dispatch(experts, [experts], moe.workspace, moe.metainfo, RT, 0, 2, TOP_K, EXPERTS,
                             active_rank_mask=0b101)  # fmt: skip
    with pytest.raises(TypeError, match="active_rank_mask must be an int"):
        a2a.moe_a2a_dispatch(experts, [experts], moe.workspace, moe.metainfo, RT, 0, 2, TOP_K, EXPERTS,
                             active_rank_mask=[0, 1])  # fmt: skip
    moe._reset_workspace()


def test_a_rank_left_out_cannot_come_back_on_the_same_workspace(device):
    world = a2a.SimulatedWorld(EP, device)
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(EP, r), RT, TOP_K, EXPERTS, hidden_size=HIDDEN, world=world) for r in range(EP)]
    _round(world, ranks, 0, {2})
    counts, experts, hiddens, _ = _inputs(3, set())
    for r in (0, 1, 3):
        ranks[r].set_active_ranks(None)
        with pytest.raises(ValueError, match=r"brings back rank\(s\) \[2\], which sat out an earlier round"):
            ranks[r].dispatch(experts[r].to(world.device), [hiddens[r].to(world.device)], RT)
    for moe in ranks:
        moe._reset_workspace()


@pytest.mark.parametrize("schedule", range(12))
def test_a_rank_made_inactive_finishes_its_last_gather_before_peers_write(device, schedule):
    """Rank 2 takes part in round 0 and is then left out; rounds 1 (ranks 0, 1) put their rows where
    round 0's combine plane was (rt 2 -> 16). Rank 2's round-0 gather must still read round 0's
    rows: the next dispatch waits for the ranks of the previous round, not of the next one.
    Nothing is synchronised in between; rank 2 is slowed down (CPU: scheduler seed; CUDA: sleep)."""
    ep, hidden, small, big = 3, 48, 2, 16
    if device == "cpu":
        world = a2a.SimulatedWorld(ep, device, schedule_seed=schedule)
    else:
        world = a2a.SimulatedWorld(ep, device)
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(ep, r), big, 2, 6, hidden_size=hidden, world=world) for r in range(ep)]
    generator = torch.Generator().manual_seed(schedule)
    experts = [torch.randint(0, 6, (small, 2), generator=generator, dtype=torch.int32) for _ in range(ep)]
    hiddens = [torch.randn(small, hidden, generator=generator).to(torch.bfloat16) for _ in range(ep)]
    planes_in = [torch.randn(ep, small, hidden, generator=generator).to(torch.bfloat16) for _ in range(ep)]
    for r in range(ep):
        ranks[r].dispatch(experts[r].to(world.device), [hiddens[r].to(world.device)], small)
    outputs = []
    for r in range(ep):
        plane = ranks[r].get_combine_payload_tensor_in_workspace(small, hidden, torch.bfloat16)
        stream = world.stream(r)
        if device == "cpu":
            stream.submit(lambda plane=plane, r=r: plane.copy_(planes_in[r]))
        else:
            with stream.activate():
                if r == 2:
                    torch.cuda._sleep(2_000_000)  # ~1 ms: rank 2's gather comes late
                plane.copy_(planes_in[r].to(world.device))
        outputs.append(ranks[r].combine(plane, small, payload_in_workspace=True))
    big_experts = [torch.randint(0, 4, (big, 2), generator=generator, dtype=torch.int32) for _ in range(2)]
    big_hiddens = [torch.randn(big, hidden, generator=generator).to(torch.bfloat16) for _ in range(2)]
    for r in (0, 1):  # round 1 without rank 2 (experts 0..3 live on ranks 0 and 1)
        ranks[r].set_active_ranks([0, 1])
        ranks[r].dispatch(big_experts[r].to(world.device), [big_hiddens[r].to(world.device)], big)
    world.synchronize()
    expected = reference.dispatch(experts, [[h] for h in hiddens], 6, small)
    want = reference.combine(planes_in, expected.routing, [small] * ep)
    for r in range(ep):
        assert torch.equal(as_bytes(outputs[r].cpu()), as_bytes(want[r])), f"round 0 output of rank {r}"
    for moe in ranks:
        moe._reset_workspace()
