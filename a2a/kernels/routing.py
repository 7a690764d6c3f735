"""Routing: expert -> owner rank, first-occurrence de-duplication, deterministic slots, counters.

One program per block of BLOCK_TOKENS local tokens. Each program:
1. maps every (token, k) to its owner rank (-1 for an id outside [0, num_experts) or a rank the
   token already sends to through an earlier k) and stores `topk_target_ranks`;
2. counts, per target rank, the block's tokens sent there and stores the slot each token gets
   inside its block (`topk_local_slots`: earlier tokens of the block sending to the same target);
3. publishes its per-target counts in `block_counts[block]`.
Experts of inactive ranks (bit clear in the active-rank mask) are not sent to: their k gets -1
like a repeat (not counted as invalid); the last program writes no counter into an inactive rank
and zeroes its own `recv_counters` of inactive sources, so sanitize and combine skip them.
The last program to finish (an acq_rel election counter, reset by that program so the next round,
or a graph replay, starts from zero) turns the counts into exclusive per-block offsets, writes
`send_counters`, then (WAIT) waits until every rank of the previous round has finished gathering it (a2a.kernels.signal._await_previous_gathers: this round's rows may land where that round's
combine plane was) and stores `recv_counters[ep_rank]` into every target's segment, unless this
rank has recorded a fault (then it stores nothing remotely; see a2a.runtime.protocol). A token's final
slot at target t is `block_offsets[block, t] + topk_local_slots`: the number of earlier local tokens
sent to t, so receive order equals source order and two runs are bitwise identical.

With COUNT_FROM_DEVICE the number of real tokens is read from `num_tokens_ptr` (clamped to
[0, num_rows]); rows past it are padding: never sent, their top-k entries set to -1, so a CUDA graph
captured once serves any count. Otherwise all `num_rows` rows are tokens.

This pass also does the "prepare" work of a round: every per-round counter it reads is fully
rewritten here, so no separate reset launch is needed.
"""

import triton
import triton.language as tl

from a2a.kernels.signal import _await_previous_gathers, _rank_is_active


@triton.jit
def _owner_rank(expert, experts_base, experts_remainder):
    # Contiguous ownership; the first `remainder` ranks own base + 1 experts.
    split = experts_remainder * (experts_base + 1)
    big = expert // (experts_base + 1)
    small = experts_remainder + (expert - split) // tl.maximum(experts_base, 1)
    return tl.where(expert < split, big, small)


@triton.jit
def _first_targets(expert_tile, cols, k, token_mask, num_experts, experts_base, experts_remainder, active_low,
                   active_high, sends, ranks):
    """Target of column k of the block's [BLOCK_TOKENS, K_PAD] expert ids (-1: invalid id, inactive
    owner or rank already hit), its one-hot row, and whether the id was invalid."""
    expert = tl.sum(tl.where(cols[None, :] == k, expert_tile, 0), axis=1)  # column k, from registers
    valid = token_mask & (expert >= 0) & (expert < num_experts)
    owner = _owner_rank(tl.where(valid, expert, 0), experts_base, experts_remainder)
    owner = tl.where(valid & _rank_is_active(owner, active_low, active_high), owner, -1)
    hit = ranks[None, :] == owner[:, None]  # [BLOCK_TOKENS, EP_PAD]
    seen = tl.sum(tl.where(hit, sends, 0), axis=1) > 0
    first = (owner >= 0) & (~seen)
    return tl.where(first, owner, -1), hit & first[:, None], token_mask & (~valid)


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
    COUNT_FROM_DEVICE: tl.constexpr,
    FLAG_ARRAY_STRIDE: tl.constexpr,  # int32 elements between two flag arrays of a segment
    WAIT: tl.constexpr,  # wait for the previous round's gathers here (CUDA; the host waits on the CPU)
    HAS_HOST_RECORD: tl.constexpr,
):
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

    # All of the block's expert ids in one load: the per-k work below then has no memory access on
    # its dependency chain (a load per k made this kernel latency-bound, ~15 us for one block).
    cols = tl.arange(0, K_PAD)
    expert_tile = tl.load(expert_ids_ptr + tokens[:, None] * TOP_K + cols[None, :],
                          mask=token_mask[:, None] & (cols < TOP_K)[None, :], other=-1)

    # Pass 1: which ranks each token sends to (one-hot rows), de-duplicated per token.
    sends = tl.zeros([BLOCK_TOKENS, EP_PAD], dtype=tl.int32)
    num_invalid = tl.zeros([BLOCK_TOKENS], dtype=tl.int32)
    for k in range(TOP_K):
        target, new_hit, invalid = _first_targets(expert_tile, cols, k, token_mask, num_experts, experts_base,
                                                  experts_remainder, active_low, active_high, sends, ranks)
        sends = tl.where(new_hit, 1, sends)
        num_invalid += invalid.to(tl.int32)
        tl.store(topk_target_ranks_ptr + tokens * TOP_K + k, target, mask=row_mask)

    # Pass 2: slot inside the block = earlier tokens of the block sending to the same rank.
    earlier = tl.cumsum(sends, axis=0) - sends
    seen = tl.zeros([BLOCK_TOKENS, EP_PAD], dtype=tl.int32)
    for k in range(TOP_K):
        target, new_hit, invalid = _first_targets(expert_tile, cols, k, token_mask, num_experts, experts_base,
                                                  experts_remainder, active_low, active_high, seen, ranks)
        seen = tl.where(new_hit, 1, seen)
        local_slot = tl.sum(tl.where(new_hit, earlier, 0), axis=1)
        tl.store(topk_local_slots_ptr + tokens * TOP_K + k, tl.where(target >= 0, local_slot, -1), mask=row_mask)

    counts = tl.sum(sends, axis=0)
    tl.store(block_counts_ptr + block * EP_SIZE + ranks, counts, mask=rank_mask)
    tl.store(block_invalid_ptr + block, tl.sum(num_invalid, axis=0))

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
        tl.store(send_counters_ptr + ranks, carry, mask=rank_mask)
        faulted = ~healthy
        if WAIT:
            faulted = _await_previous_gathers(gather_count, previous_low, previous_high, healthy, flags_ptr,
                                              stride_rank, fault_record_ptr, host_record_ptr, timeout_ns, timeout_ms,
                                              active_low, active_high, ep_rank, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE,
                                              HAS_HOST_RECORD)
        active = _rank_is_active(ranks, active_low, active_high)
        healthy_ranks = (ranks * 0 + faulted.to(tl.int32)) == 0  # a tensor, for the mask
        remote = recv_counters_ptr + ranks.to(tl.int64) * stride_rank + ep_rank
        tl.store(remote, carry, mask=rank_mask & active & healthy_ranks)
        own = recv_counters_ptr + ep_rank.to(tl.int64) * stride_rank + ranks
        tl.store(own, tl.zeros([EP_PAD], dtype=tl.int32), mask=rank_mask & (~active))
        tl.store(invalid_count_ptr, total_invalid)
        tl.store(election_ptr, 0)
