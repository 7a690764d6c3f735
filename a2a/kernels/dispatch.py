"""Dispatch copy: every local token's payload rows into each target rank's receive planes.

Grid `(num_tokens, num_tiles)`: program `(i, c)` copies column tile `c` of every payload row of
token `i` (payloads narrower than `c * TILE` units skip it). The row is read once and stored to
each unique target `t` of the token (one masked 2-D store per chunk of K_CHUNK k values) at
receive plane row `[ep_rank][slot]` of segment `t`, where
`slot = block_offsets[i // BLOCK_TOKENS, t] + topk_local_slots[i, k]` (see routing). Programs of
tile 0 also store the final slots in `topk_send_indices` for combine.

Programs of tokens >= num_tokens (with COUNT_FROM_DEVICE: the count at `num_tokens_ptr`, clamped
to [0, num_tokens]) copy nothing (the grid has at least one token row, so a rank without tokens
still signals), nor does any program of a rank that has recorded a fault (a2a.runtime.protocol:
no remote store after a fault). Every program then takes part in an acq_rel election and the last
one runs the dispatch barrier (a2a.kernels.signal): its release makes every program's stores
visible to the peers before the flag, and its wait compares the peers' round signatures.

`_fused_dispatch_kernel`, the copy's grid, for rounds of one routing block: routing and the copy
in one launch (every program routes the block itself and waits for the previous round's gathers
before it stores; see its docstring). a2a.ops.dispatch decides when it runs.

Payloads are copied as opaque units (int32 / int16 / uint8 views chosen by the launcher from row
bytes and alignment); VEC_UNITS[p] > 1 promises that every source and destination row of payload
p starts on a VEC_UNITS-unit boundary, so loads and stores can be 16-byte vectors.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from a2a.kernels.routing import _route_block, _store_counts
from a2a.kernels.signal import (_fence_acquire_system, _phase_barrier, _prefetch_previous_gathers,
                               _program_awaits_previous_gathers, _record_ordering_trouble)


@triton.jit
def _chunk_destinations(topk_target_ranks_ptr, topk_local_slots_ptr, block_offsets_ptr, topk_row, block,
                        first_row, chunk, TOP_K: tl.constexpr, EP_SIZE: tl.constexpr, K_CHUNK: tl.constexpr):
    """Targets, receive rows and validity of k = chunk * K_CHUNK ... + K_CHUNK - 1 (vectors)."""
    ks = chunk * K_CHUNK + tl.arange(0, K_CHUNK)
    k_mask = ks < TOP_K
    targets = tl.load(topk_target_ranks_ptr + topk_row + ks, mask=k_mask, other=-1)
    sends = targets >= 0
    local = tl.load(topk_local_slots_ptr + topk_row + ks, mask=sends, other=0)
    base = tl.load(block_offsets_ptr + block * EP_SIZE + targets, mask=sends, other=0)
    slots = local + base
    return ks, k_mask, tl.where(sends, targets, 0).to(tl.int64), first_row + slots, sends, slots


@triton.jit
def _load_row_tile(src_ptr, token, tile, in_rows, ROW_UNITS: tl.constexpr, VEC_UNITS: tl.constexpr,
                   TILE: tl.constexpr):
    """Column tile `tile` of payload row `token` (nothing read unless `in_rows`): (values, columns,
    column mask)."""
    cols = tile * TILE + tl.arange(0, TILE)
    col_mask = (cols < ROW_UNITS) & ((cols * 0 + in_rows.to(tl.int32)) != 0)  # a tensor mask (the interpreter)
    src = src_ptr
    if VEC_UNITS > 1:
        src = tl.multiple_of(src, 16)  # VEC_UNITS > 1 means 16-byte aligned rows
    return tl.load(src + token * ROW_UNITS + cols, mask=col_mask), cols, col_mask


@triton.jit
def _store_row_tile(row, cols, col_mask, dst_ptr, dst_stride, targets, rows, stores, ROW_UNITS: tl.constexpr,
                    K_CHUNK: tl.constexpr, TILE: tl.constexpr):
    """One masked [K_CHUNK, TILE] store of a row tile to receive row `rows[j]` of segment
    `targets[j]` for every j with `stores[j]` (no per-k scalar round trips)."""
    offsets = targets * dst_stride + rows * ROW_UNITS
    values = tl.broadcast_to(row[None, :], [K_CHUNK, TILE])
    tl.store(dst_ptr + offsets[:, None] + cols[None, :], values, mask=stores[:, None] & col_mask[None, :])


@triton.jit
def _copy_row_tile(src_ptr, dst_ptr, dst_stride, token, tile, block, topk_row, first_row, healthy,
                   topk_target_ranks_ptr, topk_local_slots_ptr, block_offsets_ptr,
                   ROW_UNITS: tl.constexpr, VEC_UNITS: tl.constexpr, TOP_K: tl.constexpr,
                   EP_SIZE: tl.constexpr, TILE: tl.constexpr, K_CHUNK: tl.constexpr):
    """Tile `tile` of one payload row of `token`: read once, stored to every unique target with one
    masked [K_CHUNK, TILE] store per chunk of k."""
    if tile * TILE < ROW_UNITS:
        row, cols, col_mask = _load_row_tile(src_ptr, token, tile, token >= 0, ROW_UNITS, VEC_UNITS, TILE)
        for chunk in tl.static_range(triton.cdiv(TOP_K, K_CHUNK)):
            ks, k_mask, targets, rows, sends, slots = _chunk_destinations(
                topk_target_ranks_ptr, topk_local_slots_ptr, block_offsets_ptr, topk_row, block, first_row,
                chunk, TOP_K, EP_SIZE, K_CHUNK)
            # A rank that recorded a fault stores nothing into any segment.
            _store_row_tile(row, cols, col_mask, dst_ptr, dst_stride, targets, rows, sends & healthy, ROW_UNITS,
                            K_CHUNK, TILE)


@triton.jit
def _last_program_done(election_ptr, dispatch_rows_ptr, dispatch_rt_ptr, num_rows, runtime_max_tokens):
    """After a program's stores (rows, and in the fused kernel trouble words): count it done in an
    acq_rel election, so the last program sees every other one's stores and its release publishes
    them. The last resets the election (the next launch counts from zero) and records this
    dispatch's token rows and rt for combine's check. Returns whether this program is the last."""
    # Every thread's stores must be issued before the election increment publishes them.
    tl.debug_barrier()
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    last = tl.atomic_add(election_ptr, 1, sem="acq_rel", scope="gpu") == num_programs - 1
    if last:
        tl.store(election_ptr, 0)
        tl.store(dispatch_rows_ptr, num_rows)
        tl.store(dispatch_rt_ptr, runtime_max_tokens)
    return last


@triton.jit(do_not_specialize=["num_tokens", "runtime_max_tokens", "ep_rank", "stride_rank", "host_record_ptr",
                               "timeout_ns", "timeout_ms", "active_low", "active_high"],
            do_not_specialize_on_alignment=["src_ptrs"])
def _dispatch_copy_kernel(
    src_ptrs,  # tuple of NUM_PAYLOADS: [num_tokens, ROW_UNITS[p]] copy units, the caller's payloads
    dst_ptrs,  # tuple: receive plane p of segment 0, [EP_SIZE, runtime_max_tokens, ROW_UNITS[p]]
    dst_strides,  # tuple: copy units between the same plane of two consecutive segments
    topk_target_ranks_ptr,  # [num_tokens, TOP_K] int32, own segment
    topk_local_slots_ptr,  # [num_tokens, TOP_K] int32, own segment
    block_offsets_ptr,  # [num_blocks, EP_SIZE] int32, own segment
    topk_send_indices_ptr,  # [num_tokens, TOP_K] int32, own segment (written here)
    dispatch_rows_ptr,  # [1] int32, own segment: this dispatch's token rows, for combine's check
    dispatch_rt_ptr,  # [1] int32, own segment: its runtime_max_tokens
    election_ptr,  # [1] int32, own segment: programs finished (reset by the last)
    flag_value_ptr,  # [1] int32, own segment: this rank's epoch counter
    flags_ptr,  # [3, EP_SIZE] int32 flag block of segment 0; segment t at + t * stride_rank
    signatures_ptr,  # [EP_SIZE, SIGNATURE_WORDS] int32: dispatch signatures of segment 0
    own_signature_ptr,  # [SIGNATURE_WORDS] int32: this rank's dispatch signature
    stride_rank,  # int32 elements between two segments
    fault_record_ptr,  # [FAULT_RECORD_WORDS] int32, own segment
    host_record_ptr,  # int64 address of its host-mapped copy (0 without one)
    timeout_ns,
    timeout_ms,
    active_low,  # active-rank mask, bits 0..31 (int32)
    active_high,  # bits 32..63
    num_tokens_ptr,  # [1] int32: real tokens (read with COUNT_FROM_DEVICE)
    num_tokens,  # real tokens; with COUNT_FROM_DEVICE the rows of the payloads (an upper bound)
    runtime_max_tokens,
    ep_rank,
    NUM_PAYLOADS: tl.constexpr,
    ROW_UNITS: tl.constexpr,  # tuple: copy units per row of each payload
    VEC_UNITS: tl.constexpr,  # tuple: proven alignment (in units) of every row of each payload
    TOP_K: tl.constexpr,
    K_CHUNK: tl.constexpr,  # k values handled by one masked 2-D store (power of 2, <= 8)
    EP_SIZE: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    TILE: tl.constexpr,
    EP_PAD: tl.constexpr,  # next power of 2 >= EP_SIZE
    PHASE: tl.constexpr,  # protocol.Phase.DISPATCH
    FLAG_ROW: tl.constexpr,  # protocol.FlagArray.DISPATCH
    FLAG_ARRAY_STRIDE: tl.constexpr,  # int32 elements between two flag arrays of a segment
    SIGNATURE_WORDS: tl.constexpr,
    WAIT: tl.constexpr,  # the last program waits (CUDA; the host waits on the CPU)
    HAS_HOST_RECORD: tl.constexpr,
    COUNT_FROM_DEVICE: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
):
    if PDL:
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    token = tl.program_id(0).to(tl.int64)
    num_rows = num_tokens
    if COUNT_FROM_DEVICE:
        num_tokens = tl.minimum(tl.maximum(tl.load(num_tokens_ptr), 0), num_tokens)
    tile = tl.program_id(1)
    block = token // BLOCK_TOKENS
    topk_row = token * TOP_K

    # Read with the rows, needed only by the stores: no dependent round trip before the copy.
    healthy = (tl.arange(0, K_CHUNK) * 0 + tl.load(fault_record_ptr)) == 0
    if token < num_tokens:
        first_row = ep_rank.to(tl.int64) * runtime_max_tokens
        if tile == 0:
            for chunk in tl.static_range(triton.cdiv(TOP_K, K_CHUNK)):
                ks, k_mask, targets, rows, sends, slots = _chunk_destinations(
                    topk_target_ranks_ptr, topk_local_slots_ptr, block_offsets_ptr, topk_row, block, first_row,
                    chunk, TOP_K, EP_SIZE, K_CHUNK)
                tl.store(topk_send_indices_ptr + topk_row + ks, tl.where(sends, slots, -1), mask=k_mask)

        for p in tl.static_range(NUM_PAYLOADS):
            _copy_row_tile(src_ptrs[p], dst_ptrs[p], dst_strides[p], token, tile, block, topk_row, first_row, healthy,
                           topk_target_ranks_ptr, topk_local_slots_ptr, block_offsets_ptr,
                           ROW_UNITS[p], VEC_UNITS[p], TOP_K, EP_SIZE, TILE, K_CHUNK)

    if _last_program_done(election_ptr, dispatch_rows_ptr, dispatch_rt_ptr, num_rows, runtime_max_tokens):
        _phase_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
                       host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, PHASE, FLAG_ROW,
                       EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, SIGNATURE_WORDS, WAIT, HAS_HOST_RECORD, PDL, True)


@triton.jit(do_not_specialize=["num_tokens", "runtime_max_tokens", "ep_rank", "stride_rank", "host_record_ptr",
                               "timeout_ns", "timeout_ms", "active_low", "active_high", "num_experts", "experts_base",
                               "experts_remainder"],
            do_not_specialize_on_alignment=["src_ptrs", "expert_ids_ptr"])
def _fused_dispatch_kernel(
    src_ptrs, dst_ptrs, dst_strides,  # as in _dispatch_copy_kernel
    expert_ids_ptr,  # [num_tokens, TOP_K] int32: the caller's routing
    topk_target_ranks_ptr,  # [num_tokens, TOP_K] int32, own segment (written here)
    topk_send_indices_ptr,  # [num_tokens, TOP_K] int32, own segment (written here)
    dispatch_rows_ptr, dispatch_rt_ptr, election_ptr, flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr,
    stride_rank, fault_record_ptr, host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, num_tokens_ptr,
    num_tokens, runtime_max_tokens, ep_rank,  # as in _dispatch_copy_kernel
    invalid_count_ptr,  # [1] int32, own segment: (token, k) pairs skipped for a bad id
    send_counters_ptr,  # [EP_SIZE] int32, own segment
    recv_counters_ptr,  # [EP_SIZE] int32 in segment 0; segment t at + t * stride_rank
    gather_count_ptr,  # [1] int32, own segment: gathers this rank finished
    gathered_mask_ptr,  # [2] int32, own segment: the active-rank mask of its last gather
    trouble_ptr,  # [4] int32, own segment: RoundState.ORDERING_TROUBLE (zero between launches)
    num_experts,
    experts_base,
    experts_remainder,
    NUM_PAYLOADS: tl.constexpr,
    ROW_UNITS: tl.constexpr,
    VEC_UNITS: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,  # next power of 2 >= TOP_K; at most 8 (one [K_PAD, TILE] store per payload tile)
    EP_SIZE: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,  # a power of 2 >= the token rows (one routing block)
    ROUTE_K_CHUNK: tl.constexpr,  # routing's K_CHUNK and RANK_CHUNK (a2a.kernels.routing)
    RANK_CHUNK: tl.constexpr,
    TILE: tl.constexpr,
    EP_PAD: tl.constexpr,
    PHASE: tl.constexpr,
    FLAG_ROW: tl.constexpr,
    FLAG_ARRAY_STRIDE: tl.constexpr,
    SIGNATURE_WORDS: tl.constexpr,
    WAIT: tl.constexpr,  # every program waits for the previous gathers, the last one for the peers (CUDA)
    HAS_HOST_RECORD: tl.constexpr,
    COUNT_FROM_DEVICE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Routing and the copy of a round of one routing block in one launch (grid as the copy's).

    Every program routes the whole block on registers (a2a.kernels.routing._route_block: the same
    targets and slots as `_route_kernel`) and keeps its token's entries; tile-0 programs store
    them for combine. With WAIT each program then waits for the previous round's gathers itself
    before it stores into any segment (a2a.kernels.signal._program_awaits_previous_gathers: what
    it cannot see becomes trouble words, not a store), so all of its programs may spin at once:
    the launcher fuses only grids that fit on the GPU beside every peer's. The last program of the
    election records any trouble as this rank's fault, writes the counters (remote ones only when
    healthy) and runs the dispatch barrier like `_dispatch_copy_kernel`'s."""
    if PDL:
        _prefetch_previous_gathers(gather_count_ptr, flags_ptr, stride_rank, ep_rank, FLAG_ARRAY_STRIDE)
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    num_rows = num_tokens
    if COUNT_FROM_DEVICE:
        num_tokens = tl.minimum(tl.maximum(tl.load(num_tokens_ptr), 0), num_tokens)
    # Own-state words written by earlier kernels on this stream (nothing writes them during this one).
    gather_count = tl.load(gather_count_ptr)
    previous_low = tl.load(gathered_mask_ptr)
    previous_high = tl.load(gathered_mask_ptr + 1)
    healthy = tl.load(fault_record_ptr) == 0

    tokens = tl.arange(0, BLOCK_TOKENS).to(tl.int64)
    target, local_slot, counts, invalid, entry_offsets, col_mask = _route_block(
        expert_ids_ptr, tokens, tokens < num_tokens, num_experts, experts_base, experts_remainder, active_low,
        active_high, TOP_K, K_PAD, EP_PAD, BLOCK_TOKENS, ROUTE_K_CHUNK, RANK_CHUNK)
    tl.static_assert(K_PAD <= 8, "one [K_PAD, TILE] store per payload tile: top_k <= 8")
    mine = tokens[:, None] == token
    # -1 where not sent, and for a row outside the block (the launcher never makes one): never rank 0.
    my_targets = tl.sum(tl.where(mine, target + 1, 0), axis=0) - 1  # [K_PAD]
    my_slots = tl.sum(tl.where(mine, local_slot, 0), axis=0)
    sends = my_targets >= 0
    ks = tl.arange(0, K_PAD)
    if (tile == 0) & (token < num_rows):
        tl.store(topk_target_ranks_ptr + token * TOP_K + ks, my_targets, mask=ks < TOP_K)
        tl.store(topk_send_indices_ptr + token * TOP_K + ks, tl.where(sends, my_slots, -1), mask=ks < TOP_K)

    copies = token < num_tokens
    # The widest payload is usually first: its row is read before the wait, which it then overlaps.
    row, cols, row_mask = _load_row_tile(src_ptrs[0], token, tile, copies, ROW_UNITS[0], VEC_UNITS[0], TILE)
    ordered = healthy
    if WAIT:
        ordered = _program_awaits_previous_gathers(gather_count, previous_low, previous_high, healthy, flags_ptr,
                                                   stride_rank, trouble_ptr, timeout_ns, ep_rank, EP_SIZE, EP_PAD,
                                                   FLAG_ARRAY_STRIDE)
        # The rows below go into planes a peer may have been reading until the flags just seen: the
        # PTX model orders those stores after the polls only through an acquire (a store predicated
        # on a polled value is not enough on paper). It costs 1-2 us of a 1-16 token dispatch on an
        # H200; polling with ld.acquire.sys loads instead measured no better (bench/RESULTS.md). The
        # routing kernel needs none: its rows come from a later kernel.
        _fence_acquire_system()
    if copies:
        targets = tl.where(sends, my_targets, 0).to(tl.int64)
        rows = ep_rank.to(tl.int64) * runtime_max_tokens + my_slots
        stores = sends & ((ks * 0 + ordered.to(tl.int32)) != 0)  # nothing before the gathers, nothing after a fault
        _store_row_tile(row, cols, row_mask, dst_ptrs[0], dst_strides[0], targets, rows, stores, ROW_UNITS[0], K_PAD,
                        TILE)
        for p in tl.static_range(1, NUM_PAYLOADS):
            if tile * TILE < ROW_UNITS[p]:
                row_p, cols_p, mask_p = _load_row_tile(src_ptrs[p], token, tile, copies, ROW_UNITS[p], VEC_UNITS[p],
                                                        TILE)
                _store_row_tile(row_p, cols_p, mask_p, dst_ptrs[p], dst_strides[p], targets, rows, stores,
                                ROW_UNITS[p], K_PAD, TILE)

    if _last_program_done(election_ptr, dispatch_rows_ptr, dispatch_rt_ptr, num_rows, runtime_max_tokens):
        faulted = ~healthy
        if WAIT:
            if healthy:
                faulted = _record_ordering_trouble(trouble_ptr, gather_count, flags_ptr, stride_rank, fault_record_ptr,
                                                   host_record_ptr, timeout_ms, active_low, active_high, ep_rank,
                                                   EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, HAS_HOST_RECORD)
        total_invalid = tl.sum(tl.sum(invalid.to(tl.int32), axis=1), axis=0)
        _store_counts(counts, total_invalid, ~faulted, send_counters_ptr, recv_counters_ptr, invalid_count_ptr,
                      stride_rank, active_low, active_high, ep_rank, EP_SIZE, EP_PAD)
        _phase_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
                       host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, PHASE, FLAG_ROW,
                       EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, SIGNATURE_WORDS, WAIT, HAS_HOST_RECORD, PDL, True)


@triton.jit(do_not_specialize=["stride_rank", "ep_rank", "active_low", "active_high"],
            do_not_specialize_on_alignment=["local_stats_ptr"])
def _share_stats_kernel(
    local_stats_ptr,  # [NUM_STATS] int32: this rank's EPLB statistics
    gathered_ptr,  # [EP_SIZE, NUM_STATS] int32 region of segment 0; segment t at + t * stride_rank
    stride_rank,  # int32 elements between two segments
    fault_record_ptr,  # [FAULT_RECORD_WORDS] int32, own segment
    active_low,  # active-rank mask, bits 0..31 (int32)
    active_high,  # bits 32..63
    ep_rank,
    NUM_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
):
    """Program t: this rank's statistics into row `ep_rank` of active rank t's gathered region
    (nothing remote after a recorded fault); for an inactive t, zeros into this rank's row t.
    Launched after the routing kernel (which waited for the previous round's gathers) and before
    the copy kernel, whose barrier publishes these stores with the rows."""
    if PDL:
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    target = tl.program_id(0)
    word = tl.where(target < 32, active_low, active_high)
    active = ((word >> (target & 31)) & 1) != 0
    own = gathered_ptr + ep_rank.to(tl.int64) * stride_rank + target * NUM_STATS
    remote = gathered_ptr + target.to(tl.int64) * stride_rank + ep_rank * NUM_STATS
    for start in tl.static_range(0, NUM_STATS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < NUM_STATS
        if active:
            values = tl.load(local_stats_ptr + cols, mask=in_row)
            healthy = tl.load(fault_record_ptr + cols * 0) == 0  # a tensor, for the mask
            tl.store(remote + cols, values, mask=in_row & healthy)
        else:
            tl.store(own + cols, tl.zeros([BLOCK], dtype=tl.int32), mask=in_row)
