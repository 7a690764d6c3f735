"""The workspace layout: every region of a rank's workspace segment, computed in one place.

A workspace is a uint8 matrix `[ep_size, size_per_rank]` (row stride may exceed `size_per_rank`);
segment `r` belongs to rank `r` and every rank can address every segment. All offsets here are
byte offsets relative to a segment start and are identical in every segment.

Aux region (static for a given `(ep_size, max_num_tokens)`), each field 128-byte aligned:

| field | type, shape | written by | read by |
|---|---|---|---|
| send_counters | i32 [ep] | own routing (last program) | host / tests |
| recv_counters | i32 [ep] | source `s` writes `[s]` remotely (routing, last program) | own sanitize, combine staging |
| dispatch_flags | i32 [ep] | peer `s` stores its epoch into `[s]` after its dispatch copy | own copy kernel's last program (or the host) |
| combine_flags | i32 [ep] | peer `s` stores its epoch into `[s]` once its combine plane is ready | own combine barrier |
| gather_flags | i32 [ep] | peer `s` stores its gather count into `[s]` after its gather | own routing's last program (or every program of a fused dispatch), before this rank's next dispatch writes |
| signatures | i32 [2, ep, SIGNATURE_WORDS] | peer `s` stores its round's signature into `[phase][s]` before its flag | own dispatch barrier, own gather (compared with its own) |
| round_state | i32 [32] | own kernels | see `RoundState`: election counters, the fused combine's gate and the fused dispatch's trouble words (self-resetting), invalid count, epoch and gather counters, fault record |
| topk_target_ranks | i32 [max_num_tokens * top_k] | own routing | own combine |
| topk_send_indices | i32 [max_num_tokens * top_k] | own dispatch copy | own combine |
| topk_local_slots | i32 [max_num_tokens * top_k] | own routing (slot inside its token block) | own dispatch copy |
| block_counts | i32 [num_route_blocks, ep] | own routing: per-block counts, then exclusive offsets | own dispatch copy |
| block_invalid | i32 [num_route_blocks] | own routing | own routing (last program) |
| eplb_stats | i32 [ep, eplb_stats_num_experts] | source `s` writes its local EPLB statistics into `[s]` remotely (a dispatch given `eplb_local_stats`) | the caller (`eplb_gathered_stats`) |

The three flag arrays are consecutive, `flag_array_stride` int32 apart (see a2a.runtime.protocol
for what their values mean, poison included).

The top-k arrays reserve `MAX_TOP_K` entries per token but are indexed with the runtime `top_k`
as row stride: entry `(token i, k)` sits at element `i * top_k + k`.

Payload region (per round: depends on `runtime_max_tokens_per_rank` and the payload list):
receive plane `p` is `[ep, rt, bytes_p]` (row `source * rt + slot`), planes in payload order,
then the combine plane `[ep, rt, combine_bytes]`, each starting on the next PLANE_START_ALIGN
(4096-byte) boundary: any 16-byte boundary makes the widest vector copy legal, and 4096-byte
ones keep the copies at their speed (a2a.runtime.alignment.SEGMENT_ALIGN says by how much).

Because the planes move with the round's geometry, a round's receive planes may cover bytes that
were the previous round's combine plane. That is safe because a rank's dispatch writes only after
every peer has finished gathering the previous round (the gather flags; see
a2a.kernels.signal._await_previous_gathers), and a peer's combine plane is read only after its
combine barrier, which follows every peer's dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from a2a.runtime.alignment import SEGMENT_ALIGN, align_up
from a2a.runtime.protocol import FAULT_RECORD_WORDS, SIGNATURE_WORDS

MAX_RANKS = 64
MAX_TOP_K = 22
MAX_PAYLOADS = 8
# Tokens handled by one routing program; the per-block scratch is sized by it.
ROUTE_BLOCK_TOKENS = 64
REGION_ALIGN = 128
# A plane offset a caller passes (combine_payload_offset) must be a multiple of this (16-byte vectors).
PLANE_ALIGN = 16
# Where this layout starts each plane: segments start on SEGMENT_ALIGN boundaries (every world's
# allocator), so planes at these offsets are 4096-byte aligned in memory.
PLANE_START_ALIGN = SEGMENT_ALIGN
# Counted in `aux_data_size` though the payload begins before it: what starting up to MAX_PAYLOADS
# receive planes and the combine plane on PLANE_START_ALIGN boundaries can add to a round, so
# FlashInfer's sizing formula (aux + payloads + combine, each padded to 128) always fits.
ALIGNMENT_RESERVE = PLANE_START_ALIGN * (MAX_PAYLOADS + 1)



class RoundState:
    """Indices of the int32 words of a segment's `round_state` region (own rank only)."""

    ROUTE_ELECTION = 0  # routing programs finished this round; the last one resets it to 0
    INVALID_COUNT = 1  # (token, k) pairs skipped in the last dispatch for an id outside [0, num_experts)
    FLAG_VALUE = 2  # epoch counter: +1 per signalled phase (dispatch, combine), 31 bits, never reset
    COPY_ELECTION = 3  # dispatch copy programs finished this round; the last one resets it to 0
    GATHER_ELECTION = 4  # gather programs finished this round (all but the last, which resets it to 0)
    GATHER_COUNT = 5  # gathers finished by this rank (31 bits, never reset): its gather-flag epoch
    DISPATCH_ROWS = 6  # token rows of this rank's last dispatch (its combine must have as many)
    DISPATCH_RT = 7  # runtime_max_tokens_per_rank of this rank's last dispatch (its combine's too)
    FAULT_RECORD = 8  # FAULT_RECORD_WORDS words: the first fault this rank recorded (a2a.runtime.protocol)
    GATHERED_MASK = 24  # 2 words: the active-rank mask of this rank's last gather (bits 0..31, 32..63)
    COMBINE_ARRIVALS = 26  # programs of a fused combine that have started; its last program resets it to 0
    COMBINE_GATE = 27  # 1 once a fused combine's barrier program has let its gather read; reset to 0 with it
    # 4 words: ranks a fused dispatch's programs saw poisoned (bits 0..31, 32..63) or missing (same)
    # in their wait for the previous gathers; its last program records them as a fault and clears them
    ORDERING_TROUBLE = 28


ROUND_STATE_LEN = 32
assert RoundState.FAULT_RECORD + FAULT_RECORD_WORDS <= RoundState.GATHERED_MASK < RoundState.COMBINE_ARRIVALS - 1
assert RoundState.COMBINE_GATE < RoundState.ORDERING_TROUBLE and RoundState.ORDERING_TROUBLE + 4 <= ROUND_STATE_LEN


def num_route_blocks(num_tokens: int) -> int:
    """Routing programs for `num_tokens` local tokens (at least one, so zero-token ranks publish)."""
    return max(1, (num_tokens + ROUTE_BLOCK_TOKENS - 1) // ROUTE_BLOCK_TOKENS)


@dataclass(frozen=True)
class RoundLayout:
    """Where one round's payload planes lie inside a segment (byte offsets, segment-relative)."""

    runtime_max_tokens: int
    recv_plane_offsets: tuple[int, ...]
    recv_plane_sizes: tuple[int, ...]
    combine_offset: int

    def combine_end(self, ep_size: int, combine_bytes_per_token: int) -> int:
        return self.combine_offset + ep_size * self.runtime_max_tokens * combine_bytes_per_token


def combine_scales_offset(combine_offset: int, ep_size: int, runtime_max_tokens: int, row_bytes: int) -> int:
    """Where the fp32 `[ep_size, rt, 1]` scales of a quantized (fp8) combine plane start: the next
    16-byte boundary after the plane of `row_bytes` rows."""
    return align_up(combine_offset + ep_size * runtime_max_tokens * row_bytes, PLANE_ALIGN)


@dataclass(frozen=True)
class WorkspaceLayout:
    """Static regions of a segment for `(ep_size, max_num_tokens)`; see the module docstring."""

    ep_size: int
    max_num_tokens: int
    send_counters_offset: int
    recv_counters_offset: int
    dispatch_flags_offset: int
    combine_flags_offset: int
    gather_flags_offset: int
    signatures_offset: int
    round_state_offset: int
    topk_target_ranks_offset: int
    topk_send_indices_offset: int
    topk_local_slots_offset: int
    block_counts_offset: int
    block_invalid_offset: int
    eplb_stats_offset: int
    payload_offset: int
    eplb_stats_num_experts: int = 0

    @classmethod
    def compute(cls, ep_size: int, max_num_tokens: int, eplb_stats_num_experts: int = 0) -> WorkspaceLayout:
        if not 1 <= ep_size <= MAX_RANKS:
            raise ValueError(f"ep_size must be in [1, {MAX_RANKS}], got {ep_size}")
        if max_num_tokens < 1:
            raise ValueError(f"max_num_tokens must be >= 1, got {max_num_tokens}")
        if isinstance(eplb_stats_num_experts, bool) or not isinstance(eplb_stats_num_experts, int) \
                or eplb_stats_num_experts < 0:
            raise ValueError(f"eplb_stats_num_experts must be an int >= 0 (0: no EPLB statistics), got "
                             f"{eplb_stats_num_experts!r}")
        topk_bytes = 4 * max_num_tokens * MAX_TOP_K
        max_blocks = num_route_blocks(max_num_tokens)
        sizes = [
            ("send_counters_offset", 4 * ep_size),
            ("recv_counters_offset", 4 * ep_size),
            ("dispatch_flags_offset", 4 * ep_size),  # the three flag arrays: equal sizes, consecutive
            ("combine_flags_offset", 4 * ep_size),
            ("gather_flags_offset", 4 * ep_size),
            ("signatures_offset", 4 * 2 * ep_size * SIGNATURE_WORDS),
            ("round_state_offset", 4 * ROUND_STATE_LEN),
            ("topk_target_ranks_offset", topk_bytes),
            ("topk_send_indices_offset", topk_bytes),
            ("topk_local_slots_offset", topk_bytes),
            ("block_counts_offset", 4 * max_blocks * ep_size),
            ("block_invalid_offset", 4 * max_blocks),
            ("eplb_stats_offset", 4 * ep_size * eplb_stats_num_experts),
        ]
        offsets: dict[str, int] = {}
        cursor = 0
        for name, size in sizes:
            offsets[name] = cursor
            cursor = align_up(cursor + size, REGION_ALIGN)
        return cls(ep_size=ep_size, max_num_tokens=max_num_tokens, payload_offset=cursor,
                   eplb_stats_num_experts=eplb_stats_num_experts, **offsets)

    @property
    def aux_size(self) -> int:
        return self.payload_offset

    @property
    def flag_array_stride(self) -> int:
        """int32 elements between two consecutive flag arrays (dispatch, combine, gather)."""
        return (self.combine_flags_offset - self.dispatch_flags_offset) // 4

    def signatures_offset_of(self, phase_index: int) -> int:
        """Byte offset of phase `phase_index`'s (0: dispatch, 1: combine) `[ep, SIGNATURE_WORDS]` rows."""
        return self.signatures_offset + 4 * phase_index * self.ep_size * SIGNATURE_WORDS

    def round_layout(
        self, runtime_max_tokens: int, dispatch_bytes_per_token: Sequence[int]
    ) -> RoundLayout:
        """Receive planes and the combine plane for one round."""
        offsets, sizes = [], []
        cursor = self.payload_offset
        for row_bytes in dispatch_bytes_per_token:
            size = self.ep_size * runtime_max_tokens * row_bytes
            offsets.append(align_up(cursor, PLANE_START_ALIGN))
            sizes.append(size)
            cursor = offsets[-1] + size
        return RoundLayout(
            runtime_max_tokens=runtime_max_tokens,
            recv_plane_offsets=tuple(offsets),
            recv_plane_sizes=tuple(sizes),
            combine_offset=align_up(cursor, PLANE_START_ALIGN),
        )

    # The metainfo tensor: the same facts as this dataclass, as the CPU int64 tensor the
    # FlashInfer-style functional API passes around.
    def to_metainfo(self) -> torch.Tensor:
        """The layout as the CPU int64 `[len(METAINFO_FIELDS)]` metainfo tensor."""
        return torch.tensor([getattr(self, name) for name in METAINFO_FIELDS], dtype=torch.int64)

    @classmethod
    def from_metainfo(cls, metainfo: torch.Tensor) -> WorkspaceLayout:
        if not isinstance(metainfo, torch.Tensor):
            raise TypeError(f"metainfo must be a torch.Tensor, got {type(metainfo).__name__}")
        if metainfo.device.type != "cpu" or metainfo.dtype != torch.int64 or metainfo.shape != (
            len(METAINFO_FIELDS),
        ):
            raise ValueError(
                f"metainfo must be a CPU int64 tensor of shape ({len(METAINFO_FIELDS)},) as returned by "
                f"moe_a2a_initialize, got {metainfo.device.type} {metainfo.dtype} {tuple(metainfo.shape)}"
            )
        values = dict(zip(METAINFO_FIELDS, metainfo.tolist()))
        layout = cls.compute(values["ep_size"], values["max_num_tokens"], values["eplb_stats_num_experts"])
        if layout.to_metainfo().tolist() != metainfo.tolist():
            raise ValueError("metainfo does not describe a layout of this a2a version (recreate it with moe_a2a_initialize)")
        return layout


METAINFO_FIELDS: tuple[str, ...] = (
    "ep_size",
    "max_num_tokens",
    "send_counters_offset",
    "recv_counters_offset",
    "dispatch_flags_offset",
    "combine_flags_offset",
    "gather_flags_offset",
    "signatures_offset",
    "round_state_offset",
    "topk_target_ranks_offset",
    "topk_send_indices_offset",
    "topk_local_slots_offset",
    "block_counts_offset",
    "block_invalid_offset",
    "eplb_stats_offset",
    "payload_offset",
    "eplb_stats_num_experts",
)


def metainfo_index_pairs() -> list[tuple[str, int]]:
    """(name, index) of every metainfo entry, names as `MOE_A2A_<FIELD>_INDEX`."""
    return [(f"MOE_A2A_{name.upper()}_INDEX", i) for i, name in enumerate(METAINFO_FIELDS)]


def aux_data_size(ep_size: int, max_num_tokens: int, eplb_stats_num_experts: int = 0) -> int:
    """Bytes of the aux region (where payload data begins in every segment) plus ALIGNMENT_RESERVE:
    the per-rank size of a workspace for zero payloads, as in FlashInfer."""
    return WorkspaceLayout.compute(ep_size, max_num_tokens, eplb_stats_num_experts).aux_size + ALIGNMENT_RESERVE


def workspace_size_per_rank(
    ep_size: int,
    max_num_tokens: int,
    total_dispatch_payload_size_per_token: int | Sequence[int],
    combine_payload_size_per_token: int,
    eplb_stats_num_experts: int = 0,
) -> int:
    """Bytes each rank's segment needs for rounds of up to `max_num_tokens` tokens per rank.

    `total_dispatch_payload_size_per_token` is either the summed bytes per token of all dispatch
    payloads: FlashInfer's formula, `aux_data_size` + the dispatch planes + the combine plane, each
    padded to 128 bytes (the aux size counts what the planes' alignment needs), or the list of each
    payload's bytes per token (exact, never larger).
    """
    aux = aux_data_size(ep_size, max_num_tokens, eplb_stats_num_experts)
    combine = align_up(ep_size * max_num_tokens * combine_payload_size_per_token, REGION_ALIGN)
    if isinstance(total_dispatch_payload_size_per_token, int):
        dispatch = ep_size * max_num_tokens * total_dispatch_payload_size_per_token
        return align_up(aux, REGION_ALIGN) + align_up(dispatch, REGION_ALIGN) + combine
    layout = WorkspaceLayout.compute(ep_size, max_num_tokens, eplb_stats_num_experts)
    round_layout = layout.round_layout(max_num_tokens, list(total_dispatch_payload_size_per_token))
    return round_layout.combine_offset + combine
