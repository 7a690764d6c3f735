"""The workspace layout: alignment, non-overlap, size formula, metainfo round trip, wrap helper."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import a2a
from a2a.runtime.alignment import SEGMENT_ALIGN, align_up
from a2a.runtime.protocol import SIGNATURE_WORDS
from a2a.layout import (
    MAX_PAYLOADS,
    MAX_TOP_K,
    METAINFO_FIELDS,
    ROUND_STATE_LEN,
    PLANE_ALIGN,
    PLANE_START_ALIGN,
    REGION_ALIGN,
    WorkspaceLayout,
    num_route_blocks,
)

# Every offset field, in layout order (the metainfo lists ep_size and max_num_tokens first).
REGION_ORDER = [name for name in METAINFO_FIELDS[2:] if name.endswith("_offset")]


def region_sizes(layout: WorkspaceLayout) -> dict[str, int]:
    ep, cap, blocks = layout.ep_size, layout.max_num_tokens, num_route_blocks(layout.max_num_tokens)
    topk = 4 * cap * MAX_TOP_K
    return {
        "send_counters_offset": 4 * ep,
        "recv_counters_offset": 4 * ep,
        "dispatch_flags_offset": 4 * ep,
        "combine_flags_offset": 4 * ep,
        "gather_flags_offset": 4 * ep,
        "signatures_offset": 4 * 2 * ep * SIGNATURE_WORDS,
        "round_state_offset": 4 * ROUND_STATE_LEN,
        "topk_target_ranks_offset": topk,
        "topk_send_indices_offset": topk,
        "topk_local_slots_offset": topk,
        "block_counts_offset": 4 * blocks * ep,
        "block_invalid_offset": 4 * blocks,
        "eplb_stats_offset": 4 * ep * layout.eplb_stats_num_experts,
    }


@given(ep_size=st.integers(1, 64), max_num_tokens=st.integers(1, 70000), eplb=st.sampled_from([0, 1, 257]))
def test_regions_are_aligned_ordered_and_disjoint(ep_size, max_num_tokens, eplb):
    layout = WorkspaceLayout.compute(ep_size, max_num_tokens, eplb)
    sizes = region_sizes(layout)
    for name, following in zip(REGION_ORDER, REGION_ORDER[1:]):
        start = getattr(layout, name)
        assert start % REGION_ALIGN == 0, name
        assert start + sizes[name] <= getattr(layout, following), (name, following)


@given(
    ep_size=st.integers(1, 16),
    max_num_tokens=st.integers(1, 300),
    runtime=st.integers(1, 300),
    row_bytes=st.lists(st.integers(1, 5000), min_size=1, max_size=MAX_PAYLOADS),
    combine_bytes=st.integers(1, 9000),
)
def test_round_planes_start_on_4096_byte_boundaries_and_fit_the_advertised_size(
    ep_size, max_num_tokens, runtime, row_bytes, combine_bytes
):
    runtime = min(runtime, max_num_tokens)
    layout = WorkspaceLayout.compute(ep_size, max_num_tokens)
    planes = layout.round_layout(runtime, row_bytes)
    end = layout.payload_offset
    for offset, size, row in zip(planes.recv_plane_offsets, planes.recv_plane_sizes, row_bytes):
        assert offset == align_up(end, PLANE_START_ALIGN) and offset % PLANE_ALIGN == 0  # no more padding
        assert size == ep_size * runtime * row
        end = offset + size
    assert planes.combine_offset % PLANE_START_ALIGN == 0 and planes.combine_offset >= end
    needed = planes.combine_end(ep_size, combine_bytes)
    # Both forms of the size function cover every rt <= capacity.
    assert needed <= a2a.moe_a2a_get_workspace_size_per_rank(ep_size, max_num_tokens, row_bytes, combine_bytes)
    assert needed <= a2a.moe_a2a_get_workspace_size_per_rank(ep_size, max_num_tokens, sum(row_bytes), combine_bytes)


def test_size_formula_matches_the_reference_shape():
    ep, tokens, hidden, top_k = 8, 10, 128, 2
    aux = a2a.moe_a2a_get_aux_data_size(ep, tokens)
    assert a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, 0, 0) == aux  # FlashInfer's rule: no payloads, aux
    exact = a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, [], 0)
    # The exact form: the aux region alone, up to where the (empty) combine plane would start.
    assert exact == align_up(WorkspaceLayout.compute(ep, tokens).aux_size, PLANE_START_ALIGN)
    grown = a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, [hidden * 2], hidden * 2)
    assert grown - exact == 2 * hidden * 2 * ep * tokens
    helper = a2a.MoeAlltoAll.get_moe_workspace_size_per_rank(ep, top_k, tokens, hidden)
    assert helper == a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, 2 * hidden + 8 * top_k, 2 * hidden)


def test_metainfo_round_trip_and_index_names():
    layout = WorkspaceLayout.compute(8, 4096)
    metainfo = layout.to_metainfo()
    assert metainfo.dtype == torch.int64 and metainfo.shape == (len(METAINFO_FIELDS),)
    assert WorkspaceLayout.from_metainfo(metainfo) == layout
    pairs = dict(a2a.moe_a2a_get_metainfo_index_pairs())
    assert metainfo[pairs["MOE_A2A_PAYLOAD_OFFSET_INDEX"]] == layout.payload_offset
    assert a2a.MoeAlltoAll._METAINFO_INDEX["SEND_COUNTERS_OFFSET_INDEX"] == pairs["MOE_A2A_SEND_COUNTERS_OFFSET_INDEX"]
    tampered = metainfo.clone()
    tampered[pairs["MOE_A2A_PAYLOAD_OFFSET_INDEX"]] += 128
    with pytest.raises(ValueError, match="metainfo"):
        WorkspaceLayout.from_metainfo(tampered)


def test_initialize_zeroes_only_its_own_segment():
    workspace = torch.full((3, 4096), 7, dtype=torch.uint8)
    metainfo = a2a.moe_a2a_initialize(workspace, 1, 3, 4)
    assert torch.equal(metainfo, WorkspaceLayout.compute(3, 4).to_metainfo())
    assert workspace[1].eq(0).all() and workspace[0].eq(7).all() and workspace[2].eq(7).all()


def test_wrap_payload_tensor_reads_the_right_segment():
    base = torch.arange(4 * 256, dtype=torch.int32).view(torch.uint8).view(4, 1024)
    view = a2a.moe_a2a_wrap_payload_tensor_in_workspace(base, [2, 3], 2 * 1024 + 64, 2 * 1024 + 64 + 2 * 3 * 8, torch.int32)
    assert view.shape == (2, 3, 2)
    assert view.flatten().tolist() == list(range(2 * 256 + 16, 2 * 256 + 16 + 12))
    with pytest.raises(ValueError, match="segment"):
        a2a.moe_a2a_wrap_payload_tensor_in_workspace(base, [1], 1000, 1100, torch.uint8)


@pytest.mark.parametrize("size_per_rank", [1, 4096, 235_679_104 // 1024, 1_000_003])
def test_simulated_segments_and_planes_start_on_4096_byte_boundaries(device, size_per_rank):
    """Planes start 4096-byte aligned in memory, not only in a segment: the simulated world's rows
    are SEGMENT_ALIGN apart from an aligned start, as the process worlds' allocators put them
    (before, rows were size_per_rank apart, so a plane's address drifted by rank)."""
    world = a2a.SimulatedWorld(3, device)
    workspace = world.workspace(("layout-test",), size_per_rank)
    assert workspace.shape == (3, size_per_rank) and workspace.stride(0) % SEGMENT_ALIGN == 0
    assert all(workspace[rank].data_ptr() % SEGMENT_ALIGN == 0 for rank in range(3))
    assert not workspace.any()  # zero-initialised
    planes = WorkspaceLayout.compute(3, 7).round_layout(5, [14336, 32, 33])
    assert all(offset % SEGMENT_ALIGN == 0 for offset in (*planes.recv_plane_offsets, planes.combine_offset))
