"""Sanitize: stale receive rows get `invalid_expert_id` in every column.

Grid `(cdiv(EP_SIZE * runtime_max_tokens, BLOCK_ROWS),)`: row `(s, j)` of the `[EP_SIZE, rt, WIDTH]`
expert-id plane is overwritten when `j >= recv_counters[s]`; valid rows are left untouched. Columns
go in chunks of WIDTH_BLOCK, so any width works. A rank that has recorded a fault treats every row
as stale (a2a.runtime.protocol: nothing of a lost round is handed on as valid).
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait


@triton.jit(do_not_specialize=["runtime_max_tokens", "invalid_expert_id"])
def _sanitize_kernel(
    expert_ids_ptr,  # [EP_SIZE, runtime_max_tokens, WIDTH] int32
    recv_counters_ptr,  # [EP_SIZE] int32, own segment
    fault_record_ptr,  # [FAULT_RECORD_WORDS] int32, own segment
    runtime_max_tokens,
    invalid_expert_id,
    EP_SIZE: tl.constexpr,
    WIDTH: tl.constexpr,
    WIDTH_BLOCK: tl.constexpr,  # power of 2
    BLOCK_ROWS: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the previous kernel first
):
    if PDL:
        gdc_wait()  # the previous kernel on this stream has completed and its stores are visible
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < EP_SIZE * runtime_max_tokens
    source = rows // runtime_max_tokens
    slot = rows - source * runtime_max_tokens
    count = tl.load(recv_counters_ptr + source, mask=row_mask, other=0)
    count = tl.where(tl.load(fault_record_ptr + source * 0, mask=row_mask, other=0) == 0, count, 0)
    stale = row_mask & (slot >= count)
    fill = tl.full([BLOCK_ROWS, WIDTH_BLOCK], invalid_expert_id, dtype=tl.int32)
    for first in range(0, WIDTH, WIDTH_BLOCK):
        cols = first + tl.arange(0, WIDTH_BLOCK)
        mask = stale[:, None] & (cols < WIDTH)[None, :]
        tl.store(expert_ids_ptr + rows[:, None] * WIDTH + cols[None, :], fill, mask=mask)
