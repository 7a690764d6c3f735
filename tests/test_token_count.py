"""A token count read on the device: padding rows are never sent, combine returns zeros for them,
and one CUDA graph serves every count (new inputs and new counts each replay)."""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a import reference
from tests.conftest import requires_cuda
from tests.support.rounds import as_bytes

EP, TOP_K, EXPERTS, HIDDEN, ROWS = 3, 3, 7, 48, 12  # 7 experts on 3 ranks: uneven ownership


def _build(device: str):
    world = a2a.SimulatedWorld(EP, device)
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(EP, r), ROWS, TOP_K, EXPERTS, hidden_size=HIDDEN, world=world)
             for r in range(EP)]  # fmt: skip
    buffers = [
        (torch.zeros(ROWS, TOP_K, dtype=torch.int32, device=device), torch.zeros(ROWS, HIDDEN, dtype=torch.bfloat16, device=device),
         torch.zeros(EP, ROWS, HIDDEN, dtype=torch.bfloat16, device=device), torch.zeros(1, dtype=torch.int32, device=device))
        for _ in range(EP)
    ]  # fmt: skip
    return world, ranks, buffers


def _fill(buffers, counts: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for (experts, hidden, plane, count), n in zip(buffers, counts):
        ids = torch.rand(ROWS, EXPERTS, generator=generator).topk(TOP_K, dim=1).indices.to(torch.int32)
        ids[n:] = 5 if seed % 2 else -1  # padding rows: valid-looking ids must not be sent either
        experts.copy_(ids)
        hidden.copy_(torch.randn(ROWS, HIDDEN, generator=generator).to(torch.bfloat16))
        plane.copy_(torch.randn(EP, ROWS, HIDDEN, generator=generator).to(torch.bfloat16))
        count.fill_(n)


def _round(world, ranks, buffers):
    recv = [moe.dispatch(e, [h, e], ROWS, invalid_token_expert_id=-1, expert_id_payload_index=1, token_count=c)
            for moe, (e, h, _, c) in zip(ranks, buffers)]  # fmt: skip
    outs = []
    for r, moe in enumerate(ranks):
        combine_plane = moe.get_combine_payload_tensor_in_workspace(ROWS, HIDDEN, torch.bfloat16)
        with world.stream(r).activate():
            combine_plane.copy_(buffers[r][2])  # stands in for the rank's experts
        outs.append(moe.combine(combine_plane, ROWS, payload_in_workspace=True))
    return recv, outs


def _check(recv, outs, buffers, counts: list[int]) -> None:
    experts = [e.cpu()[:n] for (e, _, _, _), n in zip(buffers, counts)]
    payloads = [[h.cpu()[:n], e] for (_, h, _, _), e, n in zip(buffers, experts, counts)]
    expected = reference.dispatch(experts, payloads, EXPERTS, ROWS)
    combined = reference.combine([p.cpu() for _, _, p, _ in buffers], expected.routing, counts)
    for r in range(EP):
        valid = expected.valid_rows(r)
        assert torch.equal(as_bytes(recv[r][0].cpu()[valid]), as_bytes(expected.recv_payloads[r][0][valid])), r
        assert torch.equal(recv[r][1].cpu(), reference.sanitize(expected.recv_payloads[r][1], expected.recv_counts[r], -1)), r
        out = outs[r].cpu()
        assert out.shape == (ROWS, HIDDEN)
        assert torch.equal(as_bytes(out[: counts[r]]), as_bytes(combined[r])), (r, counts)
        assert not out[counts[r] :].any(), f"padding rows of rank {r} must be zero"


@pytest.mark.parametrize("counts", [[12, 0, 5], [1, 12, 0], [0, 0, 0]])
def test_only_the_counted_rows_are_tokens(device, counts):
    world, ranks, buffers = _build(device)
    _fill(buffers, counts, seed=len(counts) + sum(counts))
    recv, outs = _round(world, ranks, buffers)
    world.synchronize()
    _check(recv, outs, buffers, counts)


def test_token_count_is_checked(device):
    world, ranks, buffers = _build(device)
    experts, hidden, _, count = buffers[0]
    with pytest.raises(TypeError, match="token_count must be int32"):
        ranks[0].dispatch(experts, [hidden], ROWS, token_count=count.long())
    with pytest.raises(ValueError, match=r"token_count must have shape \[1\]"):
        ranks[0].dispatch(experts, [hidden], ROWS, token_count=torch.zeros(2, dtype=torch.int32, device=device))


def test_token_count_shape_is_checked_after_a_round_with_the_same_signature(device):
    """A plan found by call signature must not admit a [2] count where a [1] count built it (the
    key once dropped the count tensor's only dimension as if it were the row count)."""
    world, ranks, buffers = _build(device)
    _fill(buffers, [3, 1, 0], seed=5)
    _round(world, ranks, buffers)
    world.synchronize()
    experts, hidden, _, count = buffers[0]
    with pytest.raises(ValueError, match=r"token_count must have shape \[1\]"):
        ranks[0].dispatch(experts, [hidden, experts], ROWS, invalid_token_expert_id=-1, expert_id_payload_index=1,
                          token_count=torch.zeros(2, dtype=torch.int32, device=count.device))  # fmt: skip


def capture_round(world, ranks, buffers):
    """Warm up eagerly (every variant compiled and loaded), then capture one round into a graph."""
    _fill(buffers, [ROWS] * EP, seed=0)
    _round(world, ranks, buffers)
    world.join_into_caller()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            recv, outs = _round(world, ranks, buffers)
            world.join_into_caller()
    torch.cuda.synchronize()
    return graph, recv, outs


@requires_cuda
def test_one_graph_replays_with_new_counts_and_inputs():
    world, ranks, buffers = _build("cuda")
    graph, recv, outs = capture_round(world, ranks, buffers)
    generator = torch.Generator().manual_seed(1)
    for seed in range(1, 21):
        counts = torch.randint(0, ROWS + 1, (EP,), generator=generator).tolist()
        _fill(buffers, counts, seed)
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        _check(recv, outs, buffers, counts)
