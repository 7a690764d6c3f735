"""Routing: expert -> owner rank, first-occurrence de-duplication, deterministic slots, counters.

One program per block of BLOCK_TOKENS local tokens. Each program loads the block's expert ids as one
[BLOCK_TOKENS, K_PAD] tile and, on registers:
1. maps every (token, k) to its owner rank (-1 for an id outside [0, num_experts), an inactive
   owner, or a rank the token already sends to through an earlier k) and stores `topk_target_ranks`;
2. gives each (token, k) its slot inside the block (`topk_local_slots`: earlier tokens of the block
   sending to the same target), from a scan of the block's one-hot sends over its tokens;
3. publishes its per-target counts in `block_counts[block]`.
Experts of inactive ranks (bit clear in the active-rank mask) are not sent to: their k gets -1
like a repeat (not counted as invalid); no counter is written into an inactive rank, and this rank's
own `recv_counters` of inactive sources are zeroed, so sanitize and combine skip them.
With several blocks, the last program to finish (an acq_rel election counter, reset by that program
so the next round, or a graph replay, starts from zero) turns the counts into exclusive per-block
offsets; a single block (SINGLE_BLOCK, up to BLOCK_TOKENS tokens) has zero offsets and needs no
election. Then `send_counters` is written and (WAIT) the program waits until every rank of the
previous round has finished gathering it (a2a.kernels.signal._await_previous_gathers: this round's
rows may land where that round's combine plane was) and stores `recv_counters[ep_rank]` into every
target's segment, unless this rank has recorded a fault (then it stores nothing remotely; see
a2a.runtime.protocol). A token's final slot at target t is `block_offsets[block, t] +
topk_local_slots`: the number of earlier local tokens sent to t, so receive order equals source
order and two runs are bitwise identical.

With COUNT_FROM_DEVICE the number of real tokens is read from `num_tokens_ptr` (clamped to
[0, num_rows]); rows past it are padding: never sent, their top-k entries set to -1, so a CUDA graph
captured once serves any count. Otherwise all `num_rows` rows are tokens.

This pass also does the "prepare" work of a round: every per-round counter it reads is fully
rewritten here, so no separate reset launch is needed.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from a2a.kernels.signal import _await_previous_gathers, _prefetch_previous_gathers, _rank_is_active


@triton.jit
def _owner_rank(expert, experts_base, experts_remainder):
    # Contiguous ownership; the first `remainder` ranks own base + 1 experts.
    split = experts_remainder * (experts_base + 1)
    big = expert // (experts_base + 1)
    small = experts_remainder + (expert - split) // tl.maximum(experts_base, 1)
    return tl.where(expert < split, big, small)


@triton.jit
def _owners(expert_ids, entry_mask, num_experts, experts_base, experts_remainder, active_low, active_high):
    """Owner rank of every entry of an expert-id tile (-1: not a real entry, an id outside
    [0, num_experts), or an inactive owner) and whether the entry is a real one with a bad id."""
    valid = entry_mask & (expert_ids >= 0) & (expert_ids < num_experts)
    owner = _owner_rank(tl.where(valid, expert_ids, 0), experts_base, experts_remainder)
    owner = tl.where(valid & _rank_is_active(owner, active_low, active_high), owner, -1)
    return owner, entry_mask & (~valid)


@triton.jit
def _route_block(expert_ids_ptr, tokens, token_mask, num_experts, experts_base, experts_remainder, active_low,
                 active_high, TOP_K: tl.constexpr, K_PAD: tl.constexpr, EP_PAD: tl.constexpr,
                 BLOCK_TOKENS: tl.constexpr, K_CHUNK: tl.constexpr, RANK_CHUNK: tl.constexpr):
    """Steps 1 and 2 of the module docstring for one block of tokens (`tokens`, an int64 vector of
    BLOCK_TOKENS rows; `token_mask`: the real ones), on registers. Returns the [BLOCK_TOKENS, K_PAD]
    targets (-1: not sent) and slots inside the block, the [EP_PAD] rows to each rank, the
    [BLOCK_TOKENS, K_PAD] bad-id entries, and the entries' offsets and column mask."""
    ranks = tl.arange(0, EP_PAD)
    # All of the block's expert ids in one load, every other step on registers: the whole block is
    # a handful of reductions, not several per k (one per k and pass cost ~10 us at 16 tokens, H200).
    cols = tl.arange(0, K_PAD)
    col_mask = cols < TOP_K
    entry_offsets = tokens[:, None] * TOP_K + cols[None, :]
    entry_mask = token_mask[:, None] & col_mask[None, :]
    expert_ids = tl.load(expert_ids_ptr + entry_offsets, mask=entry_mask, other=-1)
    owner, invalid = _owners(expert_ids, entry_mask, num_experts, experts_base, experts_remainder, active_low,
                             active_high)

    # De-duplication: an entry whose owner an earlier entry of its token already sends to gets -1.
    # [BLOCK_TOKENS, K_PAD, K_CHUNK] comparisons per step; the earlier entries of a step are loaded
    # again (L1) rather than sliced out of registers, which Triton can only do with a reduction.
    repeat = tl.zeros([BLOCK_TOKENS, K_PAD], dtype=tl.int32)
    for first_k in tl.static_range(0, K_PAD, K_CHUNK):
        earlier_cols = first_k + tl.arange(0, K_CHUNK)
        earlier_mask = token_mask[:, None] & (earlier_cols < TOP_K)[None, :]
        earlier_ids = tl.load(expert_ids_ptr + tokens[:, None] * TOP_K + earlier_cols[None, :], mask=earlier_mask,
                              other=-1)
        earlier_owner, _ = _owners(earlier_ids, earlier_mask, num_experts, experts_base, experts_remainder,
                                   active_low, active_high)
        same = (owner[:, :, None] == earlier_owner[:, None, :]) & (earlier_cols[None, None, :] < cols[None, :, None])
        repeat = tl.maximum(repeat, tl.max(same.to(tl.int32), axis=2))
    target = tl.where((owner >= 0) & (repeat == 0), owner, -1)

    # Slot inside the block = earlier tokens of the block sending to the same rank, per chunk of
    # RANK_CHUNK ranks: one-hot sends [BLOCK_TOKENS, RANK_CHUNK], a scan over the tokens, and each
    # entry picks its rank's column.
    local_slot = tl.zeros([BLOCK_TOKENS, K_PAD], dtype=tl.int32)
    counts = tl.zeros([EP_PAD], dtype=tl.int32)
    for first_rank in tl.static_range(0, EP_PAD, RANK_CHUNK):
        chunk_ranks = first_rank + tl.arange(0, RANK_CHUNK)
        hit = target[:, :, None] == chunk_ranks[None, None, :]
        sends = tl.max(hit.to(tl.int32), axis=1)  # 0 or 1: the targets are de-duplicated
        earlier = tl.cumsum(sends, axis=0) - sends
        local_slot += tl.sum(tl.where(hit, earlier[:, None, :], 0), axis=2)
        chunk_counts = tl.sum(sends, axis=0)
        counts += tl.sum(tl.where(ranks[:, None] == chunk_ranks[None, :], chunk_counts[None, :], 0), axis=1)
    return target, local_slot, counts, invalid, entry_offsets, col_mask


@triton.jit(do_not_specialize=["num_rows", "num_blocks", "num_experts", "experts_base", "experts_remainder",
                               "ep_rank", "stride_rank", "active_low", "active_high", "host_record_ptr", "timeout_ns",
                               "timeout_ms"],
            do_not_specialize_on_alignment=["expert_ids_ptr"])
def _route_kernel(
    expert_ids_ptr,  # [num_tokens, TOP_K] int32: the caller's routing
    topk_target_ranks_ptr,  # [num_tokens, TOP_K] int32, own segment
    topk_local_slots_ptr,  # [num_tokens, TOP_K] int32, own segment
    block_counts_ptr,  # [num_blocks, EP_SIZE] int32, own segment: counts, then exclusive offsets
    block_invalid_ptr,  # [num_blocks] int32, own segment
    election_ptr,  # [1] int32, own segment: routing programs finished (reset by the last)
    invalid_count_ptr,  # [1] int32, own segment: (token, k) pairs skipped for a bad id
    send_counters_ptr,  # [EP_SIZE] int32, own segment
    recv_counters_ptr,  # [EP_SIZE] int32 in segment 0; segment t at + t * stride_rank
    stride_rank,  # int32 elements between two segments
    gather_count_ptr,  # [1] int32, own segment: gathers this rank finished
    gathered_mask_ptr,  # [2] int32, own segment: the active-rank mask of its last gather
    flags_ptr,  # [3, EP_SIZE] int32 flag block of segment 0
    fault_record_ptr,  # [FAULT_RECORD_WORDS] int32, own segment
    host_record_ptr,  # int64 address of its host-mapped copy (0 without one)
    timeout_ns,
    timeout_ms,
    num_tokens_ptr,  # [1] int32: real tokens (read with COUNT_FROM_DEVICE)
    num_rows,  # rows of expert_ids
    num_blocks,  # max(1, cdiv(num_rows, BLOCK_TOKENS)): the grid size
    num_experts,
    experts_base,
    experts_remainder,
    active_low,  # active-rank mask, bits 0..31 (int32)
    active_high,  # bits 32..63
    ep_rank,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,  # next power of 2 >= TOP_K
    EP_SIZE: tl.constexpr,
    EP_PAD: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    SCAN_BLOCKS: tl.constexpr,
    K_CHUNK: tl.constexpr,  # earlier entries compared per de-duplication step (power of 2, <= K_PAD)
    RANK_CHUNK: tl.constexpr,  # ranks per slot step (power of 2, <= EP_PAD)
    SINGLE_BLOCK: tl.constexpr,  # num_blocks == 1
    COUNT_FROM_DEVICE: tl.constexpr,
    FLAG_ARRAY_STRIDE: tl.constexpr,  # int32 elements between two flag arrays of a segment
    WAIT: tl.constexpr,  # wait for the previous round's gathers here (CUDA; the host waits on the CPU)
    HAS_HOST_RECORD: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
):
    if PDL:
        _prefetch_previous_gathers(gather_count_ptr, flags_ptr, stride_rank, ep_rank, FLAG_ARRAY_STRIDE)
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    block = tl.program_id(0)
    tokens = block.to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    row_mask = tokens < num_rows
    if COUNT_FROM_DEVICE:
        num_tokens = tl.minimum(tl.maximum(tl.load(num_tokens_ptr), 0), num_rows)
        token_mask = tokens < num_tokens
    else:
        token_mask = row_mask
    ranks = tl.arange(0, EP_PAD)
    rank_mask = ranks < EP_SIZE
    # The own-state words the last program's wait needs, loaded now, off its path (every program:
    # which one is last is known only at the election). Written by earlier kernels on this stream.
    gather_count = tl.load(gather_count_ptr)
    previous_low = tl.load(gathered_mask_ptr)
    previous_high = tl.load(gathered_mask_ptr + 1)
    healthy = tl.load(fault_record_ptr) == 0

    target, local_slot, counts, invalid, entry_offsets, col_mask = _route_block(
        expert_ids_ptr, tokens, token_mask, num_experts, experts_base, experts_remainder, active_low, active_high,
        TOP_K, K_PAD, EP_PAD, BLOCK_TOKENS, K_CHUNK, RANK_CHUNK)
    store_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(topk_target_ranks_ptr + entry_offsets, target, mask=store_mask)
    tl.store(topk_local_slots_ptr + entry_offsets, tl.where(target >= 0, local_slot, -1), mask=store_mask)
    block_invalid = tl.sum(tl.sum(invalid.to(tl.int32), axis=1), axis=0)

    if SINGLE_BLOCK:
        # One block: its offsets are zero and its counts are the totals; no election, no scan.
        tl.store(block_counts_ptr + ranks, tl.zeros([EP_PAD], dtype=tl.int32), mask=rank_mask)
        _publish_counts(counts, block_invalid, healthy, gather_count, previous_low, previous_high, send_counters_ptr,
                        recv_counters_ptr, invalid_count_ptr, stride_rank, flags_ptr, fault_record_ptr,
                        host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, EP_SIZE, EP_PAD,
                        FLAG_ARRAY_STRIDE, WAIT, HAS_HOST_RECORD)
    else:
        tl.store(block_counts_ptr + block * EP_SIZE + ranks, counts, mask=rank_mask)
        tl.store(block_invalid_ptr + block, block_invalid)
        # Every thread's stores above must be visible before the election increment.
        tl.debug_barrier()
        finished = tl.atomic_add(election_ptr, 1, sem="acq_rel", scope="gpu")
        if finished == num_blocks - 1:
            carry = tl.zeros([EP_PAD], dtype=tl.int32)
            total_invalid = 0
            for first_block in range(0, num_blocks, SCAN_BLOCKS):
                blocks = first_block + tl.arange(0, SCAN_BLOCKS)
                block_mask = blocks < num_blocks
                mask = block_mask[:, None] & rank_mask[None, :]
                offsets = blocks[:, None] * EP_SIZE + ranks[None, :]
                block_counts = tl.load(block_counts_ptr + offsets, mask=mask, other=0, cache_modifier=".cg")
                inclusive = tl.cumsum(block_counts, axis=0)
                tl.store(block_counts_ptr + offsets, inclusive - block_counts + carry[None, :], mask=mask)
                carry += tl.sum(block_counts, axis=0)
                total_invalid += tl.sum(tl.load(block_invalid_ptr + blocks, mask=block_mask, other=0,
                                                cache_modifier=".cg"), axis=0)
            _publish_counts(carry, total_invalid, healthy, gather_count, previous_low, previous_high, send_counters_ptr,
                            recv_counters_ptr, invalid_count_ptr, stride_rank, flags_ptr, fault_record_ptr,
                            host_record_ptr, timeout_ns, timeout_ms, active_low, active_high, ep_rank, EP_SIZE, EP_PAD,
                            FLAG_ARRAY_STRIDE, WAIT, HAS_HOST_RECORD)
            tl.store(election_ptr, 0)


@triton.jit
def _publish_counts(counts, total_invalid, healthy, gather_count, previous_low, previous_high, send_counters_ptr,
                    recv_counters_ptr, invalid_count_ptr, stride_rank, flags_ptr, fault_record_ptr, host_record_ptr,
                    timeout_ns, timeout_ms, active_low, active_high, ep_rank, EP_SIZE: tl.constexpr,
                    EP_PAD: tl.constexpr, FLAG_ARRAY_STRIDE: tl.constexpr, WAIT: tl.constexpr,
                    HAS_HOST_RECORD: tl.constexpr):
    """The round's totals (`counts`: rows to each target): own send counters and invalid count, then
    (WAIT) wait for the previous round's gathers and store `recv_counters[ep_rank]` into every
    active target's segment unless a fault is recorded; zero own receive counters of inactive sources."""
    faulted = ~healthy
    if WAIT:
        faulted = _await_previous_gathers(gather_count, previous_low, previous_high, healthy, flags_ptr, stride_rank,
                                          fault_record_ptr, host_record_ptr, timeout_ns, timeout_ms, active_low,
                                          active_high, ep_rank, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE, HAS_HOST_RECORD)
    _store_counts(counts, total_invalid, ~faulted, send_counters_ptr, recv_counters_ptr, invalid_count_ptr, stride_rank,
                  active_low, active_high, ep_rank, EP_SIZE, EP_PAD)


@triton.jit
def _store_counts(counts, total_invalid, store_remote, send_counters_ptr, recv_counters_ptr, invalid_count_ptr,
                  stride_rank, active_low, active_high, ep_rank, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr):
    """The round's totals (`counts`: rows to each target): own send counters and invalid count, zero
    own receive counters of inactive sources, and (`store_remote`: the previous round's gathers are
    over and no fault is recorded) `recv_counters[ep_rank]` of every active target's segment."""
    ranks = tl.arange(0, EP_PAD)
    rank_mask = ranks < EP_SIZE
    tl.store(send_counters_ptr + ranks, counts, mask=rank_mask)
    active = _rank_is_active(ranks, active_low, active_high)
    remote_ranks = (ranks * 0 + store_remote.to(tl.int32)) != 0  # a tensor, for the mask
    remote = recv_counters_ptr + ranks.to(tl.int64) * stride_rank + ep_rank
    tl.store(remote, counts, mask=rank_mask & active & remote_ranks)
    own = recv_counters_ptr + ep_rank.to(tl.int64) * stride_rank + ranks
    tl.store(own, tl.zeros([EP_PAD], dtype=tl.int32), mask=rank_mask & (~active))
    tl.store(invalid_count_ptr, total_invalid)
