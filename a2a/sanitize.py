"""Sanitize launcher: mark stale receive rows of an expert-id plane invalid."""

from __future__ import annotations

import torch

from a2a import configs, validation
from a2a.kernels import _sanitize_kernel
from a2a.launch import KernelLaunch
from a2a.layout import WorkspaceLayout
from a2a.runtime.scheduler import schedule_local
from a2a.runtime.streams import current_stream
from a2a.workspace import RankWorkspace, rank_workspace_of


def moe_a2a_sanitize_expert_ids(
    expert_ids: torch.Tensor,
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    ep_rank: int,
    invalid_expert_id: int,
) -> None:
    """In place: rows `(s, j)` of `expert_ids` `[ep_size, rt, top_k]` int32 with `j >= recv_counters[s]`
    get `invalid_expert_id` in every column; valid rows keep their (global) ids.

    Call it on the dispatch's stream after dispatch and before combine: `recv_counters` hold this
    round's counts from the end of dispatch until this rank's combine starts.
    """
    layout = WorkspaceLayout.from_metainfo(metainfo)
    validation.check_geometry(layout.ep_size, ep_rank)
    workspace = validation.check_workspace(workspace, layout.ep_size)
    expert_ids = validation.require_tensor(
        "expert_ids", expert_ids, dtypes=[torch.int32], ndim=3, device=workspace.device
    )
    if expert_ids.shape[0] != layout.ep_size:
        raise ValueError(f"expert_ids must be [ep_size={layout.ep_size}, rt, top_k], got {list(expert_ids.shape)}")
    validation.check_runtime_max_tokens(expert_ids.shape[1], layout.max_num_tokens)
    validation.require_int("invalid_expert_id", invalid_expert_id, -(2**31), 2**31 - 1)
    if expert_ids.shape[2] == 0:
        return
    rank_workspace = rank_workspace_of(workspace, layout, ep_rank)
    rank_workspace.raise_if_timed_out()
    launch = sanitize_launch(rank_workspace, expert_ids, invalid_expert_id)
    launch.prepare()
    schedule_local(current_stream(workspace.device), launch)


def sanitize_launch(rank_workspace: RankWorkspace, expert_ids: torch.Tensor, invalid_expert_id: int) -> KernelLaunch:
    ep_size, rt, width = expert_ids.shape
    return KernelLaunch(
        _sanitize_kernel,
        (-(-(ep_size * rt) // configs.SANITIZE_BLOCK_ROWS),),
        (expert_ids, rank_workspace.recv_counters, rt, invalid_expert_id),
        dict(EP_SIZE=ep_size, TOP_K=width, K_PAD=configs.next_power_of_2(width),
             BLOCK_ROWS=configs.SANITIZE_BLOCK_ROWS, num_warps=4),
    )  # fmt: skip


def expert_id_sanitize_launch(rank_workspace: RankWorkspace, runtime_max_tokens: int, top_k: int) -> KernelLaunch:
    """The sanitize variant for this round's int32 `[ep_size, rt, top_k]` expert-id receive plane
    (any 16-byte aligned int32 view of the workspace selects the same compiled variant)."""
    stand_in = rank_workspace.own(rank_workspace.layout.topk_target_ranks_offset, top_k)
    return sanitize_launch(rank_workspace, stand_in.view(1, 1, top_k).expand(rank_workspace.ep_size, runtime_max_tokens, top_k), 0)
