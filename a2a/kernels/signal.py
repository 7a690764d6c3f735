"""Cross-rank flags inside kernels: signal, bounded wait, round signatures, fault records, poison.

The protocol and its numbers are `a2a.runtime.protocol`'s (restated below as constexprs, which
tests/test_protocol.py checks against it). In short, per phase:

- signal (one program): unless this rank has recorded a fault, bump its `flag_value` (31-bit
  epoch), store its round signature into `signatures[me]` of every active segment, then store
  the epoch into `flags[me]` of every active segment with system-scope release semantics, so
  every store this rank made before (earlier kernels on its stream, and the other programs of
  this kernel, ordered by the caller through an acq_rel election) is visible to a peer that sees
  the flag.
- wait (WAIT): spin until every active `flags[s]` equals the epoch, a peer's flag is FLAG_POISON,
  or `timeout_ns` of `%globaltimer` passed; system-scope acquire; then (COMPARE: the dispatch,
  a combine of more than GATHER_COMPARE_MAX_TOKENS rows) compare every peer's signature with
  this rank's (a2a.kernels.signatures); a combine of fewer rows compares them in its gather
  instead, before its stores, and the gather's last program records a disagreement
  (`_record_disagreement`). A poisoned peer, a timeout or a disagreeing peer is recorded in the
  fault record (own segment, and a host-mapped copy the host reads without synchronising), and
  the rank poisons its flags in every peer. Ranks run the same phases in the same order, so their
  epochs agree; a peer can raise a flag again only after a later phase that needs this rank's
  signal, so equality cannot be overtaken, and wraparound is harmless.
- a recorded fault is sticky: every later program of the rank skips its waits and remote stores.

Because epochs come from device memory, a CUDA graph replays the protocol unchanged. Only active
ranks take part (`active_low` / `active_high`: bits 0..31 / 32..63 of the active-rank mask).

Under the Triton interpreter (CPU) only the signal runs in the kernel; the host waits and judges
instead (WAIT=False), since interpreted programs run one after another on the calling thread.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from a2a.kernels.signatures import _compare_signatures

# a2a.runtime.protocol's numbers.
FLAG_EPOCH_MASK = tl.constexpr(0x7FFFFFFF)
FLAG_POISON = tl.constexpr(-1)
FLAG_ROW_GATHER = tl.constexpr(2)
PHASE_ORDERING = tl.constexpr(3)
FAULT_TIMEOUT = tl.constexpr(1)
FAULT_PEER_FAILED = tl.constexpr(2)
FAULT_MISMATCH = tl.constexpr(3)
FAULT_ROUND_MISMATCH = tl.constexpr(4)
PHASE_COMBINE = tl.constexpr(2)
NUM_FLAG_ARRAYS = tl.constexpr(3)


@triton.jit
def _global_time_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _fence_acquire_system():
    tl.inline_asm_elementwise("fence.acq_rel.sys;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _fence_acquire_gpu():
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _prefetch_l2(ptrs):
    """Start bringing the lines at `ptrs` (own-GPU addresses) into L2 and go on. A prefetch is no
    memory access in the PTX memory model and returns no data, so a program may issue it before
    `griddepcontrol.wait` (PDL) without racing the previous kernel; it fills L2 only (never L1),
    which the hardware keeps coherent with every store to this GPU's memory, its SMs' and its
    NVLink peers'. The program's loads, issued after the wait, find the line in L2, not HBM."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _rank_is_active(ranks, active_low, active_high):
    """Bit `rank` of the 64-bit active-rank mask given as two int32 halves (ranks: an int vector)."""
    ranks = ranks.to(tl.int32)
    word = tl.where(ranks < 32, active_low, active_high)
    return ((word >> (ranks & 31)) & 1) != 0


@triton.jit
def _rank_halves(selected, ranks):
    """A bool vector over ranks as two int32 bit masks (ranks 0..31, 32..63)."""
    bits = 1 << (ranks & 31)
    low = tl.sum(tl.where(selected & (ranks < 32), bits, 0), axis=0)
    high = tl.sum(tl.where(selected & (ranks >= 32), bits, 0), axis=0)
    return low, high


@triton.jit
def _is_faulted(fault_record_ptr):
    """Whether this rank has recorded a fault (word 0 of its record, own segment)."""
    return tl.load(fault_record_ptr, volatile=True) != 0


@triton.jit
def _poison_peers(flags_ptr, stride_rank, ep_rank, active_low, active_high, spared_row, EP_SIZE: tl.constexpr,
                  EP_PAD: tl.constexpr, FLAG_ARRAY_STRIDE: tl.constexpr):
    """FLAG_POISON into flags[ep_rank] of the flag arrays (all but `spared_row`; -1 spares none) of
    every other active segment."""
    ranks = tl.arange(0, EP_PAD)
    mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high) & (ranks != ep_rank)
    poison = tl.zeros([EP_PAD], dtype=tl.int32) + FLAG_POISON
    for row in tl.static_range(NUM_FLAG_ARRAYS):
        targets = flags_ptr + row * FLAG_ARRAY_STRIDE + ranks.to(tl.int64) * stride_rank + ep_rank
        tl.atomic_xchg(targets, poison, mask=mask & (ranks * 0 + row != spared_row), sem="release", scope="sys")


@triton.jit
def _store_record_words(record_ptr, kind, ranks_low, ranks_high, fields, first_rank, first_field, own_value,
                        peer_value, awaited, timeout_ms, missing_low, missing_high):
    """Words 1.. of a fault record (protocol.FaultRecord); word 0, the phase, is the caller's."""
    tl.store(record_ptr + 1, kind)
    tl.store(record_ptr + 2, ranks_low)
    tl.store(record_ptr + 3, ranks_high)
    tl.store(record_ptr + 4, fields)
    tl.store(record_ptr + 5, first_rank)
    tl.store(record_ptr + 6, own_value)
    tl.store(record_ptr + 7, peer_value)
    tl.store(record_ptr + 8, awaited)
    tl.store(record_ptr + 9, timeout_ms)
    tl.store(record_ptr + 10, first_field)
    tl.store(record_ptr + 11, missing_low)
    tl.store(record_ptr + 12, missing_high)


@triton.jit
def _record_fault(fault_record_ptr, host_record_ptr, phase, kind, ranks_low, ranks_high, fields, first_rank,
                  first_field, own_value, peer_value, awaited, timeout_ms, missing_low, missing_high,
                  HAS_HOST_RECORD: tl.constexpr):
    """Write the fault record (word 0, the phase, last) here and in the host-mapped copy."""
    _store_record_words(fault_record_ptr, kind, ranks_low, ranks_high, fields, first_rank, first_field, own_value,
                        peer_value, awaited, timeout_ms, missing_low, missing_high)
    tl.atomic_xchg(fault_record_ptr, phase, sem="release", scope="gpu")
    if HAS_HOST_RECORD:
        host = host_record_ptr.to(tl.pointer_type(tl.int32))
        _store_record_words(host, kind, ranks_low, ranks_high, fields, first_rank, first_field, own_value, peer_value,
                            awaited, timeout_ms, missing_low, missing_high)
        tl.atomic_xchg(host, phase, sem="release", scope="sys")


@triton.jit
def _mirror_fault(fault_record_ptr, host_record_ptr, HAS_HOST_RECORD: tl.constexpr):
    """Copy a recorded fault into this launch's host-mapped record (the host may watch a fresh copy:
    a new wrapper of the same workspace), phase word last."""
    if HAS_HOST_RECORD:
        host = host_record_ptr.to(tl.pointer_type(tl.int32))
        words = tl.arange(0, 16)
        record = tl.load(fault_record_ptr + words, volatile=True)
        tl.store(host + words, record, mask=words > 0)
        tl.debug_barrier()
        tl.atomic_xchg(host, tl.load(fault_record_ptr, volatile=True), sem="release", scope="sys")


@triton.jit
def _global_time_ns_lanes(lanes):
    """%globaltimer, read by the thread that owns each lane of `lanes` (an int vector)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [lanes], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _flag_tally(own_flags_ptr, value, ranks, rank_mask, deadline, CHECK_CLOCK: tl.constexpr):
    """One poll of the flags under `rank_mask`: (flags, their tally). The tally packs three
    counts over the rank lanes into one reduction (lanes <= MAX_RANKS = 64 < 256): bits 0..7,
    flags neither `value` nor poisoned; bits 8..15, poisoned flags; bits 16.., with CHECK_CLOCK,
    lanes whose clock passed `deadline`. One reduction a poll, not three: in a program of several
    warps each is a round through shared memory and a bar.sync."""
    flags = tl.load(own_flags_ptr + ranks, mask=rank_mask, other=value, volatile=True)
    lane = tl.where(flags < 0, 1 << 8, tl.where(flags == value, 0, 1))
    if CHECK_CLOCK:
        lane += tl.where(_global_time_ns_lanes(ranks) > deadline, 1 << 16, 0)
    return flags, tl.sum(lane, axis=0)


@triton.jit
def _await_flags(own_flags_ptr, value, ranks, rank_mask, timeout_ns, poison_ends_wait):
    """Spin until every flag under `rank_mask` equals `value` (or, when `poison_ends_wait`, one
    is FLAG_POISON; otherwise a poisoned flag counts as done), or `timeout_ns` pass. Returns
    (arrived, poisoned, timed_out). Callers that go on to read what the peers published add a
    system-scope acquire.

    Every decision is a reduction over the rank lanes, so all warps of the program agree on it
    (lanes span several warps when EP_PAD > 32): each lane reads the clock itself and the wait
    times out when any lane has passed its deadline."""
    deadline = _global_time_ns_lanes(ranks) + timeout_ns
    flags, tally = _flag_tally(own_flags_ptr, value, ranks, rank_mask, deadline, False)
    pending = ((tally & 0xFF) > 0) & ((((tally >> 8) & 0xFF) == 0) | (~poison_ends_wait))
    timed_out = pending & (~pending)  # false; the loop reassigns it
    while pending:
        flags, tally = _flag_tally(own_flags_ptr, value, ranks, rank_mask, deadline, True)
        timed_out = (tally >> 16) > 0
        pending = ((tally & 0xFF) > 0) & ((((tally >> 8) & 0xFF) == 0) | (~poison_ends_wait)) & (~timed_out)
    return flags == value, flags < 0, timed_out


@triton.jit
def _judge_wait(arrived, poisoned, timed_out, mismatched, fields, first_rank, first_field, own_value, peer_value,
                ranks, rank_mask, value, phase, flag_row, flags_ptr, stride_rank, fault_record_ptr, host_record_ptr,
                timeout_ms, active_low, active_high, ep_rank, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                FLAG_ARRAY_STRIDE: tl.constexpr, HAS_HOST_RECORD: tl.constexpr):
    """After a wait: record the first problem (a poisoned peer, else a timeout, else a signature
    mismatch) and poison this rank's flags in every peer; nothing if all is well. A mismatch
    leaves this phase's flag (`flag_row`) as signalled, so every peer still compares this rank's
    signature and reports the disagreement itself. Returns whether it recorded a fault."""
    any_poisoned = tl.sum(poisoned.to(tl.int32), axis=0) > 0
    any_mismatch = tl.sum(mismatched.to(tl.int32), axis=0) > 0
    missing = rank_mask & (~arrived)
    kind = tl.where(any_poisoned, FAULT_PEER_FAILED,
                    tl.where(timed_out, FAULT_TIMEOUT, tl.where(any_mismatch, FAULT_MISMATCH, 0)))
    selected = tl.where(any_poisoned, poisoned, tl.where(timed_out, missing, mismatched))
    if kind != 0:
        low, high = _rank_halves(selected & rank_mask, ranks)
        missing_low, missing_high = _rank_halves(missing & (~poisoned), ranks)
        is_mismatch = kind == FAULT_MISMATCH
        _record_fault(fault_record_ptr, host_record_ptr, phase, kind, low, high, tl.where(is_mismatch, fields, 0),
                      tl.where(is_mismatch, first_rank, -1), tl.where(is_mismatch, first_field, -1),
                      tl.where(is_mismatch, own_value, 0), tl.where(is_mismatch, peer_value, 0), value,
                      tl.where(kind == FAULT_TIMEOUT, timeout_ms, 0), missing_low, missing_high, HAS_HOST_RECORD)
        _poison_peers(flags_ptr, stride_rank, ep_rank, active_low, active_high, tl.where(is_mismatch, flag_row, -1),
                      EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE)
    return kind != 0


@triton.jit
def _record_disagreement(signatures_ptr, own_signature_ptr, flag_value_ptr, flags_ptr, stride_rank, fault_record_ptr,
                         host_record_ptr, active_low, active_high, ep_rank, PHASE: tl.constexpr,
                         FLAG_ROW: tl.constexpr, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                         FLAG_ARRAY_STRIDE: tl.constexpr, SIGNATURE_WORDS: tl.constexpr,
                         HAS_HOST_RECORD: tl.constexpr):
    """For a phase whose barrier did not compare (`_phase_barrier` without COMPARE), once its
    consumer found a disagreement: record the MISMATCH (ranks, fields, first values) and poison this
    rank's flags in every peer, as the barrier's judge would have. Returns whether it recorded."""
    ranks = tl.arange(0, EP_PAD)
    rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high)
    own_rows = signatures_ptr + ep_rank.to(tl.int64) * stride_rank
    mismatched, fields, first_rank, first_field, own_value, peer_value = _compare_signatures(
        own_rows, own_signature_ptr, ranks, rank_mask, SIGNATURE_WORDS)
    value = tl.load(flag_value_ptr, volatile=True)
    timed_out = value < 0  # false: an epoch is never negative
    return _judge_wait(rank_mask, ranks < 0, timed_out, mismatched, fields, first_rank, first_field, own_value,
                       peer_value, ranks, rank_mask, value, PHASE, FLAG_ROW, flags_ptr, stride_rank, fault_record_ptr,
                       host_record_ptr, 0, active_low, active_high, ep_rank, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE,
                       HAS_HOST_RECORD)


@triton.jit
def _phase_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
                   host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, PHASE: tl.constexpr,
                   FLAG_ROW: tl.constexpr, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                   FLAG_ARRAY_STRIDE: tl.constexpr, SIGNATURE_WORDS: tl.constexpr, WAIT: tl.constexpr,
                   HAS_HOST_RECORD: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, COMPARE: tl.constexpr):
    """One program: signal this phase (signature, then epoch) and, with WAIT, wait and judge.
    Returns whether this rank has a fault recorded afterwards (from before, or by this wait).
    LAUNCH_DEPENDENTS (the caller is a PDL launch's last program: its only one, or the last of an
    election whose others have exited): let the next kernel on the stream launch as soon as the
    wait ends, so its programs start while this one still judges (they wait for this kernel to
    complete before they load or store). COMPARE: compare the peers' signatures here (the
    dispatch, a combine of more than a2a.ops.configs.GATHER_COMPARE_MAX_TOKENS rows); without it
    the caller's next step compares them (a combine of fewer rows: every gather program before
    its stores, and the gather's last program records a mismatch, `_record_disagreement`), so no
    load of theirs sits between the wait's end and this kernel's.

    flags_ptr: the flag block `[3, EP_SIZE]` of segment 0 (rows FLAG_ARRAY_STRIDE apart; segment t
    at + t * stride_rank). signatures_ptr: this phase's `[EP_SIZE, SIGNATURE_WORDS]` signatures of
    segment 0. own_signature_ptr: this rank's `[SIGNATURE_WORDS]` signature of the round.
    """
    # Three independent own-segment loads issued together: the healthy path then waits for one
    # memory round trip before it signals, not three in a row.
    healthy = ~_is_faulted(fault_record_ptr)
    old_value = tl.load(flag_value_ptr, volatile=True)
    words = tl.arange(0, SIGNATURE_WORDS)
    mine = tl.load(own_signature_ptr + words)
    recorded = healthy & (~healthy)  # false; a wait below may record a fault
    if healthy:
        value = (old_value + 1) & FLAG_EPOCH_MASK
        tl.debug_barrier()  # every thread has read the old epoch before one thread stores the new one
        tl.store(flag_value_ptr, value)
        ranks = tl.arange(0, EP_PAD)
        rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high)
        slots = signatures_ptr + ranks.to(tl.int64)[:, None] * stride_rank + ep_rank * SIGNATURE_WORDS + words[None, :]
        tl.store(slots, tl.broadcast_to(mine[None, :], [EP_PAD, SIGNATURE_WORDS]), mask=rank_mask[:, None])
        # Every thread's signature stores must be issued before the release below publishes them.
        tl.debug_barrier()
        phase_flags = flags_ptr + FLAG_ROW * FLAG_ARRAY_STRIDE
        tl.atomic_xchg(phase_flags + ranks.to(tl.int64) * stride_rank + ep_rank, tl.zeros([EP_PAD], dtype=tl.int32) + value,
                       mask=rank_mask, sem="release", scope="sys")
        if WAIT:
            own_flags = phase_flags + ep_rank.to(tl.int64) * stride_rank
            arrived, poisoned, timed_out = _await_flags(own_flags, value, ranks, rank_mask, timeout_ns, healthy)
            if LAUNCH_DEPENDENTS:
                gdc_launch_dependents()
            _fence_acquire_system()  # the peers' signatures, rows and planes are read after this
            mismatched = ranks < 0  # none, unless compared here
            fields = old_value * 0
            first_rank = fields
            first_field = fields
            own_value = fields
            peer_value = fields
            if COMPARE:
                own_rows = signatures_ptr + ep_rank.to(tl.int64) * stride_rank
                mismatched, fields, first_rank, first_field, own_value, peer_value = _compare_signatures(
                    own_rows, own_signature_ptr, ranks, rank_mask & arrived, SIGNATURE_WORDS)
            recorded = _judge_wait(arrived, poisoned, timed_out, mismatched, fields, first_rank, first_field,
                                   own_value, peer_value, ranks, rank_mask, value, PHASE, FLAG_ROW, flags_ptr,
                                   stride_rank, fault_record_ptr, host_record_ptr, timeout_ms, active_low, active_high,
                                   ep_rank, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, HAS_HOST_RECORD)
    else:
        _mirror_fault(fault_record_ptr, host_record_ptr, HAS_HOST_RECORD)
    return (~healthy) | recorded


@triton.jit
def _prefetch_previous_gathers(round_state_ptr, flags_ptr, stride_rank, ep_rank, FLAG_ARRAY_STRIDE: tl.constexpr):
    """Before `griddepcontrol.wait`: the lines a dispatch's wait for the previous gathers reads
    first (`_await_previous_gathers`, `_program_awaits_previous_gathers`): the round state
    (`round_state_ptr`, any word of its one 128-byte line: gather count and mask, fault record)
    and this rank's gather flags (`flags_ptr`: the flag block of segment 0)."""
    _prefetch_l2(round_state_ptr)
    _prefetch_l2(flags_ptr + FLAG_ROW_GATHER * FLAG_ARRAY_STRIDE + ep_rank.to(tl.int64) * stride_rank)


@triton.jit
def _await_previous_gathers(count, previous_low, previous_high, healthy, flags_ptr, stride_rank, fault_record_ptr,
                            host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank,
                            EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr, FLAG_ARRAY_STRIDE: tl.constexpr,
                            HAS_HOST_RECORD: tl.constexpr):
    """Before this rank's dispatch writes (into peers, or into its own segment afterwards): wait
    until every rank of the previous round (`previous_low` / `previous_high`: the mask its gather
    recorded; ranks may since have been made inactive) has finished gathering it (its gather flag
    here equals this rank's gather count `count`), so no row of this round can land on a combine
    plane a peer is still reading, whatever the two rounds' geometry. The caller loads `count`, the
    mask and `healthy` (no fault recorded) early, off this wait's path; returns whether this rank has
    a fault recorded afterwards.

    A rank that has recorded a fault still waits (a poisoned peer counting as done, a timeout
    ending it quietly): its own next writes into its own segment (sanitize, staging, the caller's
    experts) must not overtake a healthy peer's last gather from it either.

    No acquire fence: nothing a peer published is read after this wait, and every store it must
    order (the dispatch copy's rows, later own-segment writes) is issued by a later kernel on this
    stream, after this one has completed."""
    ranks = tl.arange(0, EP_PAD)
    rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, previous_low, previous_high)
    own_flags = flags_ptr + FLAG_ROW_GATHER * FLAG_ARRAY_STRIDE + ep_rank.to(tl.int64) * stride_rank
    arrived, poisoned, timed_out = _await_flags(own_flags, count, ranks, rank_mask, timeout_ns, healthy)
    recorded = healthy & (~healthy)  # false
    if healthy:
        recorded = _judge_wait(arrived, poisoned, timed_out, ranks < 0, 0, 0, 0, 0, 0, ranks, rank_mask, count,
                               PHASE_ORDERING, FLAG_ROW_GATHER, flags_ptr, stride_rank, fault_record_ptr,
                               host_record_ptr, timeout_ms, active_low, active_high, ep_rank, EP_SIZE, EP_PAD,
                               FLAG_ARRAY_STRIDE, HAS_HOST_RECORD)
    tl.debug_barrier()  # the record (written by one thread) is visible to the whole program after this
    return (~healthy) | recorded


@triton.jit
def _program_awaits_previous_gathers(count, previous_low, previous_high, healthy, flags_ptr, stride_rank, trouble_ptr,
                                     timeout_ns, ep_rank, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                                     FLAG_ARRAY_STRIDE: tl.constexpr):
    """`_await_previous_gathers` for one program of a launch whose every program writes into peers
    (the fused dispatch): the same wait, but nothing is recorded here, since programs that see
    different things must not each write the fault record. Returns whether this program may store
    into peers: this rank is healthy and every rank of the previous round has finished gathering.
    Otherwise a healthy rank's program ORs the ranks into the trouble words (`trouble_ptr`, own
    segment: poisoned ranks 0..31, 32..63, then missing ones), which the launch's last program
    turns into the rank's fault (`_record_ordering_trouble`) before it would signal. A rank with a
    fault recorded waits as `_await_previous_gathers` does, quietly, and stores nothing."""
    ranks = tl.arange(0, EP_PAD)
    rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, previous_low, previous_high)
    own_flags = flags_ptr + FLAG_ROW_GATHER * FLAG_ARRAY_STRIDE + ep_rank.to(tl.int64) * stride_rank
    arrived, poisoned, timed_out = _await_flags(own_flags, count, ranks, rank_mask, timeout_ns, healthy)
    missing = rank_mask & (~arrived)
    ordered = healthy & (tl.sum(missing.to(tl.int32), axis=0) == 0)
    if healthy & (~ordered):
        poisoned_low, poisoned_high = _rank_halves(poisoned & rank_mask, ranks)
        missing_low, missing_high = _rank_halves(missing & (~poisoned), ranks)
        tl.atomic_or(trouble_ptr, poisoned_low, sem="relaxed", scope="gpu")
        tl.atomic_or(trouble_ptr + 1, poisoned_high, sem="relaxed", scope="gpu")
        tl.atomic_or(trouble_ptr + 2, missing_low, sem="relaxed", scope="gpu")
        tl.atomic_or(trouble_ptr + 3, missing_high, sem="relaxed", scope="gpu")
    return ordered


@triton.jit
def _record_ordering_trouble(trouble_ptr, count, flags_ptr, stride_rank, fault_record_ptr, host_record_ptr, timeout_ms,
                             active_low, active_high, ep_rank, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                             FLAG_ARRAY_STRIDE: tl.constexpr, HAS_HOST_RECORD: tl.constexpr):
    """The last program of a fused dispatch, after every other program counted itself done (an
    acq_rel election, so their trouble words are visible): if some program could not see every
    previous gather (`_program_awaits_previous_gathers`), record it as this rank's fault, as
    `_await_previous_gathers` would have (a poisoned peer first, else a timeout), poison this rank's
    flags in every peer and clear the words. The caller passes only a healthy rank. Returns whether
    it recorded a fault."""
    words = tl.load(trouble_ptr + tl.arange(0, 4), volatile=True)
    poisoned_low = tl.sum(tl.where(tl.arange(0, 4) == 0, words, 0), axis=0)
    poisoned_high = tl.sum(tl.where(tl.arange(0, 4) == 1, words, 0), axis=0)
    # Programs saw different things: a rank one program found poisoned another may have found missing.
    # As `_judge_wait` records it, a poisoned rank is never also named missing.
    missing_low = tl.sum(tl.where(tl.arange(0, 4) == 2, words, 0), axis=0) & (~poisoned_low)
    missing_high = tl.sum(tl.where(tl.arange(0, 4) == 3, words, 0), axis=0) & (~poisoned_high)
    any_poisoned = (poisoned_low != 0) | (poisoned_high != 0)
    troubled = any_poisoned | (missing_low != 0) | (missing_high != 0)
    if troubled:
        kind = tl.where(any_poisoned, FAULT_PEER_FAILED, FAULT_TIMEOUT)
        _record_fault(fault_record_ptr, host_record_ptr, PHASE_ORDERING, kind,
                      tl.where(any_poisoned, poisoned_low, missing_low), tl.where(any_poisoned, poisoned_high, missing_high),
                      0, -1, -1, 0, 0, count, tl.where(any_poisoned, 0, timeout_ms), missing_low, missing_high,
                      HAS_HOST_RECORD)
        _poison_peers(flags_ptr, stride_rank, ep_rank, active_low, active_high, -1, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE)
        tl.store(trouble_ptr + tl.arange(0, 4), tl.zeros([4], dtype=tl.int32))
    tl.debug_barrier()  # the record (written by one thread) is visible to the whole program after this
    return troubled


@triton.jit
def _record_round_mismatch(dispatch_rows, dispatch_rt, num_tokens, runtime_max_tokens, flags_ptr, stride_rank,
                           fault_record_ptr, host_record_ptr, active_low, active_high, ep_rank, EP_SIZE: tl.constexpr,
                           EP_PAD: tl.constexpr, FLAG_ARRAY_STRIDE: tl.constexpr, HAS_HOST_RECORD: tl.constexpr):
    """A combine that does not match this rank's own dispatch (token rows or rt) is a fault: it
    would read top-k entries or plane rows the dispatch never wrote."""
    rows_differ = dispatch_rows != num_tokens
    field = tl.where(rows_differ, 0, 1)
    own = tl.where(rows_differ, num_tokens, runtime_max_tokens)
    recorded = tl.where(rows_differ, dispatch_rows, dispatch_rt)
    low = tl.where(ep_rank < 32, 1 << (ep_rank & 31), 0)
    high = tl.where(ep_rank >= 32, 1 << (ep_rank & 31), 0)
    _record_fault(fault_record_ptr, host_record_ptr, PHASE_COMBINE, FAULT_ROUND_MISMATCH, low, high, 0, ep_rank, field,
                  own, recorded, 0, 0, 0, 0, HAS_HOST_RECORD)
    _poison_peers(flags_ptr, stride_rank, ep_rank, active_low, active_high, -1, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE)
    tl.debug_barrier()  # the record (written by one thread) is visible to the whole program after this


@triton.jit
def _signal_gathered(count, faulted, gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank, active_low,
                     active_high, ep_rank, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                     FLAG_ARRAY_STRIDE: tl.constexpr):
    """After this rank's gather (every program's loads done: the calling last program saw every other
    one count itself done): store the gather count `count` (the caller's: the old count + 1, loaded
    early), remember this round's active ranks (the next dispatch waits for their gathers), and,
    unless this rank has recorded a fault (`faulted`: loaded early, since only the caller records
    one during a gather, a signature disagreement, and a fused combine's elected program records
    any other before it opens the gate the caller passed; or the caller's own record), store the
    count into `flags[GATHER][me]` of every active segment.

    Relaxed, not release: the flag publishes no data, it only says this rank's loads of the peers'
    planes are over, and they are (every loaded value fed an output store issued before the
    caller's bar.sync). A system-scope release fence here waits for this rank's output stores to
    reach the whole system, which no peer needs."""
    tl.store(gather_count_ptr, count)
    tl.store(gathered_mask_ptr, active_low)
    tl.store(gathered_mask_ptr + 1, active_high)
    if not faulted:
        ranks = tl.arange(0, EP_PAD)
        rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high)
        targets = flags_ptr + FLAG_ROW_GATHER * FLAG_ARRAY_STRIDE + ranks.to(tl.int64) * stride_rank + ep_rank
        tl.atomic_xchg(targets, tl.zeros([EP_PAD], dtype=tl.int32) + count, mask=rank_mask, sem="relaxed", scope="sys")
