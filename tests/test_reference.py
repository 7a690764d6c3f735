"""The reference itself: the worked example, the expert partition, the toy MoE identity."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from a2a import reference
from a2a.expert_partition import ExpertPartition
from examples import toy_moe


def test_worked_example_with_deterministic_slots():
    # ep=2, 8 experts (4 per rank), top_k=2. t0 -> (1, 6) -> ranks (0, 1); t1 -> (2, 3) -> (0, 0).
    route = reference.route_rank(torch.tensor([[1, 6], [2, 3]], dtype=torch.int32), 8, 2)
    assert route.topk_target_ranks.tolist() == [[0, 1], [0, -1]]
    assert route.topk_send_indices.tolist() == [[0, 0], [1, -1]]  # source order at every target
    assert route.send_counts.tolist() == [2, 1]


def test_invalid_ids_are_skipped_and_counted():
    route = reference.route_rank(torch.tensor([[-1, 3], [8, 9], [5, -2]], dtype=torch.int32), 8, 2)
    assert route.topk_target_ranks.tolist() == [[-1, 0], [-1, -1], [1, -1]]
    assert route.num_invalid == 4
    assert route.send_counts.tolist() == [1, 1]


@given(num_experts=st.integers(1, 300), ep_size=st.integers(1, 64))
def test_partition_gives_each_rank_a_contiguous_range(num_experts, ep_size):
    if num_experts < ep_size:
        return
    partition = ExpertPartition(num_experts, ep_size)
    owners = partition.owner(torch.arange(-2, num_experts + 2))
    assert owners[:2].tolist() == [-1, -1] and owners[-2:].tolist() == [-1, -1]
    for rank in range(ep_size):
        owned = partition.experts_of(rank)
        assert (owners[2:-2][owned.start : owned.stop] == rank).all()
        assert len(owned) in (num_experts // ep_size, num_experts // ep_size + 1)


def test_toy_moe_over_ranks_equals_the_dense_moe():
    generator = torch.Generator().manual_seed(0)
    ep, experts_total, top_k, hidden = 3, 7, 3, 5
    counts = [4, 0, 6]
    experts = [torch.randint(0, experts_total, (n, top_k), generator=generator, dtype=torch.int32) for n in counts]
    hiddens = [torch.randn(n, hidden, generator=generator) for n in counts]
    weights = [torch.rand(n, top_k, generator=generator) for n in counts]
    rt = max(counts)
    expected = reference.dispatch(experts, [[h, e, w] for h, e, w in zip(hiddens, experts, weights)], experts_total, rt)
    partition = ExpertPartition(experts_total, ep)
    outputs = []
    for rank in range(ep):
        x, ids, w = expected.recv_payloads[rank]
        ids = reference.sanitize(ids, expected.recv_counts[rank], -1)
        outputs.append(toy_moe.toy_moe_rank(x, ids, w, partition.experts_of(rank), experts_total, torch.float32))
    combined = reference.combine(outputs, expected.routing, counts)
    for rank in range(ep):
        dense = toy_moe.toy_moe_dense(hiddens[rank], experts[rank], weights[rank], experts_total)
        torch.testing.assert_close(combined[rank], dense, rtol=1e-5, atol=1e-5)
