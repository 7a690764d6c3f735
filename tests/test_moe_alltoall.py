"""The `MoeAlltoAll` class: rounds in a row, shared workspaces, in-workspace combine, the phase machine."""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a import reference
from a2a.expert_partition import ExpertPartition
from examples import toy_moe
from tests.support.rounds import as_bytes, world_for

HIDDEN, TOP_K, NUM_EXPERTS = 24, 3, 10  # 10 experts over 4 ranks: ranks 0-1 own 3, ranks 2-3 own 2


def make_ranks(device: str, ep_size: int = 4, max_num_tokens: int = 9, top_k: int = TOP_K):
    world = world_for(ep_size, device)
    return world, [
        a2a.MoeAlltoAll(a2a.Mapping(ep_size, r), max_num_tokens, top_k, NUM_EXPERTS, hidden_size=HIDDEN, world=world)
        for r in range(ep_size)
    ]


def draw_round(counts, seed, top_k=TOP_K):
    generator = torch.Generator().manual_seed(seed)
    experts = [torch.randint(0, NUM_EXPERTS, (n, top_k), generator=generator, dtype=torch.int32) for n in counts]
    hiddens = [torch.randn(n, HIDDEN, generator=generator).to(torch.bfloat16) for n in counts]
    weights = [torch.rand(n, top_k, generator=generator) for n in counts]
    return experts, hiddens, weights


def run_moe_round(world, ranks, counts, rt, seed, in_workspace):
    """dispatch (+sanitize) -> toy experts -> combine on every rank; returns outputs and inputs."""
    experts, hiddens, weights = draw_round(counts, seed, ranks[0].top_k)
    dev = world.device
    recv = [
        ranks[r].dispatch(experts[r].to(dev), [hiddens[r].to(dev), experts[r].to(dev), weights[r].to(dev)], rt,
                          invalid_token_expert_id=-1, expert_id_payload_index=1)
        for r in range(len(ranks))
    ]  # fmt: skip
    world.synchronize()
    partition = ExpertPartition(NUM_EXPERTS, len(ranks))
    payloads = []
    for r, moe in enumerate(ranks):
        out = toy_moe.toy_moe_rank(*recv[r], partition.experts_of(r), NUM_EXPERTS, torch.bfloat16)
        if in_workspace:
            plane = moe.get_combine_payload_tensor_in_workspace(rt, HIDDEN, torch.bfloat16)
            plane.copy_(out)
            out = plane
        payloads.append(out)
    outputs = [moe.combine(payloads[r], rt, payload_in_workspace=in_workspace) for r, moe in enumerate(ranks)]
    world.synchronize()
    expected = reference.dispatch(experts, [[h, e, w] for h, e, w in zip(hiddens, experts, weights)], NUM_EXPERTS, rt)
    want = reference.combine([p.cpu() for p in payloads], expected.routing, counts)
    for r in range(len(ranks)):
        assert torch.equal(as_bytes(outputs[r].cpu()), as_bytes(want[r])), f"rank {r}"
        dense = toy_moe.toy_moe_dense(hiddens[r], experts[r], weights[r], NUM_EXPERTS)
        torch.testing.assert_close(outputs[r].cpu().float(), dense, rtol=2e-2, atol=2e-2)
    return recv


def test_rounds_in_a_row_with_changing_counts(device):
    world, ranks = make_ranks(device)
    plans = [([5, 0, 9, 2], 9), ([1, 1, 1, 1], 1), ([0, 0, 0, 3], 4), ([7, 8, 0, 6], 8), ([9, 9, 9, 9], 9)]
    for round_index, (counts, rt) in enumerate(plans):
        run_moe_round(world, ranks, counts, rt, seed=round_index, in_workspace=round_index % 2 == 0)


def test_two_instances_share_one_workspace_and_alternate(device):
    """One instance per "layer", same geometry: one workspace, rounds strictly alternate."""
    world, layer_a = make_ranks(device)
    _, layer_b = make_ranks(device)
    assert layer_a[0].workspace.data_ptr() == layer_b[0].workspace.data_ptr()
    for round_index in range(3):
        run_moe_round(world, layer_a, [3, 4, 0, 5], 5, seed=10 + round_index, in_workspace=True)
        run_moe_round(world, layer_b, [6, 1, 2, 0], 6, seed=20 + round_index, in_workspace=False)


def test_zero_tokens_everywhere(device):
    world, ranks = make_ranks(device)
    recv = run_moe_round(world, ranks, [0, 0, 0, 0], 1, seed=3, in_workspace=False)
    for r in range(4):
        assert (recv[r][1].cpu() == -1).all()  # every receive row is stale, so sanitized


def test_single_rank_needs_no_world():
    moe = a2a.MoeAlltoAll(a2a.Mapping(1, 0), 4, 2, 3, hidden_size=8)
    device = moe.workspace.device
    experts = torch.tensor([[0, 2], [1, 1], [2, 0]], dtype=torch.int32, device=device)
    x = torch.arange(24, dtype=torch.float32, device=device).view(3, 8)
    (recv,) = moe.dispatch(experts, [x], 3)
    moe.world.synchronize()
    assert torch.equal(recv[0], x)  # one rank: every token lands at its own index
    out = moe.combine(recv.clone(), 3)
    moe.world.synchronize()
    assert torch.equal(out, x)  # one unique target per token: the sum is the row itself
    assert moe.num_invalid_expert_ids() == 0


def test_num_invalid_expert_ids_counts_skipped_pairs(device):
    world, ranks = make_ranks(device)
    dev = world.device
    counts = [2, 1, 0, 1]
    bad = [
        torch.tensor([[0, -1, 99], [1, 2, 3]], dtype=torch.int32),
        torch.tensor([[-5, -5, 4]], dtype=torch.int32),
        torch.zeros(0, 3, dtype=torch.int32),
        torch.tensor([[NUM_EXPERTS, 0, 1]], dtype=torch.int32),
    ]
    for r, moe in enumerate(ranks):
        moe.dispatch(bad[r].to(dev), [torch.ones(counts[r], HIDDEN, device=dev)], 2)
    world.synchronize()
    assert [moe.num_invalid_expert_ids() for moe in ranks] == [2, 2, 0, 1]
    for moe in ranks:
        moe.combine(torch.zeros(4, 2, HIDDEN, device=dev), 2)
    world.synchronize()


def test_phase_machine(device):
    world, ranks = make_ranks(device, ep_size=1)
    moe = ranks[0]
    dev = world.device
    with pytest.raises(a2a.PhaseError, match="needs a successful dispatch"):
        moe.combine(torch.zeros(1, 1, HIDDEN, device=dev), 1)
    with pytest.raises(RuntimeError, match="needs a successful dispatch"):
        moe.get_combine_payload_tensor_in_workspace(1, HIDDEN, torch.bfloat16)
    experts = torch.zeros(1, TOP_K, dtype=torch.int32, device=dev)
    moe.dispatch(experts, [torch.ones(1, HIDDEN, device=dev)], 1)
    with pytest.raises(a2a.PhaseError, match="dispatch called twice without combine"):
        moe.dispatch(experts, [torch.ones(1, HIDDEN, device=dev)], 1)
    with pytest.raises(ValueError, match="must equal the dispatch's"):
        moe.combine(torch.zeros(1, 2, HIDDEN, device=dev), 2)
    moe.combine(torch.zeros(1, 1, HIDDEN, device=dev), 1)
    world.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the caching allocator's cross-stream reuse is CUDA's")
def test_inputs_the_caller_frees_at_once_are_not_reused_before_the_rank_stream_reads_them():
    """MoeAlltoAll on a simulated world runs on the rank's stream: the caller's temporaries (payloads
    freed right after the call) must not go back to the caller stream's pool while the rank's
    kernels still read them. Rank streams held ~1 ms; the caller then fills fresh tensors that would
    take the freed blocks. Before the inputs were recorded on the rank stream, rows arrived as -7."""
    ep, tokens, hidden = 2, 64, 256
    world = a2a.SimulatedWorld(ep, "cuda")
    moes = [a2a.MoeAlltoAll(a2a.Mapping(ep, r), tokens, 1, ep, hidden_size=hidden, world=world) for r in range(ep)]
    plane = torch.zeros(ep, tokens, hidden, dtype=torch.bfloat16, device="cuda")
    for held in (False, True):  # the first round loads the kernels (which waits for the device)
        if held:
            for r in range(ep):
                with world.stream(r).activate():
                    torch.cuda._sleep(2_000_000)
        recv = [moes[r].dispatch(torch.zeros(tokens, 1, dtype=torch.int32, device="cuda"),
                                 [torch.full((tokens, hidden), r + 1.0, dtype=torch.bfloat16, device="cuda")], tokens)
                for r in range(ep)]  # fmt: skip
        overwrite = [torch.full((tokens, hidden), -7.0, dtype=torch.bfloat16, device="cuda") for _ in range(4 * ep)]
        world.synchronize()
        for source in range(ep):
            assert bool((recv[0][0][source].float().cpu() == source + 1.0).all()), f"rows from rank {source}"
        del overwrite, recv
        for moe in moes:
            moe.combine(plane, tokens)
        world.synchronize()
