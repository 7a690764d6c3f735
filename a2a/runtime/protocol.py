"""The signalling vocabulary: phases, flag values, fault records and round signatures.

One place for every number the cross-rank protocol writes into a workspace. The kernels receive
these as constexpr launch arguments (they import nothing of a2a), the host waits of the CPU path
use them directly, and `a2a.runtime.faults` decodes a fault record with them.

Flags. Every segment holds three flag arrays `int32 [ep_size]`, one per `FlagArray`, each written
only by peers: word `[s]` is rank s's latest value. Values are epochs from a counter of the
writing rank (`FLAG_EPOCH_MASK`: 31 bits, wrapping), so a waiter compares for equality and nothing
is ever reset; `FLAG_POISON` (negative) means "rank s has failed: consume nothing of it".

Faults. A rank records at most one fault (the first) in its own segment (`FaultRecord` words; a
host-mapped copy on CUDA). From then on it makes no remote store for the rest of the workspace's
life, except the poison it publishes into flags[me] of every peer's three arrays at the moment it
records, so every peer that waits on it records `PEER_FAILED` in turn instead of consuming stale
data. Its later gathers write NaN rows; the host raises the decoded error at the rank's next call.

Signatures. With each dispatch and combine signal a rank stores `SIGNATURE_WORDS` int32 words
describing its round (fields below) into `signatures[phase][me]` of every peer; each rank
compares every peer's words with its own before using any of their data: the dispatch waiter
after its wait, the combine's gather before it stores anything of theirs (its loads in flight).
"""

from __future__ import annotations

import enum

FLAG_EPOCH_MASK = 0x7FFFFFFF
FLAG_POISON = -1
# A top-k entry of a lost round: the combine barrier writes it into every entry of the combine's
# rows after a fault, so the gather loads no peer row and writes NaN (-1 is "not sent").
TOPK_TARGET_LOST = -2


class FlagArray(enum.IntEnum):
    """Row of a segment's `[3, ep_size]` flag block (rows `flag_array_stride` int32 apart)."""

    DISPATCH = 0  # peer s: "my rows and recv_counters have landed in your segment" (epoch of its flag_value)
    COMBINE = 1  # peer s: "my combine plane is ready to be gathered" (epoch of its flag_value)
    GATHER = 2  # peer s: "I finished gathering from every combine plane" (epoch of its gather_count)


class Phase(enum.IntEnum):
    """What a wait was for; recorded in a fault and named by the error."""

    DISPATCH = 1  # end of dispatch: every peer's rows have landed
    COMBINE = 2  # start of combine: every peer's combine plane is ready
    ORDERING = 3  # start of dispatch: every peer finished gathering the previous round (a peer may
    #               still read the combine planes this round's receive planes could overlap)


PHASE_NAMES = {Phase.DISPATCH: "dispatch", Phase.COMBINE: "combine",
               Phase.ORDERING: "dispatch (waiting for the previous round's gathers)"}  # fmt: skip


class FaultKind(enum.IntEnum):
    TIMEOUT = 1  # ranks_* = peers whose signal did not arrive within the timeout
    PEER_FAILED = 2  # ranks_* = peers that published FLAG_POISON (they recorded a fault first)
    MISMATCH = 3  # ranks_* = peers whose round signature differs from this rank's
    ROUND_MISMATCH = 4  # this rank's combine differs from its own dispatch (FIRST_FIELD: COMBINE_CHECK_FIELDS)


class FaultRecord(enum.IntEnum):
    """Word indices of a fault record (int32). PHASE is written last: non-zero means recorded."""

    PHASE = 0
    KIND = 1
    RANKS_LOW = 2  # ranks 0..31 as a bit mask
    RANKS_HIGH = 3  # ranks 32..63
    FIELDS = 4  # MISMATCH: bit w set when signature word w differs for some peer
    FIRST_RANK = 5  # MISMATCH: the lowest disagreeing rank
    OWN_VALUE = 6  # MISMATCH: this rank's value of word FIRST_FIELD
    PEER_VALUE = 7  # MISMATCH: FIRST_RANK's value of word FIRST_FIELD
    AWAITED = 8  # the flag value waited for
    TIMEOUT_MS = 9  # the wait's bound, milliseconds
    FIRST_FIELD = 10  # MISMATCH: the lowest signature word in which FIRST_RANK differs
    MISSING_LOW = 11  # PEER_FAILED: peers whose signal had not arrived either, ranks 0..31
    MISSING_HIGH = 12  # ranks 32..63


FAULT_RECORD_WORDS = 16

SIGNATURE_WORDS = 32
MAX_SIGNATURE_PAYLOADS = 8

# Word w of a phase's signature. Every rank must agree on every word; a difference is a MISMATCH
# naming the field. Unused words are 0.
DISPATCH_SIGNATURE_FIELDS: tuple[str, ...] = (
    "runtime_max_tokens_per_rank",
    "max_num_tokens",
    "top_k",
    "num_experts",
    "number of payloads",
    "active_rank_mask (ranks 0..31)",
    "active_rank_mask (ranks 32..63)",
    *(f"input_payloads[{p}] bytes per token" for p in range(MAX_SIGNATURE_PAYLOADS)),
    *(f"input_payloads[{p}] dtype" for p in range(MAX_SIGNATURE_PAYLOADS)),
    "eplb_stats_num_experts (of the workspace)",
    "eplb_local_stats given (0 or 1)",
)
COMBINE_SIGNATURE_FIELDS: tuple[str, ...] = (
    "runtime_max_tokens_per_rank",
    "max_num_tokens",
    "top_k",
    "combine payload bytes per token",
    "combine payload dtype",
    "combine_payload_offset (bits 0..30)",
    "combine_payload_offset (bits 31..61)",
    "payload_scales (0 or 1)",
    "active_rank_mask (ranks 0..31)",
    "active_rank_mask (ranks 32..63)",
)
# ROUND_MISMATCH: what the gather compares with the dispatch recorded in the workspace.
COMBINE_CHECK_FIELDS: tuple[str, ...] = ("local_num_tokens", "runtime_max_tokens_per_rank")

SIGNATURE_FIELDS = {Phase.DISPATCH: DISPATCH_SIGNATURE_FIELDS, Phase.COMBINE: COMBINE_SIGNATURE_FIELDS}

# Codes of dtypes in signatures (0: none). Names as torch prints them without "torch.".
DTYPE_NAMES: tuple[str, ...] = (
    "",
    "float32", "float16", "bfloat16", "float64",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool",
    "complex64", "complex128", "complex32",
)  # fmt: skip
DTYPE_FIELD_SUFFIX = "dtype"


def dtype_code(dtype_name: str) -> int:
    """Signature code of a dtype name (`str(dtype)` without "torch."); unknown names get a stable
    code above the table so that two different unknown dtypes still (almost surely) differ."""
    try:
        return DTYPE_NAMES.index(dtype_name)
    except ValueError:
        return 1000 + sum(ord(c) * 31**i for i, c in enumerate(dtype_name)) % 100_000


def describe_value(field: str, value: int) -> str:
    if field.endswith(DTYPE_FIELD_SUFFIX) and 0 <= value < len(DTYPE_NAMES):
        return DTYPE_NAMES[value] or "none"
    return str(value)


def mask_halves(mask: int) -> tuple[int, int]:
    """Bits 0..31 and 32..63 of a rank mask as signed int32 values (as kernels take them)."""
    def signed(word: int) -> int:
        return word - (1 << 32) if word >= 1 << 31 else word

    return signed(mask & 0xFFFFFFFF), signed(mask >> 32 & 0xFFFFFFFF)


def ranks_of(low: int, high: int) -> list[int]:
    mask = (low & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)
    return [r for r in range(64) if mask >> r & 1]
