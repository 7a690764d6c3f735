"""Sanitize launcher: mark stale receive rows of an expert-id plane invalid."""

from __future__ import annotations

from collections.abc import Callable

import torch

from a2a.ops import configs, validation
from a2a.kernels import _sanitize_kernel
from a2a.ops.launch import KernelLaunch, pdl_constexprs, use_pdl
from a2a.runtime.current_stream import current_stream
from a2a.ops.context import plan_key, resolve_context, tensor_key
from a2a.workspace import RankWorkspace

# Columns one sanitize program writes per step (any width works: the kernel loops over them).
WIDTH_BLOCK_MAX = 64


def moe_a2a_sanitize_expert_ids(
    expert_ids: torch.Tensor,
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    ep_rank: int,
    invalid_expert_id: int,
    enable_pdl: bool | None = None,
    *,
    backend: str = "trtllm",
) -> None:
    """In place: rows `(s, j)` of `expert_ids` `[ep_size, rt, width]` int32 with `j >= recv_counters[s]`
    get `invalid_expert_id` in every column; valid rows keep their (global) ids.

    Call it on the dispatch's stream after dispatch and before combine: `recv_counters` hold this
    round's counts from the end of dispatch until this rank's combine starts. After a recorded
    fault every row counts as stale.
    """
    validation.check_backend(backend)
    validation.check_enable_pdl(enable_pdl)
    rank_workspace = resolve_context(workspace, metainfo, ep_rank)
    rank_workspace.raise_if_faulted()
    sanitize_plan(rank_workspace, expert_ids, invalid_expert_id, enable_pdl)()


def sanitize_plan(rank_workspace: RankWorkspace, expert_ids: torch.Tensor, invalid_expert_id: int,
                  enable_pdl: bool | None = None) -> Callable[[], None]:  # fmt: skip
    """The validated launch of this call, to run on the current stream (nothing is launched here)."""
    key = plan_key("sanitize", lambda: (tensor_key(expert_ids),), (enable_pdl,))
    bound = rank_workspace.find_plan(key)
    if bound is None:
        expert_ids = validation.require_tensor(
            "expert_ids", expert_ids, dtypes=[torch.int32], ndim=3, device=rank_workspace.workspace.device
        )
        ep_size = rank_workspace.ep_size
        if expert_ids.shape[0] != ep_size:
            raise ValueError(f"expert_ids must be [ep_size={ep_size}, rt, top_k], got {list(expert_ids.shape)}")
        validation.check_runtime_max_tokens(expert_ids.shape[1], rank_workspace.layout.max_num_tokens)
        if expert_ids.shape[2] == 0:
            bound = _NOTHING_TO_SANITIZE
        else:
            pdl = use_pdl(rank_workspace.workspace.device, enable_pdl)
            bound = sanitize_launch(rank_workspace, expert_ids, 0, pdl).bind(dynamic=("expert_ids_ptr", "invalid_expert_id"))
        rank_workspace.remember_plan(key, bound)
    validation.require_int("invalid_expert_id", invalid_expert_id, -(2**31), 2**31 - 1)
    if bound is _NOTHING_TO_SANITIZE:
        return lambda: None
    grid = bound.launch.grid

    def launch() -> None:
        if rank_workspace.workspace.is_cuda:  # torch's current stream is the rank stream (also when activated)
            bound(grid, expert_ids, invalid_expert_id)
        else:
            current_stream(rank_workspace.workspace.device).submit(lambda: bound(grid, expert_ids, invalid_expert_id))

    return launch


_NOTHING_TO_SANITIZE = object()  # the plan of a `[ep_size, rt, 0]` expert-id plane


def sanitize_launch(rank_workspace: RankWorkspace, expert_ids: torch.Tensor, invalid_expert_id: int,
                    pdl: bool = False) -> KernelLaunch:  # fmt: skip
    ep_size, rt, width = expert_ids.shape
    return KernelLaunch(
        _sanitize_kernel,
        (-(-(ep_size * rt) // configs.SANITIZE_BLOCK_ROWS),),
        (expert_ids, rank_workspace.recv_counters, rank_workspace.fault_record, rt, invalid_expert_id),
        dict(EP_SIZE=ep_size, WIDTH=width, WIDTH_BLOCK=min(configs.next_power_of_2(width), WIDTH_BLOCK_MAX),
             BLOCK_ROWS=configs.SANITIZE_BLOCK_ROWS, num_warps=4, **pdl_constexprs(pdl)),
    )  # fmt: skip


def expert_id_sanitize_launch(rank_workspace: RankWorkspace, runtime_max_tokens: int, top_k: int,
                              pdl: bool = False) -> KernelLaunch:  # fmt: skip
    """The sanitize variant for this round's int32 `[ep_size, rt, top_k]` expert-id receive plane
    (any 16-byte aligned int32 view of the workspace selects the same compiled variant)."""
    stand_in = rank_workspace.own(rank_workspace.layout.topk_target_ranks_offset, top_k)
    return sanitize_launch(rank_workspace, stand_in.view(1, 1, top_k).expand(rank_workspace.ep_size, runtime_max_tokens, top_k), 0,
                           pdl)
