"""Launch arguments of the cross-rank protocol (a2a.kernels.signal) for one rank, and round signatures.

Every kernel that signals, waits or must stop after a fault takes some of the same pointers: the
flag block, the round-state words, the fault record and its host-mapped copy, the timeout. They
are built here once per rank and call signature. A round's signature (a2a.runtime.protocol) is a
small int32 device tensor per plan: the same words on every rank that agrees on the round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from a2a.ops import configs
from a2a.layout import RoundState
from a2a.runtime.protocol import (
    COMBINE_SIGNATURE_FIELDS,
    DISPATCH_SIGNATURE_FIELDS,
    MAX_SIGNATURE_PAYLOADS,
    SIGNATURE_WORDS,
    Phase,
    dtype_code,
    mask_halves,
)
from a2a.ops.context import timeout_of_plan
from a2a.workspace import RankWorkspace


def _code(dtype: torch.dtype) -> int:
    return dtype_code(str(dtype).removeprefix("torch."))


def _word(value: int) -> int:
    """A signature word of a non-negative field: its low 31 bits (every such field fits; the
    combine offset is split in two words; the rank-mask halves are stored as they are)."""
    return value & 0x7FFFFFFF


def dispatch_signature(runtime_max_tokens: int, max_num_tokens: int, top_k: int, num_experts: int,
                       payloads: Sequence[torch.Tensor], active_rank_mask: int, eplb_stats_num_experts: int = 0,
                       shares_stats: bool = False) -> list[int]:  # fmt: skip
    """The words of protocol.DISPATCH_SIGNATURE_FIELDS for this rank's round."""
    row_bytes = [p.shape[1] * p.element_size() for p in payloads] + [0] * (MAX_SIGNATURE_PAYLOADS - len(payloads))
    dtypes = [_code(p.dtype) for p in payloads] + [0] * (MAX_SIGNATURE_PAYLOADS - len(payloads))
    words = [_word(w) for w in (runtime_max_tokens, max_num_tokens, top_k, num_experts, len(payloads))]
    words += [*mask_halves(active_rank_mask), *(_word(w) for w in row_bytes + dtypes), _word(eplb_stats_num_experts),
              int(shares_stats)]  # fmt: skip
    assert len(words) == len(DISPATCH_SIGNATURE_FIELDS)
    return words


def combine_signature(runtime_max_tokens: int, max_num_tokens: int, top_k: int, payload: torch.Tensor,
                      combine_offset: int, has_scales: bool, active_rank_mask: int) -> list[int]:  # fmt: skip
    """The words of protocol.COMBINE_SIGNATURE_FIELDS for this rank's round."""
    words = [_word(w) for w in (runtime_max_tokens, max_num_tokens, top_k, payload.shape[2] * payload.element_size(),
                                _code(payload.dtype), combine_offset, combine_offset >> 31, int(has_scales))]  # fmt: skip
    words += mask_halves(active_rank_mask)
    assert len(words) == len(COMBINE_SIGNATURE_FIELDS)
    return words


# Signature tensors are never freed: a CUDA graph captured with one keeps its address for as long
# as it is replayed, longer than the plan that made it may live. A few hundred bytes per distinct
# round geometry (rt included).
_signatures: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}


def signature_tensor(words: Sequence[int], device: torch.device) -> torch.Tensor:
    """The int32 `[SIGNATURE_WORDS]` device tensor of `words` (zero-padded), one per distinct value."""
    padded = tuple(words) + (0,) * (SIGNATURE_WORDS - len(words))
    key = (str(device), padded)
    tensor = _signatures.get(key)
    if tensor is None:
        tensor = _signatures[key] = torch.tensor(padded, dtype=torch.int32, device=device)
    return tensor


def protocol_constexprs(rank_workspace: RankWorkspace, wait_in_kernel: bool) -> dict[str, Any]:
    """Constexprs every protocol kernel takes (those of a given kernel are picked by name)."""
    return dict(
        EP_SIZE=rank_workspace.ep_size,
        EP_PAD=configs.rank_pad(rank_workspace.ep_size),
        FLAG_ARRAY_STRIDE=rank_workspace.layout.flag_array_stride,
        SIGNATURE_WORDS=SIGNATURE_WORDS,
        WAIT=wait_in_kernel,
        HAS_HOST_RECORD=rank_workspace.state.host_record is not None,
    )


def barrier_args(rank_workspace: RankWorkspace, phase: Phase, own_signature: torch.Tensor,
                 active_rank_mask: int) -> tuple:  # fmt: skip
    """(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
    host_record_ptr, timeout_ns, timeout_ms, active_low, active_high): `_phase_barrier`'s pointers."""
    timeout_ns, timeout_ms = timeout_of_plan()
    return (rank_workspace.round_word(RoundState.FLAG_VALUE), rank_workspace.flag_block_every_rank,
            rank_workspace.signatures_every_rank(phase), own_signature, rank_workspace.stride_rank,
            rank_workspace.fault_record, rank_workspace.host_record_address, timeout_ns, timeout_ms,
            *mask_halves(active_rank_mask))  # fmt: skip
