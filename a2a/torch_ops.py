"""Dispatch, combine and sanitize as torch custom ops (`torch.ops.a2a.*`), for torch.compile and CUDA graphs.

`import a2a.torch_ops` registers three operators; the functions below are the thin wrappers to
call (same argument order as the functional API, `a2a.functional`):

    a2a::dispatch(Tensor token_selected_experts, Tensor[] input_payloads, Tensor(a!) workspace,
                  SymInt ep_size, SymInt max_num_tokens, SymInt runtime_max_tokens_per_rank,
                  SymInt ep_rank, SymInt top_k, SymInt num_experts,
                  SymInt? invalid_token_expert_id, SymInt? expert_id_payload_index) -> ()
    a2a::combine(Tensor payload, SymInt local_num_tokens, Tensor(a!) workspace, SymInt ep_size,
                 SymInt max_num_tokens, SymInt runtime_max_tokens_per_rank, SymInt ep_rank,
                 SymInt top_k, SymInt combine_payload_offset, bool payload_in_workspace) -> Tensor
    a2a::sanitize_expert_ids(Tensor(a!) expert_ids, Tensor workspace, SymInt ep_size,
                             SymInt max_num_tokens, SymInt ep_rank, SymInt invalid_expert_id) -> ()

Why the wrappers build dispatch's views. A custom op may not return an alias of its inputs, yet
dispatch's results are views into the workspace. So `a2a::dispatch` declares that it writes
`workspace` and returns nothing, and the wrapper builds the receive views with plain view ops
(slice, `view(dtype)`, `view`) at the offsets of the round layout, which are pure integer
arithmetic. Functionalization then sees "an op produced a new workspace value; views of that value
were taken": sound, with no alias crossing an op boundary, and returning the views from a compiled
region works like returning any view of an input. Combine returns a fresh tensor and declares the
workspace written (signals, combine plane). The geometry travels as two ints (`ep_size`,
`max_num_tokens` determine the whole metainfo) because the views need the offsets while tracing,
when a tensor's values are unknown; the ops rebuild the metainfo tensor from them.

The workspace must never be copied. Peers write into this rank's segment and wait on flags at its
real address, so an op run on a copy never completes its round (CUDA: a stall until the device
timeout; CPU: `A2ATimeoutError`), and a copy written back would clobber what peers wrote meanwhile.
Functionalization does copy a mutated input unless the backend re-inplaces the op: inductor does
(its generated code calls the op on the workspace itself), `aot_eager` does not, so compile with
inductor and keep every workspace write inside these ops:
- pass the workspace itself into a compiled region, never a view of it;
- sanitize the receive plane with `dispatch(..., invalid_token_expert_id=...)`, not with
  `sanitize_expert_ids` on a receive view, and do not write into receive or combine planes;
- combine a payload outside the workspace (`payload_in_workspace=False`: the op stages it);
- read the receive views before the combine that ends their lifetime.
In eager mode and under CUDA graph capture the ops run directly on their arguments, with the
freedom of the functional API.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from a2a.ops import validation
from a2a.functional import moe_a2a_combine, moe_a2a_dispatch, moe_a2a_sanitize_expert_ids
from a2a.layout import WorkspaceLayout
from a2a.workspace import segment_view

# (ep_size, max_num_tokens) -> metainfo. The functional ops only read it, so one tensor per
# geometry is shared instead of building one per call on the hot path.
_metainfo_by_geometry: dict[tuple[int, int], torch.Tensor] = {}


def _metainfo_of(ep_size: int, max_num_tokens: int) -> torch.Tensor:
    key = (ep_size, max_num_tokens)
    metainfo = _metainfo_by_geometry.get(key)
    if metainfo is None:
        metainfo = _metainfo_by_geometry[key] = WorkspaceLayout.compute(ep_size, max_num_tokens).to_metainfo()
    return metainfo


def _check_expert_id_payload(
    input_payloads: Sequence[torch.Tensor], invalid_token_expert_id: int | None, expert_id_payload_index: int | None
) -> None:
    if invalid_token_expert_id is None:
        return
    if expert_id_payload_index is None:
        raise ValueError("expert_id_payload_index is required when invalid_token_expert_id is given")
    validation.require_int("expert_id_payload_index", expert_id_payload_index, 0, len(input_payloads) - 1)


@torch.library.custom_op("a2a::dispatch", mutates_args=("workspace",))
def _dispatch_op(
    token_selected_experts: torch.Tensor,
    input_payloads: list[torch.Tensor],
    workspace: torch.Tensor,
    ep_size: int,
    max_num_tokens: int,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    top_k: int,
    num_experts: int,
    invalid_token_expert_id: int | None,
    expert_id_payload_index: int | None,
) -> None:
    """`moe_a2a_dispatch` (+ sanitize of one receive plane); writes this and the peers' segments."""
    _check_expert_id_payload(input_payloads, invalid_token_expert_id, expert_id_payload_index)
    if invalid_token_expert_id is not None and input_payloads[expert_id_payload_index].dtype != torch.int32:
        # Checked before anything is enqueued: a failing sanitize after the dispatch would leave
        # the round half done on this rank.
        raise ValueError(
            f"input_payloads[{expert_id_payload_index}] (the expert-id payload) must be int32, "
            f"got {input_payloads[expert_id_payload_index].dtype}"
        )
    metainfo = _metainfo_of(ep_size, max_num_tokens)
    recv, _, _ = moe_a2a_dispatch(
        token_selected_experts, input_payloads, workspace, metainfo, runtime_max_tokens_per_rank, ep_rank, ep_size,
        top_k, num_experts,
    )  # fmt: skip
    if invalid_token_expert_id is not None:
        ids = recv[expert_id_payload_index]
        moe_a2a_sanitize_expert_ids(ids, workspace, metainfo, ep_rank, invalid_token_expert_id)


@_dispatch_op.register_fake
def _dispatch_fake(
    token_selected_experts, input_payloads, workspace, ep_size, max_num_tokens, runtime_max_tokens_per_rank,
    ep_rank, top_k, num_experts, invalid_token_expert_id, expert_id_payload_index,
) -> None:  # fmt: skip
    return None


@torch.library.custom_op("a2a::combine", mutates_args=("workspace",))
def _combine_op(
    payload: torch.Tensor,
    local_num_tokens: int,
    workspace: torch.Tensor,
    ep_size: int,
    max_num_tokens: int,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    top_k: int,
    combine_payload_offset: int,
    payload_in_workspace: bool,
) -> torch.Tensor:
    """`moe_a2a_combine` into a fresh `[local_num_tokens, hidden]` tensor of the payload's dtype."""
    return moe_a2a_combine(
        payload, local_num_tokens, workspace, _metainfo_of(ep_size, max_num_tokens), runtime_max_tokens_per_rank,
        ep_rank, ep_size, top_k, combine_payload_offset, payload_in_workspace,
    )  # fmt: skip


@_combine_op.register_fake
def _combine_fake(
    payload, local_num_tokens, workspace, ep_size, max_num_tokens, runtime_max_tokens_per_rank, ep_rank, top_k,
    combine_payload_offset, payload_in_workspace,
) -> torch.Tensor:  # fmt: skip
    return payload.new_empty((local_num_tokens, payload.shape[2]))


@torch.library.custom_op("a2a::sanitize_expert_ids", mutates_args=("expert_ids",))
def _sanitize_op(
    expert_ids: torch.Tensor,
    workspace: torch.Tensor,
    ep_size: int,
    max_num_tokens: int,
    ep_rank: int,
    invalid_expert_id: int,
) -> None:
    """`moe_a2a_sanitize_expert_ids`: writes `expert_ids` only; reads this round's recv_counters."""
    metainfo = _metainfo_of(ep_size, max_num_tokens)
    moe_a2a_sanitize_expert_ids(expert_ids, workspace, metainfo, ep_rank, invalid_expert_id)


@_sanitize_op.register_fake
def _sanitize_fake(expert_ids, workspace, ep_size, max_num_tokens, ep_rank, invalid_expert_id) -> None:
    return None


def _layout_of(metainfo: torch.Tensor | WorkspaceLayout) -> WorkspaceLayout:
    if isinstance(metainfo, WorkspaceLayout):
        return metainfo
    if torch.compiler.is_compiling():
        raise TypeError(
            "under torch.compile pass the WorkspaceLayout (WorkspaceLayout.from_metainfo(metainfo), computed "
            "outside the compiled region) instead of the metainfo tensor: its values are unknown while tracing"
        )
    return WorkspaceLayout.from_metainfo(metainfo)


def dispatch(
    token_selected_experts: torch.Tensor,
    input_payloads: Sequence[torch.Tensor],
    workspace: torch.Tensor,
    metainfo: torch.Tensor | WorkspaceLayout,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    num_experts: int,
    *,
    invalid_token_expert_id: int | None = None,
    expert_id_payload_index: int | None = None,
) -> tuple[list[torch.Tensor], int]:
    """`a2a.moe_a2a_dispatch` through `torch.ops.a2a.dispatch`, optionally sanitizing the expert ids.

    token_selected_experts: `[num_tokens, top_k]` int32; input_payloads: 1..8 contiguous
    `[num_tokens, W_p]` tensors; workspace: `[ep_size, size_per_rank]` uint8; metainfo: the CPU int64
    tensor of `moe_a2a_initialize` or its `WorkspaceLayout` (required under torch.compile). With
    `invalid_token_expert_id`, receive plane `expert_id_payload_index` (an int32 payload) gets that id
    in its stale rows, as `MoeAlltoAll.dispatch` does.

    Returns one `[ep_size, runtime_max_tokens_per_rank, W_p]` view per payload into this rank's
    receive planes (row `[s][j]`: the j-th token source s sent here) and the segment-relative byte
    offset of this round's combine plane. Runs on the current (or activated rank) stream without
    waiting; the rows have landed when the stream reaches the end of the op, and the views stay
    valid until this rank's next combine starts (so, inside one compiled region, read them before
    the combine).
    """
    layout = _layout_of(metainfo)
    torch.ops.a2a.dispatch(
        token_selected_experts, list(input_payloads), workspace, ep_size, layout.max_num_tokens,
        runtime_max_tokens_per_rank, ep_rank, top_k, num_experts, invalid_token_expert_id, expert_id_payload_index,
    )  # fmt: skip
    round_layout = layout.round_layout(
        runtime_max_tokens_per_rank, [payload.shape[1] * payload.element_size() for payload in input_payloads]
    )
    recv = [
        segment_view(
            workspace, ep_rank, offset, payload.dtype, (ep_size, runtime_max_tokens_per_rank, payload.shape[1])
        )
        for offset, payload in zip(round_layout.recv_plane_offsets, input_payloads)
    ]
    return recv, round_layout.combine_offset


def combine(
    payload: torch.Tensor,
    local_num_tokens: int,
    workspace: torch.Tensor,
    metainfo: torch.Tensor | WorkspaceLayout,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    combine_payload_offset: int,
    payload_in_workspace: bool = False,
) -> torch.Tensor:
    """`a2a.moe_a2a_combine` through `torch.ops.a2a.combine`: a fresh `[local_num_tokens, hidden]` tensor.

    payload: `[ep_size, runtime_max_tokens_per_rank, hidden]` fp16/bf16/fp32 expert outputs, already
    weighted; with `payload_in_workspace=True` it must be this rank's combine plane (eager and CUDA
    graphs only: a compiled region that takes or writes a view of the workspace is refused by
    aot_autograd or copies the workspace). The integers must be those of the matching dispatch.
    Runs on the current (or activated rank) stream; the result is valid once the stream reaches the
    end of the op.
    """
    layout = _layout_of(metainfo)
    if payload_in_workspace and torch.compiler.is_compiling():
        raise ValueError(
            "payload_in_workspace=True is not supported inside torch.compile: pass the expert output tensor "
            "itself (payload_in_workspace=False) and combine stages it into the workspace"
        )
    return torch.ops.a2a.combine(
        payload, local_num_tokens, workspace, ep_size, layout.max_num_tokens, runtime_max_tokens_per_rank, ep_rank,
        top_k, combine_payload_offset, payload_in_workspace,
    )  # fmt: skip


def sanitize_expert_ids(
    expert_ids: torch.Tensor,
    workspace: torch.Tensor,
    metainfo: torch.Tensor | WorkspaceLayout,
    ep_rank: int,
    invalid_expert_id: int,
) -> None:
    """`a2a.moe_a2a_sanitize_expert_ids` through `torch.ops.a2a.sanitize_expert_ids`, in place.

    expert_ids: `[ep_size, rt, top_k]` int32; rows `(s, j)` with `j >= recv_counters[s]` get
    `invalid_expert_id`. Call it on the dispatch's stream between dispatch and combine. Inside a
    compiled region `expert_ids` must not be a view of the workspace (use `dispatch(...,
    invalid_token_expert_id=...)` for the receive plane).
    """
    layout = _layout_of(metainfo)
    torch.ops.a2a.sanitize_expert_ids(
        expert_ids, workspace, layout.ep_size, layout.max_num_tokens, ep_rank, invalid_expert_id
    )


__all__ = ["combine", "dispatch", "sanitize_expert_ids"]
