"""Sanitize: stale receive rows get `invalid_expert_id` in every k.

Grid `(cdiv(EP_SIZE * runtime_max_tokens, BLOCK_ROWS),)`: row `(s, j)` of the `[EP_SIZE, rt, TOP_K]`
expert-id plane is overwritten when `j >= recv_counters[s]`; valid rows are left untouched.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["runtime_max_tokens", "invalid_expert_id"])
def _sanitize_kernel(
    expert_ids_ptr,  # [EP_SIZE, runtime_max_tokens, TOP_K] int32
    recv_counters_ptr,  # [EP_SIZE] int32, own segment
    runtime_max_tokens,
    invalid_expert_id,
    EP_SIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < EP_SIZE * runtime_max_tokens
    source = rows // runtime_max_tokens
    slot = rows - source * runtime_max_tokens
    count = tl.load(recv_counters_ptr + source, mask=row_mask, other=0)
    stale = row_mask & (slot >= count)
    ks = tl.arange(0, K_PAD)
    mask = stale[:, None] & (ks < TOP_K)[None, :]
    fill = tl.full([BLOCK_ROWS, K_PAD], invalid_expert_id, dtype=tl.int32)
    tl.store(expert_ids_ptr + rows[:, None] * TOP_K + ks[None, :], fill, mask=mask)
