"""Dispatch launcher: validate, route, copy payloads into the targets' receive planes, signal, wait."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from a2a import configs, validation
from a2a.barrier import barrier_args, barrier_constexprs
from a2a.expert_partition import ExpertPartition
from a2a.kernels import _dispatch_copy_kernel, _route_kernel
from a2a.launch import KernelLaunch
from a2a.layout import (MAX_TOP_K, ROUTE_BLOCK_TOKENS, RoundLayout, RoundState, TimeoutPhase, WorkspaceLayout,
                        num_route_blocks)  # fmt: skip
from a2a.runtime.scheduler import schedule_phase
from a2a.runtime.streams import SignalMode, current_stream
from a2a.sanitize import expert_id_sanitize_launch
from a2a.workspace import RankWorkspace, rank_workspace_of, segment_view


def moe_a2a_dispatch(
    token_selected_experts: torch.Tensor,
    input_payloads: Sequence[torch.Tensor],
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    num_experts: int,
) -> tuple[list[torch.Tensor], int]:
    """Send every local token's payload rows to the ranks that own its experts.

    token_selected_experts: `[num_tokens, top_k]` int32 global expert ids (ids outside
    `[0, num_experts)` are skipped). input_payloads: 1..8 contiguous `[num_tokens, W_p]` tensors of
    any dtype. Runs on the current stream (or the activated rank stream) and returns, without
    waiting, one `[ep_size, runtime_max_tokens_per_rank, W_p]` view per payload into this rank's
    receive planes (row `[s][j]`: the j-th token source s sent here; rows `j >= recv_counters[s]`
    are stale) and the rank-local byte offset of the combine plane for this round.

    When the stream reaches the end of this op, every peer's rows have landed. The views stay
    valid until this rank's next combine starts. Raises `A2ATimeoutError` if an earlier wait of
    this rank timed out on the device (see `a2a.kernels.signal`).
    """
    layout = WorkspaceLayout.from_metainfo(metainfo)
    validation.check_geometry(ep_size, ep_rank, top_k, num_experts)
    if layout.ep_size != ep_size:
        raise ValueError(f"ep_size ({ep_size}) must equal the workspace layout's ep_size ({layout.ep_size})")
    workspace = validation.check_workspace(workspace, ep_size)
    experts = validation.require_tensor(
        "token_selected_experts", token_selected_experts, dtypes=[torch.int32], ndim=2, device=workspace.device
    )
    if experts.shape[1] != top_k:
        raise ValueError(f"token_selected_experts must be [num_tokens, top_k={top_k}], got {list(experts.shape)}")
    num_tokens = experts.shape[0]
    validation.check_runtime_max_tokens(runtime_max_tokens_per_rank, layout.max_num_tokens, num_tokens)
    payloads = validation.check_payloads(input_payloads, num_tokens, workspace.device)
    round_layout = layout.round_layout(runtime_max_tokens_per_rank, [_row_bytes(p) for p in payloads])
    planes_end = round_layout.recv_plane_offsets[-1] + round_layout.recv_plane_sizes[-1]
    validation.check_fits("the dispatch receive planes", planes_end, workspace.shape[1])

    rank_workspace = rank_workspace_of(workspace, layout, ep_rank)
    rank_workspace.raise_if_timed_out()
    stream = current_stream(workspace.device)
    launches = [
        _route_launch(rank_workspace, experts, top_k, num_experts),
        _copy_launch(rank_workspace, payloads, round_layout, top_k, stream.signal_mode),
    ]
    # Everything this phase (and the sanitize that usually follows it) may launch is loaded before
    # the barrier is enqueued: see a2a.launch.
    for launch in launches:
        launch.prepare()
    expert_id_sanitize_launch(rank_workspace, runtime_max_tokens_per_rank, top_k).prepare()
    schedule_phase(stream, launches, rank_workspace.dispatch_signals)

    recv = [
        segment_view(workspace, ep_rank, offset, payload.dtype, (ep_size, runtime_max_tokens_per_rank, payload.shape[1]))
        for offset, payload in zip(round_layout.recv_plane_offsets, payloads)
    ]
    return recv, round_layout.combine_offset


def _row_bytes(payload: torch.Tensor) -> int:
    return payload.shape[1] * payload.element_size()


def _route_launch(rank_workspace: RankWorkspace, experts: torch.Tensor, top_k: int, num_experts: int) -> KernelLaunch:
    layout = rank_workspace.layout
    num_tokens = experts.shape[0]
    partition = ExpertPartition(num_experts, layout.ep_size)
    capacity = layout.max_num_tokens * MAX_TOP_K
    targets = rank_workspace.own(layout.topk_target_ranks_offset, capacity)
    local_slots = rank_workspace.own(layout.topk_local_slots_offset, capacity)
    recv_counters = rank_workspace.recv_counters_every_rank
    num_blocks = num_route_blocks(num_tokens)
    return KernelLaunch(
        _route_kernel,
        (num_blocks,),
        (experts, targets, local_slots, rank_workspace.block_counts, rank_workspace.block_invalid,
         rank_workspace.round_state, rank_workspace.send_counters, recv_counters, recv_counters.stride(0),
         num_tokens, num_blocks, num_experts, partition.base, partition.remainder, rank_workspace.ep_rank),
        dict(TOP_K=top_k, EP_SIZE=layout.ep_size, EP_PAD=configs.rank_pad(layout.ep_size), BLOCK_TOKENS=ROUTE_BLOCK_TOKENS,
             SCAN_BLOCKS=configs.ROUTE_SCAN_BLOCKS, num_warps=configs.ROUTE_NUM_WARPS),
    )  # fmt: skip


def _copy_launch(
    rank_workspace: RankWorkspace, payloads: list[torch.Tensor], round_layout: RoundLayout, top_k: int,
    mode: SignalMode,
) -> KernelLaunch:
    layout = rank_workspace.layout
    workspace = rank_workspace.workspace
    sources, planes, strides, row_units, vec_units = [], [], [], [], []
    for payload, offset, size in zip(payloads, round_layout.recv_plane_offsets, round_layout.recv_plane_sizes):
        unit = configs.copy_unit(
            _row_bytes(payload), payload.data_ptr(), workspace.data_ptr() + offset, rank_workspace.segment_stride
        )
        sources.append(payload.view(torch.uint8).view(unit.dtype))
        plane = rank_workspace.every_rank(offset, size, unit.dtype)
        planes.append(plane)
        strides.append(plane.stride(0))
        row_units.append(unit.row_units)
        vec_units.append(unit.vec_units)
    widest = max(range(len(row_units)), key=lambda p: row_units[p])
    config = configs.dispatch_copy_config(row_units[widest], sources[widest].element_size(), top_k, layout.ep_size)
    num_tiles = -(-row_units[widest] // config.tile)
    capacity = layout.max_num_tokens * MAX_TOP_K
    targets = rank_workspace.own(layout.topk_target_ranks_offset, capacity)
    local_slots = rank_workspace.own(layout.topk_local_slots_offset, capacity)
    send_indices = rank_workspace.own(layout.topk_send_indices_offset, capacity)
    election = rank_workspace.round_state[RoundState.COPY_ELECTION : RoundState.COPY_ELECTION + 1]
    num_tokens = payloads[0].shape[0]
    # At least one token row, so a rank without tokens still runs the barrier.
    return KernelLaunch(
        _dispatch_copy_kernel,
        (max(1, num_tokens), num_tiles),
        (tuple(sources), tuple(planes), tuple(strides), targets, local_slots, rank_workspace.block_counts,
         send_indices, election, *barrier_args(rank_workspace, layout.dispatch_flags_offset), num_tokens,
         round_layout.runtime_max_tokens, rank_workspace.ep_rank),
        dict(NUM_PAYLOADS=len(sources), ROW_UNITS=tuple(row_units), VEC_UNITS=tuple(vec_units), TOP_K=top_k,
             K_CHUNK=min(configs.next_power_of_2(top_k), 8), EP_SIZE=layout.ep_size, BLOCK_TOKENS=ROUTE_BLOCK_TOKENS,
             TILE=config.tile, num_warps=config.num_warps,
             **barrier_constexprs(rank_workspace, mode, TimeoutPhase.DISPATCH)),
    )  # fmt: skip
