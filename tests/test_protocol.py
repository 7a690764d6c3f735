"""The signalling vocabulary is one: the kernels' constants match a2a.runtime.protocol, a round's
signature tells every field apart (rank-mask bits 31 and 63 included), records decode to errors."""

from __future__ import annotations

import torch

from a2a.ops import barrier
from a2a.errors import A2AMismatchError, A2APeerFailedError, A2ATimeoutError, fault_error
from a2a.kernels import combine, signal
from a2a.runtime import protocol
from a2a.runtime.protocol import FaultKind, FaultRecord, FlagArray, Phase


def test_the_kernels_use_the_protocols_numbers():
    assert signal.FLAG_EPOCH_MASK.value == protocol.FLAG_EPOCH_MASK
    assert signal.FLAG_POISON.value == protocol.FLAG_POISON
    assert combine.TOPK_TARGET_LOST.value == protocol.TOPK_TARGET_LOST
    assert signal.FLAG_ROW_GATHER.value == FlagArray.GATHER
    assert signal.NUM_FLAG_ARRAYS.value == len(FlagArray)
    assert signal.PHASE_ORDERING.value == Phase.ORDERING and signal.PHASE_COMBINE.value == Phase.COMBINE
    assert (signal.FAULT_TIMEOUT.value, signal.FAULT_PEER_FAILED.value, signal.FAULT_MISMATCH.value,
            signal.FAULT_ROUND_MISMATCH.value) == (FaultKind.TIMEOUT, FaultKind.PEER_FAILED, FaultKind.MISMATCH,
                                                    FaultKind.ROUND_MISMATCH)  # fmt: skip
    # The kernel writes record words by number (_record_fault): the protocol's indices.
    assert (FaultRecord.KIND, FaultRecord.RANKS_LOW, FaultRecord.RANKS_HIGH, FaultRecord.FIELDS,
            FaultRecord.FIRST_RANK, FaultRecord.OWN_VALUE, FaultRecord.PEER_VALUE, FaultRecord.AWAITED,
            FaultRecord.TIMEOUT_MS, FaultRecord.FIRST_FIELD, FaultRecord.MISSING_LOW,
            FaultRecord.MISSING_HIGH) == tuple(range(1, 13))  # fmt: skip
    assert protocol.FAULT_RECORD_WORDS == 16


def test_signatures_tell_apart_masks_that_differ_in_the_top_rank_of_each_half():
    payloads = [torch.zeros(2, 8, dtype=torch.bfloat16)]
    masks = [(1 << 64) - 1, (1 << 63) - 1, ((1 << 64) - 1) & ~(1 << 31), (1 << 32) - 1]
    words = {tuple(barrier.dispatch_signature(4, 8, 2, 64, payloads, m)) for m in masks}
    assert len(words) == len(masks)
    plane = torch.zeros(64, 4, 8, dtype=torch.bfloat16)
    words = {tuple(barrier.combine_signature(4, 8, 2, plane, 1 << 33, False, m)) for m in masks}
    assert len(words) == len(masks)


def test_every_signature_field_has_a_name_and_fits():
    assert len(protocol.DISPATCH_SIGNATURE_FIELDS) <= protocol.SIGNATURE_WORDS
    assert len(protocol.COMBINE_SIGNATURE_FIELDS) <= protocol.SIGNATURE_WORDS
    payloads = [torch.zeros(1, 3, dtype=d) for d in (torch.float8_e4m3fn, torch.int32, torch.float32)]
    words = barrier.dispatch_signature(7, 9, 3, 10, payloads, 0b11)
    assert len(words) == len(protocol.DISPATCH_SIGNATURE_FIELDS)
    assert all(-(2**31) <= w < 2**31 for w in words)
    named = dict(zip(protocol.DISPATCH_SIGNATURE_FIELDS, words))
    assert named["input_payloads[0] dtype"] == protocol.DTYPE_NAMES.index("float8_e4m3fn")
    assert named["input_payloads[2] bytes per token"] == 12 and named["input_payloads[3] bytes per token"] == 0


def record(**words) -> list[int]:
    values = [0] * protocol.FAULT_RECORD_WORDS
    for name, value in words.items():
        values[FaultRecord[name.upper()]] = int(value)
    return values


def test_fault_records_decode_to_errors_naming_phase_ranks_and_fields():
    assert fault_error([0] * 16, 3) is None
    timeout = fault_error(record(phase=Phase.ORDERING, kind=FaultKind.TIMEOUT, ranks_low=0b100, timeout_ms=1500), 0)
    assert isinstance(timeout, A2ATimeoutError) and timeout.missing_ranks == (2,)
    assert "previous round's gathers" in str(timeout) and "within 1.5 s" in str(timeout)
    failed = fault_error(record(phase=Phase.COMBINE, kind=FaultKind.PEER_FAILED, ranks_high=1, missing_low=0b10), 5)
    assert isinstance(failed, A2APeerFailedError) and failed.failed_ranks == (32,) and failed.missing_ranks == (1,)
    dtype_word = protocol.DISPATCH_SIGNATURE_FIELDS.index("input_payloads[1] dtype")
    mismatch = fault_error(record(phase=Phase.DISPATCH, kind=FaultKind.MISMATCH, ranks_low=0b10, fields=1 << dtype_word,
                                  first_rank=1, first_field=dtype_word, own_value=3, peer_value=2), 0)  # fmt: skip
    assert isinstance(mismatch, A2AMismatchError)
    assert "input_payloads[1] dtype: bfloat16 here, float16 on rank 1" in str(mismatch)
