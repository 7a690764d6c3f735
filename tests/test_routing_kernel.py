"""The routing kernel alone against the reference, at rank counts and top_k the round tests rarely
reach (up to 64 ranks, top_k up to 22): the chunked de-duplication and slot steps
(a2a.ops.configs.route_chunks) then take several chunks, and a round may be one block or several."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a2a
from a2a import reference
from a2a.layout import MAX_TOP_K, ROUTE_BLOCK_TOKENS, RoundState, WorkspaceLayout, num_route_blocks
from a2a.ops.dispatch import _route_launch
from a2a.workspace import RankWorkspace
from tests.support import round_inputs

MAX_TOKENS = 3 * ROUTE_BLOCK_TOKENS


@settings(max_examples=25)
@given(ep_size=st.sampled_from([1, 2, 3, 8, 33, 64]), top_k=st.sampled_from([1, 2, 5, 8, 13, MAX_TOP_K]),
       num_tokens=st.integers(0, MAX_TOKENS), routing=st.sampled_from(round_inputs.ROUTINGS),
       drop=st.integers(0, 63), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_routing_kernel_matches_the_reference(device, ep_size, top_k, num_tokens, routing, drop, seed):
    ep_rank = seed % ep_size
    num_experts = ep_size * (1 + seed % 3) + seed % 2
    generator = torch.Generator().manual_seed(seed)
    experts = round_inputs.expert_ids(num_tokens, top_k, num_experts, generator, routing=routing, rank=ep_rank,
                                      ep_size=ep_size)  # fmt: skip
    inactive = drop % ep_size if ep_size > 1 and drop % 2 and drop % ep_size != ep_rank else None
    active = [r for r in range(ep_size) if r != inactive]
    mask = sum(1 << r for r in active)

    size = a2a.moe_a2a_get_workspace_size_per_rank(ep_size, MAX_TOKENS, [4 * top_k], 16)
    workspace = torch.full((ep_size, size), 0x5A, dtype=torch.uint8, device=device)  # not zeroed: all must be written
    layout = WorkspaceLayout.compute(ep_size, MAX_TOKENS, 16)
    rank_workspace = RankWorkspace(workspace, layout, ep_rank)
    rank_workspace.round_words(RoundState.ROUTE_ELECTION, 1).zero_()  # as a zeroed workspace starts
    rank_workspace.fault_record.zero_()
    launch = _route_launch(rank_workspace, experts.to(device), rank_workspace.round_state, False, top_k, num_experts,
                           mask, wait_in_kernel=False, single_block=num_route_blocks(num_tokens) == 1)  # fmt: skip
    launch()
    if device == "cuda":
        torch.cuda.synchronize()

    want = reference.route_rank(experts, num_experts, ep_size, active)
    entries = num_tokens * top_k
    targets = rank_workspace.own(layout.topk_target_ranks_offset, entries).view(num_tokens, top_k).cpu()
    local = rank_workspace.own(layout.topk_local_slots_offset, entries).view(num_tokens, top_k).cpu()
    offsets = rank_workspace.block_counts.cpu().view(-1, ep_size)
    assert torch.equal(targets, want.topk_target_ranks.to(torch.int32))
    block = (torch.arange(num_tokens) // ROUTE_BLOCK_TOKENS)[:, None].expand(num_tokens, top_k)
    sends = targets >= 0
    slots = torch.where(sends, offsets[block, targets.clamp(min=0).long()] + local, torch.full_like(local, -1))
    assert torch.equal(slots, want.topk_send_indices.to(torch.int32))
    assert torch.equal(rank_workspace.send_counters.cpu(), want.send_counts)
    assert int(rank_workspace.round_words(RoundState.INVALID_COUNT, 1).cpu()) == want.num_invalid
    assert int(rank_workspace.round_words(RoundState.ROUTE_ELECTION, 1).cpu()) == 0  # ready for the next round
    # This rank's counts land in every active target's segment (row ep_rank of its receive counters).
    for target in active:
        peer = RankWorkspace(workspace, layout, target)
        assert int(peer.recv_counters.cpu()[ep_rank]) == int(want.send_counts[target]), f"segment of rank {target}"
