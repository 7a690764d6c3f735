"""Combine: stage expert outputs into the combine plane, then gather-and-reduce over top-k.

`_stage_combine_kernel`, grid `(EP_SIZE * runtime_max_tokens, num_tiles)`: copies row `(s, j)` of the
caller's `[EP_SIZE, rt, ROW_UNITS]` payload into this rank's combine plane when
`j < recv_counters[s]` (stale rows are never read by peers, so they are not copied).

`_combine_kernel`, grid `(max(1, num_tokens), num_tiles)`: output row `i`, column tile `c` =
sum over k = 0..TOP_K-1 (in that order) of segment `t_k`'s combine plane row `[ep_rank][slot_k]`,
accumulated in fp32 and cast to the output dtype; a k with target -1 adds an exact zero. With
HAS_SCALES the plane holds quantized (fp8) rows and each row is multiplied by its fp32 scale from
the scales plane of the same segment before it is added. A k with target TOPK_TARGET_LOST makes
the row NaN. With COMPARE so does a peer whose combine signature (stored into this rank's segment
before its signal) differs from this rank's: every program compares them before its stores, its
row loads already in flight, so the compare adds no round trip to the barrier's path. Every
program but the last then counts itself done; the last program of the grid waits for them, (COMPARE)
records a disagreement (as a MISMATCH fault; it compared before its wait), and tells every peer
that this rank's gather is done (its gather flag) unless a fault is recorded; the peers' next
dispatch waits for that flag before writing (a2a.kernels.signal._await_previous_gathers).

`_combine_barrier_kernel`, one program before the gather: signal "my combine plane is ready", wait
for the peers' signals (a2a.kernels.signal._phase_barrier), with COMPARE compare their signatures
(when the gather does not), then gate the gather once for all its programs: after a recorded
fault, or when the combine's token rows or rt differ from this rank's last dispatch (recorded in
the workspace by the dispatch copy; that is recorded as a fault here), every top-k entry of the
combine's rows becomes TOPK_TARGET_LOST, so the gather reads no peer row and writes NaN rows
(a2a.runtime.protocol). Gating here, not in every gather program, keeps the gather's loads free of
a dependent check. Exactly one of the two compares in a round; a2a.ops.combine picks which by the
round's token rows (configs.GATHER_COMPARE_MAX_TOKENS).

`_fused_combine_kernel`, the gather's grid: both in one launch for small rounds whose grid fits on
the GPU beside every peer's (a2a.ops.combine decides): the first program to start does the
barrier program's work and opens a gate the others wait for, then every program gathers and
compares.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from a2a.kernels.signal import (FLAG_EPOCH_MASK, _fence_acquire_gpu, _is_faulted, _phase_barrier, _prefetch_l2,
                               _rank_is_active, _record_disagreement, _record_round_mismatch, _signal_gathered)
from a2a.kernels.signatures import _load_signatures, _signatures_disagree

# a2a.runtime.protocol.TOPK_TARGET_LOST
TOPK_TARGET_LOST = tl.constexpr(-2)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, NaN kept quiet: the rounding torch uses, done with integer
    ops so the compiled kernel and the Triton interpreter (whose own cast truncates) agree bit for bit."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["runtime_max_tokens"], do_not_specialize_on_alignment=["src_ptr"])
def _stage_combine_kernel(
    src_ptr,  # [EP_SIZE, runtime_max_tokens, ROW_UNITS] copy units, the caller's expert outputs
    dst_ptr,  # [EP_SIZE, runtime_max_tokens, ROW_UNITS] copy units, own combine plane
    recv_counters_ptr,  # [EP_SIZE] int32, own segment
    runtime_max_tokens,
    ROW_UNITS: tl.constexpr,
    VEC_UNITS: tl.constexpr,
    TILE: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
):
    if PDL:
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    source = row // runtime_max_tokens
    slot = row - source * runtime_max_tokens
    if slot < tl.load(recv_counters_ptr + source):
        cols = tile * TILE + tl.arange(0, TILE)
        col_mask = cols < ROW_UNITS
        src = src_ptr
        if VEC_UNITS > 1:
            src = tl.multiple_of(src, 16)  # VEC_UNITS > 1 means 16-byte aligned rows
        values = tl.load(src + row * ROW_UNITS + cols, mask=col_mask)
        tl.store(dst_ptr + row * ROW_UNITS + cols, values, mask=col_mask)


@triton.jit
def _gather_tile(token, tile, plane_ptr, stride_plane_rank, scales_ptr, stride_scales_rank, out_ptr,
                 topk_target_ranks_ptr, topk_send_indices_ptr, runtime_max_tokens, ep_rank, num_tokens,
                 signatures_ptr, own_signature_ptr, stride_rank, active_low, active_high,
                 HIDDEN: tl.constexpr, TOP_K: tl.constexpr, TILE: tl.constexpr, HAS_SCALES: tl.constexpr,
                 EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr, SIGNATURE_WORDS: tl.constexpr,
                 COMPARED_WORDS: tl.constexpr, COMPARE: tl.constexpr):
    """Output row `token`, column tile `tile`: the sum over k of the top-k rows (see the module
    docstring); with COMPARE, NaN when some active rank's combine signature differs from this rank's."""
    if token < num_tokens:
        ranks = tl.arange(0, EP_PAD)
        rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high)
        if COMPARE:
            # Issued before the rows and reduced after them: the compare adds no round trip to the
            # program's path (in the barrier it held every gather back by 0.9 us at 16 tokens).
            # Plain loads, which L1 can serve to the programs after the first on an SM: with
            # volatile ones the gather compare cost 24 us of 753 at 4096 tokens per rank.
            signatures, mine = _load_signatures(signatures_ptr, own_signature_ptr, stride_rank, ep_rank, rank_mask,
                                                EP_PAD, SIGNATURE_WORDS, COMPARED_WORDS, False)
        cols = tile * TILE + tl.arange(0, TILE)
        col_mask = cols < HIDDEN
        acc = tl.zeros([TILE], dtype=tl.float32)
        lost = 0.0  # NaN once an entry is marked lost (the barrier marked every entry of a lost round)
        first_row = ep_rank.to(tl.int64) * runtime_max_tokens
        # Unrolled so the TOP_K independent row loads are in flight together.
        for k in tl.static_range(TOP_K):
            target = tl.load(topk_target_ranks_ptr + token * TOP_K + k)
            slot = tl.load(topk_send_indices_ptr + token * TOP_K + k)
            sends = target >= 0
            row = first_row + tl.where(sends, slot, 0)
            src = plane_ptr + tl.where(sends, target, 0).to(tl.int64) * stride_plane_rank + row * HIDDEN
            mask = col_mask & (cols * 0 + target >= 0)  # a tensor mask: Triton 3.9's interpreter rejects scalar & tensor
            values = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALES:
                scale = tl.load(scales_ptr + tl.where(sends, target, 0).to(tl.int64) * stride_scales_rank + row)
                values = values * tl.where(sends, scale, 0.0)
            acc += values
            lost += tl.where(target == TOPK_TARGET_LOST, float("nan"), 0.0)
        if COMPARE:  # a peer disagreeing on the round: its rows are not this round's layout; none is stored
            lost += tl.where(_signatures_disagree(signatures, mine, rank_mask, EP_PAD, COMPARED_WORDS), float("nan"),
                             0.0)
        acc += lost  # a lost round: never hand back numbers that look valid
        if out_ptr.dtype.element_ty == tl.bfloat16:
            result = _round_to_bf16(acc)
        else:
            result = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + token * HIDDEN + cols, result, mask=col_mask)


@triton.jit
def _finish_gather(election_ptr, gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank, fault_record_ptr,
                   active_low, active_high, ep_rank, arrivals_ptr, gate_ptr, signatures_ptr, own_signature_ptr,
                   flag_value_ptr, host_record_ptr, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                   FLAG_ARRAY_STRIDE: tl.constexpr, PHASE: tl.constexpr, FLAG_ROW: tl.constexpr,
                   SIGNATURE_WORDS: tl.constexpr, COMPARED_WORDS: tl.constexpr, HAS_HOST_RECORD: tl.constexpr,
                   FUSED: tl.constexpr, COMPARE: tl.constexpr):
    """After a program's gather: the last program of the grid waits for every other one, (COMPARE)
    records a signature disagreement (every program wrote NaN for it) and tells the peers this
    rank's gather is done unless a fault is recorded (and, FUSED, resets the arrival and gate words)."""
    # Every program but the last adds itself to the counter with a relaxed reduction it does not
    # wait for. Its loads are done: every loaded value feeds the output store issued before the
    # barrier, and ptxas moves no memory operation across bar.sync. (The PTX model alone does not
    # order a load before a later relaxed red; a release red would, at the cost measured below.) The
    # last program waits for the others, then signals. An acq_rel election in every program (a
    # fence waiting for its stores, a returned atomic) cost 869 -> 799 us at 4096 tokens per rank
    # (bench/profile/combine_variants.py of commit 1930370, 8 ranks on one H200). The last program
    # is scheduled last or holds one slot while the others run: in `_combine_kernel` they never
    # wait, so the wait ends; in the fused kernel they wait only for the gate, which the elected
    # (running) program opens, and the launcher fuses only grids that fit on the GPU at once.
    tl.debug_barrier()
    others = tl.num_programs(0) * tl.num_programs(1) - 1
    if (tl.program_id(0) == tl.num_programs(0) - 1) & (tl.program_id(1) == tl.num_programs(1) - 1):
        # Own-state words nothing else writes during a gather (a fault is recorded before it by the
        # barrier program, or, fused, by the elected program before it opened the gate this
        # program passed), and the signatures: loaded and compared before the wait, off the signal's path.
        new_count = (tl.load(gather_count_ptr) + 1) & FLAG_EPOCH_MASK
        faulted = _is_faulted(fault_record_ptr)
        disagree = faulted & (~faulted)  # false, unless compared here
        if COMPARE:
            ranks = tl.arange(0, EP_PAD)
            rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high)
            signatures, mine = _load_signatures(signatures_ptr, own_signature_ptr, stride_rank, ep_rank, rank_mask,
                                                EP_PAD, SIGNATURE_WORDS, COMPARED_WORDS, True)
            disagree = _signatures_disagree(signatures, mine, rank_mask, EP_PAD, COMPARED_WORDS)
        while tl.load(election_ptr, volatile=True) < others:
            pass
        # Each thread polls on its own and may leave the loop a poll later than another: none may
        # reset the counter before every thread has left, or a late one polls a zero forever (a
        # replay at 4096 tokens per rank hung this way on an H200 when the reset came sooner).
        tl.debug_barrier()
        # The next launch counts from zero; it reads the word after this kernel ends (stream
        # order), so a plain store does, without the acq_rel exchange's fence.
        tl.store(election_ptr, 0)
        if FUSED:  # every program has passed the gate: the next launch starts from zero too
            tl.store(arrivals_ptr, 0)
            tl.store(gate_ptr, 0)
        if disagree & (~faulted):  # recorded once, by this program; a fault recorded before outranks it
            faulted = _record_disagreement(signatures_ptr, own_signature_ptr, flag_value_ptr, flags_ptr, stride_rank,
                                           fault_record_ptr, host_record_ptr, active_low, active_high, ep_rank, PHASE,
                                           FLAG_ROW, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, SIGNATURE_WORDS,
                                           HAS_HOST_RECORD)
        _signal_gathered(new_count, faulted, gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank, active_low,
                         active_high, ep_rank, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE)
    else:
        tl.atomic_add(election_ptr, 1, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["runtime_max_tokens", "ep_rank", "stride_scales_rank", "num_tokens", "stride_rank",
                               "active_low", "active_high", "host_record_ptr"])
def _combine_kernel(
    plane_ptr,  # combine plane of segment 0, [EP_SIZE, runtime_max_tokens, HIDDEN], payload dtype
    stride_plane_rank,  # elements between the combine planes of two consecutive segments
    scales_ptr,  # with HAS_SCALES: fp32 scales plane of segment 0, [EP_SIZE, runtime_max_tokens]
    stride_scales_rank,  # fp32 elements between the scales planes of two consecutive segments
    out_ptr,  # [num_tokens, HIDDEN], output dtype
    topk_target_ranks_ptr,  # [num_tokens, TOP_K] int32, own segment
    topk_send_indices_ptr,  # [num_tokens, TOP_K] int32, own segment
    runtime_max_tokens,
    ep_rank,
    num_tokens,  # rows of out (the grid has max(1, num_tokens) rows, so a rank without tokens signals)
    election_ptr,  # [1] int32, own segment: gather programs finished (reset by the last program)
    gather_count_ptr,  # [1] int32, own segment: gathers this rank finished
    gathered_mask_ptr,  # [2] int32, own segment: the active-rank mask of its last gather (written here)
    flags_ptr,  # [3, EP_SIZE] int32 flag block of segment 0; segment t at + t * stride_rank
    stride_rank,  # int32 elements between two segments
    fault_record_ptr,  # [FAULT_RECORD_WORDS] int32, own segment
    active_low,  # active-rank mask, bits 0..31 (int32)
    active_high,  # bits 32..63
    signatures_ptr,  # [EP_SIZE, SIGNATURE_WORDS] int32: the combine signatures of segment 0
    own_signature_ptr,  # [SIGNATURE_WORDS] int32: this rank's signature of the round
    flag_value_ptr,  # [1] int32, own segment: this rank's epoch counter (the record of a mismatch names it)
    host_record_ptr,  # int64 address of the host-mapped copy of the record (0 without one)
    HIDDEN: tl.constexpr,
    TOP_K: tl.constexpr,
    TILE: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    EP_SIZE: tl.constexpr,
    EP_PAD: tl.constexpr,
    FLAG_ARRAY_STRIDE: tl.constexpr,
    PHASE: tl.constexpr,  # a2a.runtime.protocol.Phase.COMBINE
    FLAG_ROW: tl.constexpr,  # protocol.FlagArray.COMBINE
    SIGNATURE_WORDS: tl.constexpr,
    COMPARED_WORDS: tl.constexpr,  # leading signature words compared (the combine's fields; the rest are 0)
    HAS_HOST_RECORD: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
    COMPARE: tl.constexpr,  # the programs compare the signatures (else the barrier kernel did, a2a.ops.combine)
):
    if PDL:
        # Launched while the barrier kernel still gates (it lets this kernel launch once its wait
        # ends): bring this token's top-k entries (its first and last of each array) into L2 meanwhile.
        entries = tl.program_id(0).to(tl.int64) * TOP_K + tl.arange(0, 2) * (TOP_K - 1)
        _prefetch_l2(topk_target_ranks_ptr + entries)
        _prefetch_l2(topk_send_indices_ptr + entries)
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    _gather_tile(tl.program_id(0).to(tl.int64), tl.program_id(1), plane_ptr, stride_plane_rank, scales_ptr,
                 stride_scales_rank, out_ptr, topk_target_ranks_ptr, topk_send_indices_ptr, runtime_max_tokens, ep_rank,
                 num_tokens, signatures_ptr, own_signature_ptr, stride_rank, active_low, active_high, HIDDEN, TOP_K,
                 TILE, HAS_SCALES, EP_SIZE, EP_PAD, SIGNATURE_WORDS, COMPARED_WORDS, COMPARE)
    _finish_gather(election_ptr, gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank, fault_record_ptr,
                   active_low, active_high, ep_rank, election_ptr, election_ptr, signatures_ptr, own_signature_ptr,
                   flag_value_ptr, host_record_ptr, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, PHASE, FLAG_ROW,
                   SIGNATURE_WORDS, COMPARED_WORDS, HAS_HOST_RECORD, False, COMPARE)


@triton.jit
def _gate_gather(faulted, dispatch_rows, dispatch_rt, topk_target_ranks_ptr, num_tokens, runtime_max_tokens, flags_ptr,
                 stride_rank, fault_record_ptr, host_record_ptr, active_low, active_high, ep_rank,
                 TOP_K: tl.constexpr, BLOCK: tl.constexpr, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                 FLAG_ARRAY_STRIDE: tl.constexpr, HAS_HOST_RECORD: tl.constexpr):
    """Decide, once per combine and before its gather, whether the gather may read: not after a
    recorded fault (`faulted`: this rank's, or one the barrier just recorded), and not when the
    combine's token rows or rt differ from this rank's last dispatch (`dispatch_rows`,
    `dispatch_rt`; then record that fault). A lost round gets TOPK_TARGET_LOST in every top-k entry
    of its rows, so the gather loads no peer row and writes NaN; a healthy round costs the gather
    nothing."""
    matches_dispatch = (dispatch_rows == num_tokens) & (dispatch_rt == runtime_max_tokens)
    if (~faulted) & (~matches_dispatch):
        _record_round_mismatch(dispatch_rows, dispatch_rt, num_tokens, runtime_max_tokens, flags_ptr, stride_rank,
                               fault_record_ptr, host_record_ptr, active_low, active_high, ep_rank, EP_SIZE, EP_PAD,
                               FLAG_ARRAY_STRIDE, HAS_HOST_RECORD)
    if faulted | (~matches_dispatch):
        entries = num_tokens * TOP_K  # <= max_num_tokens * MAX_TOP_K: rt <= max_num_tokens (host-checked)
        lost = tl.zeros([BLOCK], dtype=tl.int32) + TOPK_TARGET_LOST
        for start in range(0, entries, BLOCK):
            index = start + tl.arange(0, BLOCK)
            tl.store(topk_target_ranks_ptr + index, lost, mask=index < entries)


@triton.jit
def _combine_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
                     host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, topk_target_ranks_ptr,
                     dispatch_rows_ptr, dispatch_rt_ptr, num_tokens, runtime_max_tokens, PHASE: tl.constexpr,
                     FLAG_ROW: tl.constexpr, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                     FLAG_ARRAY_STRIDE: tl.constexpr, SIGNATURE_WORDS: tl.constexpr, TOP_K: tl.constexpr,
                     GATE_BLOCK: tl.constexpr, SIGNAL: tl.constexpr, WAIT: tl.constexpr, GATE: tl.constexpr,
                     HAS_HOST_RECORD: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, COMPARE: tl.constexpr):
    """The combine barrier program's work (see `_combine_barrier_kernel`), in that kernel or in the
    elected program of `_fused_combine_kernel`; LAUNCH_DEPENDENTS lets the next kernel launch
    (PDL) once the wait is over, before the gate. COMPARE: compare the signatures after the wait
    (a disagreement is recorded, so the gate marks the round lost); else the gather compares them."""
    # Written by this rank's dispatch copy, an earlier kernel on this stream: loaded off the wait's path.
    dispatch_rows = tl.load(dispatch_rows_ptr)
    dispatch_rt = tl.load(dispatch_rt_ptr)
    faulted = _is_faulted(fault_record_ptr)  # without SIGNAL: after the host's wait, which may have recorded
    if SIGNAL:
        faulted = _phase_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank,
                                 fault_record_ptr, host_record_ptr, timeout_ns, timeout_ms, active_low, active_high,
                                 ep_rank, PHASE, FLAG_ROW, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, SIGNATURE_WORDS, WAIT,
                                 HAS_HOST_RECORD, LAUNCH_DEPENDENTS, COMPARE)
    if LAUNCH_DEPENDENTS:  # already done once the wait ended, unless there was none (a fault recorded before)
        gdc_launch_dependents()
    if GATE:
        _gate_gather(faulted, dispatch_rows, dispatch_rt, topk_target_ranks_ptr, num_tokens, runtime_max_tokens,
                     flags_ptr, stride_rank, fault_record_ptr, host_record_ptr, active_low, active_high, ep_rank, TOP_K,
                     GATE_BLOCK, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, HAS_HOST_RECORD)


@triton.jit(do_not_specialize=["ep_rank", "stride_rank", "host_record_ptr", "timeout_ns", "timeout_ms", "active_low",
                               "active_high", "num_tokens", "runtime_max_tokens"])
def _combine_barrier_kernel(
    flag_value_ptr,  # [1] int32, own segment: this rank's epoch counter
    flags_ptr,  # [3, EP_SIZE] int32 flag block of segment 0; segment t at + t * stride_rank
    signatures_ptr,  # [EP_SIZE, SIGNATURE_WORDS] int32: the combine signatures of segment 0
    own_signature_ptr,  # [SIGNATURE_WORDS] int32: this rank's signature of the round
    stride_rank,  # int32 elements between two segments
    fault_record_ptr,  # [FAULT_RECORD_WORDS] int32, own segment
    host_record_ptr,  # int64 address of the host-mapped copy of the record (0 without one)
    timeout_ns,
    timeout_ms,
    active_low,  # active-rank mask, bits 0..31 (int32)
    active_high,  # bits 32..63
    ep_rank,
    topk_target_ranks_ptr,  # [num_tokens, TOP_K] int32, own segment (marked lost by the gate)
    dispatch_rows_ptr,  # [1] int32, own segment: token rows of the last dispatch
    dispatch_rt_ptr,  # [1] int32, own segment: its runtime_max_tokens_per_rank
    num_tokens,  # the combine's token rows
    runtime_max_tokens,  # the combine's rt
    PHASE: tl.constexpr,  # a2a.runtime.protocol.Phase.COMBINE
    FLAG_ROW: tl.constexpr,  # protocol.FlagArray.COMBINE
    EP_SIZE: tl.constexpr,
    EP_PAD: tl.constexpr,
    FLAG_ARRAY_STRIDE: tl.constexpr,  # int32 elements between two flag arrays of a segment
    SIGNATURE_WORDS: tl.constexpr,
    TOP_K: tl.constexpr,
    GATE_BLOCK: tl.constexpr,
    SIGNAL: tl.constexpr,  # signal this rank's combine plane ready (and, with WAIT, wait for the peers')
    WAIT: tl.constexpr,  # CUDA; on the CPU the host waits between a SIGNAL launch and a GATE launch
    GATE: tl.constexpr,  # then decide whether the gather may read (_gate_gather)
    HAS_HOST_RECORD: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
    COMPARE: tl.constexpr,  # (WAIT) compare the peers' signatures after the wait; else the gather does
):
    """One program between staging and gather: everything this rank's stream did before is visible
    to every peer, then (WAIT) every peer's signal for the combine has arrived (or a fault is
    recorded) and (COMPARE) their signatures agree with this rank's (or a MISMATCH is recorded),
    then (GATE) the gather is let through or marked lost.

    With PDL the gather may launch once the wait is over (its programs then wait in
    `griddepcontrol.wait` for this kernel to complete, gate included): never before, so no gather
    program holds an SM while this rank still waits for a peer that may need it."""
    if PDL:
        # While the previous kernel finishes: this rank's round state (epoch, dispatch rows and rt,
        # fault record: one 128-byte line) and its signature, the first loads after the wait.
        _prefetch_l2(flag_value_ptr)
        _prefetch_l2(own_signature_ptr)
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    _combine_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
                     host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, topk_target_ranks_ptr,
                     dispatch_rows_ptr, dispatch_rt_ptr, num_tokens, runtime_max_tokens, PHASE, FLAG_ROW, EP_SIZE,
                     EP_PAD, FLAG_ARRAY_STRIDE, SIGNATURE_WORDS, TOP_K, GATE_BLOCK, SIGNAL, WAIT, GATE,
                     HAS_HOST_RECORD, PDL, COMPARE)


@triton.jit(do_not_specialize=["runtime_max_tokens", "ep_rank", "stride_scales_rank", "num_tokens", "stride_rank",
                               "active_low", "active_high", "host_record_ptr", "timeout_ns", "timeout_ms"])
def _fused_combine_kernel(
    # `_combine_kernel`'s parameters, in its order:
    plane_ptr, stride_plane_rank, scales_ptr, stride_scales_rank, out_ptr, topk_target_ranks_ptr, topk_send_indices_ptr,
    runtime_max_tokens, ep_rank, num_tokens, election_ptr, gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank,
    fault_record_ptr, active_low, active_high, signatures_ptr, own_signature_ptr, flag_value_ptr, host_record_ptr,
    # then `_combine_barrier_kernel`'s that it lacks:
    timeout_ns,
    timeout_ms,
    dispatch_rows_ptr,  # [1] int32, own segment: token rows of the last dispatch
    dispatch_rt_ptr,  # [1] int32, own segment: its runtime_max_tokens_per_rank
    arrivals_ptr,  # [1] int32, own segment: programs of this launch that have started (reset by the last)
    gate_ptr,  # [1] int32, own segment: 1 once the elected program has passed the barrier (reset by the last)
    HIDDEN: tl.constexpr,
    TOP_K: tl.constexpr,
    TILE: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    EP_SIZE: tl.constexpr,
    EP_PAD: tl.constexpr,
    FLAG_ARRAY_STRIDE: tl.constexpr,
    PHASE: tl.constexpr,  # a2a.runtime.protocol.Phase.COMBINE
    FLAG_ROW: tl.constexpr,  # protocol.FlagArray.COMBINE
    SIGNATURE_WORDS: tl.constexpr,
    COMPARED_WORDS: tl.constexpr,
    GATE_BLOCK: tl.constexpr,
    SIGNAL: tl.constexpr,  # signal and (WAIT) wait in the elected program; else the host did both before
    WAIT: tl.constexpr,  # CUDA: the programs run concurrently (the interpreter runs them one by one)
    HAS_HOST_RECORD: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
):
    """Barrier and gather in one launch, for grids that fit on the GPU beside every peer's
    (a2a.ops.combine decides): the first program to start runs the combine barrier program's work
    (`_combine_barrier`: signal, wait, gate), then opens the gate; every other program waits for
    the gate before it reads a top-k entry or a peer's row. Every program compares the signatures
    as `_combine_kernel`'s do with COMPARE (a2a.ops.combine fuses only rounds whose gather
    compares). Electing the first to arrive, not a fixed program id, means the barrier program
    is always one that holds an SM, whatever order the GPU schedules the grid in.
    The last program resets the arrival and gate words with the election (`_finish_gather`)."""
    if PDL:
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    ticket = tl.atomic_add(arrivals_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == 0:
        _combine_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
                         host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank,
                         topk_target_ranks_ptr, dispatch_rows_ptr, dispatch_rt_ptr, num_tokens, runtime_max_tokens,
                         PHASE, FLAG_ROW, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, SIGNATURE_WORDS, TOP_K, GATE_BLOCK,
                         SIGNAL, WAIT, True, HAS_HOST_RECORD, False, False)
        # Every thread's gate stores (a lost round's marks) are issued before the release publishes them.
        tl.debug_barrier()
        tl.atomic_xchg(gate_ptr, 1, sem="release", scope="gpu")
    else:
        while tl.load(gate_ptr, volatile=True) == 0:
            pass
        if WAIT:  # programs run concurrently: acquire what the elected program published (marks; the
            _fence_acquire_gpu()  # peers' rows it acquired at system scope before it opened the gate)
    _gather_tile(tl.program_id(0).to(tl.int64), tl.program_id(1), plane_ptr, stride_plane_rank, scales_ptr,
                 stride_scales_rank, out_ptr, topk_target_ranks_ptr, topk_send_indices_ptr, runtime_max_tokens, ep_rank,
                 num_tokens, signatures_ptr, own_signature_ptr, stride_rank, active_low, active_high, HIDDEN, TOP_K,
                 TILE, HAS_SCALES, EP_SIZE, EP_PAD, SIGNATURE_WORDS, COMPARED_WORDS, True)
    _finish_gather(election_ptr, gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank, fault_record_ptr,
                   active_low, active_high, ep_rank, arrivals_ptr, gate_ptr, signatures_ptr, own_signature_ptr,
                   flag_value_ptr, host_record_ptr, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, PHASE, FLAG_ROW,
                   SIGNATURE_WORDS, COMPARED_WORDS, HAS_HOST_RECORD, True, True)
