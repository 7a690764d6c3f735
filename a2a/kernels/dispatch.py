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

Payloads are copied as opaque units (int32 / int16 / uint8 views chosen by the launcher from row
bytes and alignment); VEC_UNITS[p] > 1 promises that every source and destination row of payload
p starts on a VEC_UNITS-unit boundary, so loads and stores can be 16-byte vectors.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from a2a.kernels.signal import _phase_barrier


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
def _copy_row_tile(src_ptr, dst_ptr, dst_stride, token, tile, block, topk_row, first_row, healthy,
                   topk_target_ranks_ptr, topk_local_slots_ptr, block_offsets_ptr,
                   ROW_UNITS: tl.constexpr, VEC_UNITS: tl.constexpr, TOP_K: tl.constexpr,
                   EP_SIZE: tl.constexpr, TILE: tl.constexpr, K_CHUNK: tl.constexpr):
    """Tile `tile` of one payload row of `token`: read once, stored to every unique target with one
    masked [K_CHUNK, TILE] store per chunk of k (no per-k scalar round trips)."""
    if tile * TILE < ROW_UNITS:
        cols = tile * TILE + tl.arange(0, TILE)
        col_mask = cols < ROW_UNITS
        src = src_ptr
        if VEC_UNITS > 1:
            src = tl.multiple_of(src, 16)  # VEC_UNITS > 1 means 16-byte aligned rows
        row = tl.load(src + token * ROW_UNITS + cols, mask=col_mask)
        for chunk in tl.static_range(triton.cdiv(TOP_K, K_CHUNK)):
            ks, k_mask, targets, rows, sends, slots = _chunk_destinations(
                topk_target_ranks_ptr, topk_local_slots_ptr, block_offsets_ptr, topk_row, block, first_row,
                chunk, TOP_K, EP_SIZE, K_CHUNK)
            offsets = targets * dst_stride + rows * ROW_UNITS
            values = tl.broadcast_to(row[None, :], [K_CHUNK, TILE])
            stores = sends & healthy  # a rank that recorded a fault stores nothing into any segment
            tl.store(dst_ptr + offsets[:, None] + cols[None, :], values, mask=stores[:, None] & col_mask[None, :])


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

    # Every thread's stores must be issued before the election increment publishes them.
    tl.debug_barrier()
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    finished = tl.atomic_add(election_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == num_programs - 1:
        tl.store(election_ptr, 0)
        tl.store(dispatch_rows_ptr, num_rows)
        tl.store(dispatch_rt_ptr, runtime_max_tokens)
        _phase_barrier(flag_value_ptr, flags_ptr, signatures_ptr, own_signature_ptr, stride_rank, fault_record_ptr,
                       host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, PHASE, FLAG_ROW,
                       EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, SIGNATURE_WORDS, WAIT, HAS_HOST_RECORD)


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
