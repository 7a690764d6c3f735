"""Combine launcher: stage expert outputs, signal readiness, wait for peers, gather and reduce."""

from __future__ import annotations

import torch

from a2a import configs, validation
from a2a.barrier import combine_barrier_launch
from a2a.kernels import _combine_kernel, _stage_combine_kernel
from a2a.launch import KernelLaunch
from a2a.layout import MAX_TOP_K, PLANE_ALIGN, WorkspaceLayout
from a2a.runtime.scheduler import schedule_phase
from a2a.runtime.streams import SignalMode, current_stream
from a2a.workspace import RankWorkspace, rank_workspace_of

COMBINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def moe_a2a_combine(
    payload: torch.Tensor,
    local_num_tokens: int,
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    combine_payload_offset: int,
    payload_in_workspace: bool = False,
    *,
    output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return every local token's sum over its top-k expert outputs, gathered from the peers.

    payload: `[ep_size, runtime_max_tokens_per_rank, H]` fp16/bf16/fp32, this rank's expert output
    for each received row (row `[s][j]` answers the j-th token source s sent here), already weighted.
    With `payload_in_workspace=True` it must be the view of this rank's combine plane
    (`MoeAlltoAll.get_combine_payload_tensor_in_workspace`) and no staging copy runs.
    `local_num_tokens`, `runtime_max_tokens_per_rank`, `top_k` and `combine_payload_offset` must be
    those of the matching dispatch. Returns `[local_num_tokens, H]` of the payload's dtype (written
    into `output` when given), valid once the stream reaches the end of this op. Raises
    `A2ATimeoutError` if an earlier wait of this rank timed out on the device.
    """
    layout = WorkspaceLayout.from_metainfo(metainfo)
    validation.check_geometry(ep_size, ep_rank, top_k)
    workspace = validation.check_workspace(workspace, ep_size)
    payload = validation.require_tensor("payload", payload, dtypes=COMBINE_DTYPES, ndim=3, device=workspace.device)
    validation.check_runtime_max_tokens(runtime_max_tokens_per_rank, layout.max_num_tokens)
    validation.require_shape(
        "payload", payload, (ep_size, runtime_max_tokens_per_rank, payload.shape[2]), "[ep_size, runtime_max_tokens_per_rank, hidden]"
    )
    validation.require_int("local_num_tokens", local_num_tokens, 0, runtime_max_tokens_per_rank)
    hidden = payload.shape[2]
    if hidden == 0:
        raise ValueError("payload hidden size must be >= 1, got 0")
    plane_bytes = ep_size * runtime_max_tokens_per_rank * hidden * payload.element_size()
    validation.require_int("combine_payload_offset", combine_payload_offset, layout.payload_offset)
    if combine_payload_offset % PLANE_ALIGN:
        raise ValueError(f"combine_payload_offset must be a multiple of {PLANE_ALIGN}, got {combine_payload_offset}")
    validation.check_fits("the combine plane", combine_payload_offset + plane_bytes, workspace.shape[1])
    own_plane_address = workspace.data_ptr() + ep_rank * workspace.stride(0) + combine_payload_offset
    if payload_in_workspace and payload.data_ptr() != own_plane_address:
        raise ValueError(
            "payload_in_workspace is True but payload is not this rank's combine plane: "
            f"data_ptr {payload.data_ptr():#x} != {own_plane_address:#x}"
        )
    if output is None:
        output = torch.empty(local_num_tokens, hidden, dtype=payload.dtype, device=workspace.device)
    else:
        validation.require_tensor("output", output, dtypes=[payload.dtype], ndim=2, device=workspace.device)
        validation.require_shape("output", output, (local_num_tokens, hidden), "[local_num_tokens, hidden]")

    rank_workspace = rank_workspace_of(workspace, layout, ep_rank)
    rank_workspace.raise_if_timed_out()
    stream = current_stream(workspace.device)
    stage = _stage_launch(rank_workspace, payload, combine_payload_offset)
    barrier = combine_barrier_launch(rank_workspace, stream.signal_mode)
    gather = _gather_launch(rank_workspace, payload, combine_payload_offset, output, top_k)
    # Load every variant before the barrier is enqueued, also those this rank skips: see a2a.launch.
    for launch in (stage, barrier, gather):
        launch.prepare()
    launches = [] if payload_in_workspace else [stage]
    if stream.signal_mode is not SignalMode.STREAM_MEMOPS:
        launches.append(barrier)
    schedule_phase(stream, launches, rank_workspace.combine_signals, [gather] if local_num_tokens > 0 else [])
    return output


def _stage_launch(rank_workspace: RankWorkspace, payload: torch.Tensor, combine_offset: int) -> KernelLaunch:
    ep_size, rt, hidden = payload.shape
    row_bytes = hidden * payload.element_size()
    workspace = rank_workspace.workspace
    plane_address = workspace.data_ptr() + rank_workspace.ep_rank * rank_workspace.segment_stride + combine_offset
    unit = configs.copy_unit(row_bytes, payload.data_ptr(), plane_address)
    source = payload.view(torch.uint8).view(unit.dtype)
    plane = rank_workspace.own(combine_offset, ep_size * rt * unit.row_units, unit.dtype)
    config = configs.stage_config(unit.row_units, unit.unit_bytes)
    return KernelLaunch(
        _stage_combine_kernel,
        (ep_size * rt, -(-unit.row_units // config.tile)),
        (source, plane, rank_workspace.recv_counters, rt),
        dict(ROW_UNITS=unit.row_units, VEC_UNITS=unit.vec_units, TILE=config.tile, num_warps=config.num_warps),
    )


def _gather_launch(
    rank_workspace: RankWorkspace, payload: torch.Tensor, combine_offset: int, output: torch.Tensor, top_k: int
) -> KernelLaunch:
    ep_size, rt, hidden = payload.shape
    layout = rank_workspace.layout
    planes = rank_workspace.every_rank(combine_offset, ep_size * rt * hidden * payload.element_size(), payload.dtype)
    capacity = layout.max_num_tokens * MAX_TOP_K
    targets = rank_workspace.own(layout.topk_target_ranks_offset, capacity)
    send_indices = rank_workspace.own(layout.topk_send_indices_offset, capacity)
    config = configs.combine_config(hidden, payload.element_size(), top_k, ep_size)
    return KernelLaunch(
        _combine_kernel,
        (output.shape[0], -(-hidden // config.tile)),
        (planes, planes.stride(0), output, targets, send_indices, rt, rank_workspace.ep_rank),
        dict(HIDDEN=hidden, TOP_K=top_k, TILE=config.tile, num_warps=config.num_warps),
    )
