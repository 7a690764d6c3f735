"""Combine: stage expert outputs into the combine plane, then gather-and-reduce over top-k.

`_stage_combine_kernel`, grid `(EP_SIZE * runtime_max_tokens, num_tiles)`: copies row `(s, j)` of the
caller's `[EP_SIZE, rt, ROW_UNITS]` payload into this rank's combine plane when
`j < recv_counters[s]` (stale rows are never read by peers, so they are not copied).

`_combine_kernel`, grid `(num_tokens, num_tiles)`: output row `i`, column tile `c` =
sum over k = 0..TOP_K-1 (in that order) of segment `t_k`'s combine plane row `[ep_rank][slot_k]`,
accumulated in fp32 and cast to the output dtype; a k with target -1 adds an exact zero. With
HAS_SCALES the plane holds quantized (fp8) rows and each row is multiplied by its fp32 scale from
the scales plane of the same segment before it is added.
"""

import triton
import triton.language as tl


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
):
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


@triton.jit(do_not_specialize=["runtime_max_tokens", "ep_rank", "stride_scales_rank"])
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
    HIDDEN: tl.constexpr,
    TOP_K: tl.constexpr,
    TILE: tl.constexpr,
    HAS_SCALES: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * TILE + tl.arange(0, TILE)
    col_mask = cols < HIDDEN
    first_row = ep_rank.to(tl.int64) * runtime_max_tokens
    acc = tl.zeros([TILE], dtype=tl.float32)
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
    if out_ptr.dtype.element_ty == tl.bfloat16:
        result = _round_to_bf16(acc)
    else:
        result = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * HIDDEN + cols, result, mask=col_mask)
