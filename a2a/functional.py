"""The functional API, named and ordered as FlashInfer's `flashinfer.comm` MoE all-to-all ops.

Every op runs on the current stream (on CUDA: torch's current stream; with a rank stream
activated: that stream) and none synchronises, except `moe_a2a_initialize`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from a2a.ops import validation
from a2a.ops.combine import moe_a2a_combine
from a2a.ops.dispatch import moe_a2a_dispatch
from a2a.layout import MAX_RANKS, WorkspaceLayout, aux_data_size, metainfo_index_pairs, workspace_size_per_rank
from a2a.ops.sanitize import moe_a2a_sanitize_expert_ids
from a2a.workspace import reset_rank_state


# Bit words of FlashInfer's active-rank mask tensor: one uint64 covers MAX_RANKS = 64 ranks.
MOE_A2A_RANK_MASK_WORDS = 1


def moe_a2a_get_workspace_size_per_rank(
    ep_size: int,
    max_num_tokens: int,
    total_dispatch_payload_size_per_token: int | Sequence[int],
    combine_payload_size_per_token: int,
    eplb_stats_num_experts: int = 0,
    *,
    backend: str = "trtllm",
) -> int:
    """Bytes per rank for rounds of up to `max_num_tokens` tokens (see `a2a.layout`): FlashInfer's
    formula for a summed payload size (zero payloads: exactly `moe_a2a_get_aux_data_size`), or
    exact for a list of per-payload sizes (a2a addition)."""
    validation.check_backend(backend)
    return workspace_size_per_rank(ep_size, max_num_tokens, total_dispatch_payload_size_per_token,
                                   combine_payload_size_per_token, eplb_stats_num_experts)  # fmt: skip


def moe_a2a_get_aux_data_size(ep_size: int, max_num_tokens: int, eplb_stats_num_experts: int = 0) -> int:
    """Bytes per rank of everything but the payload planes (the aux region, EPLB statistics
    included, and what the planes' alignment may add)."""
    return aux_data_size(ep_size, max_num_tokens, eplb_stats_num_experts)


def moe_a2a_active_rank_mask(active_ranks: Sequence[int] | torch.Tensor, ep_size: int) -> torch.Tensor:
    """The `[MOE_A2A_RANK_MASK_WORDS]` CPU uint64 mask with bit r set for each rank in
    `active_ranks` (a sequence or 1-D tensor of rank indices), for dispatch / combine's
    `active_rank_mask` with `enable_rank_mask=True`."""
    validation.require_int("ep_size", ep_size, 1, MAX_RANKS)
    mask = 0
    for rank in active_ranks.tolist() if isinstance(active_ranks, torch.Tensor) else active_ranks:
        mask |= 1 << validation.require_int("active rank", int(rank), 0, ep_size - 1)
    return torch.tensor([mask], dtype=torch.int64).view(torch.uint64) if mask < 1 << 63 else \
        torch.tensor([mask - (1 << 64)], dtype=torch.int64).view(torch.uint64)


def moe_a2a_get_metainfo_index_pairs() -> list[tuple[str, int]]:
    """(name, index) pairs of the metainfo tensor, names prefixed `MOE_A2A_`."""
    return metainfo_index_pairs()


def moe_a2a_initialize(workspace: torch.Tensor, ep_rank: int, ep_size: int, max_num_tokens: int,
                       eplb_stats_num_experts: int = 0, *, backend: str = "trtllm") -> torch.Tensor:  # fmt: skip
    """Zero this rank's segment (row `ep_rank`) and return the layout as a CPU int64 metainfo tensor.

    `eplb_stats_num_experts` > 0 reserves the region where a dispatch given `eplb_local_stats` of
    that length all-gathers them. Synchronises the current stream. Peers must not dispatch into
    this segment before it is zeroed: put a barrier across ranks between every rank's initialize
    and the first dispatch.
    """
    validation.check_backend(backend)
    validation.check_geometry(ep_size, ep_rank)
    workspace = validation.check_workspace(workspace, ep_size)
    layout = WorkspaceLayout.compute(ep_size, max_num_tokens, eplb_stats_num_experts)
    validation.check_fits("the aux region", layout.aux_size, workspace.shape[1])
    workspace[ep_rank].zero_()
    reset_rank_state(workspace, ep_rank)  # a zeroed segment: no live round, no fault
    if workspace.is_cuda:
        torch.cuda.current_stream(workspace.device).synchronize()
    return layout.to_metainfo()


def moe_a2a_wrap_payload_tensor_in_workspace(
    workspace: torch.Tensor,
    leading_shape: Sequence[int],
    slice_start: int,
    slice_end: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """View bytes `[slice_start, slice_end)` of the workspace as `[*leading_shape, -1]` of `dtype`.

    Offsets are absolute (`rank * workspace.stride(0) + local`); a 1-D workspace is one segment.
    """
    if workspace.dim() == 1:
        workspace = workspace.unsqueeze(0)
    workspace = validation.require_tensor("workspace", workspace, dtypes=[torch.uint8], ndim=2, contiguous=False)
    stride = workspace.stride(0)
    rank, local = divmod(slice_start, stride)
    length = slice_end - slice_start
    if length < 0 or length > workspace.shape[1] or local + length > workspace.shape[1] or rank >= workspace.shape[0]:
        raise ValueError(
            f"slice [{slice_start}, {slice_end}) does not lie inside one segment of a workspace "
            f"{list(workspace.shape)} with stride {stride}"
        )
    return workspace[rank, local : local + length].view(dtype).view(*leading_shape, -1)


__all__ = [
    "MOE_A2A_RANK_MASK_WORDS",
    "moe_a2a_active_rank_mask",
    "moe_a2a_combine",
    "moe_a2a_dispatch",
    "moe_a2a_get_aux_data_size",
    "moe_a2a_get_metainfo_index_pairs",
    "moe_a2a_get_workspace_size_per_rank",
    "moe_a2a_initialize",
    "moe_a2a_sanitize_expert_ids",
    "moe_a2a_wrap_payload_tensor_in_workspace",
]
