"""The flag wait's packed poll (a2a.kernels.signal._flag_tally: three counts in one reduction)
against plain counts, for every lane count up to MAX_RANKS = 64, masked lanes, arrived, stale and
poisoned flags. The wait itself reads the GPU clock, so it runs only compiled (the GPU suite's
fault tests); the poll without the clock runs here under the interpreter too."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from a2a.kernels.signal import _flag_tally
from a2a.layout import MAX_RANKS
from a2a.runtime.protocol import FLAG_POISON


@triton.jit
def _tally_kernel(flags_ptr, mask_ptr, out_ptr, value, EP_PAD: tl.constexpr):
    ranks = tl.arange(0, EP_PAD)
    rank_mask = tl.load(mask_ptr + ranks) != 0
    flags, tally = _flag_tally(flags_ptr, value, ranks, rank_mask, 0, False)
    tl.store(out_ptr + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32) + tally)
    tl.store(out_ptr + 1 + ranks, flags)


@settings(max_examples=30)
@given(lanes=st.sampled_from([1, 2, 4, 8, 16, 32, MAX_RANKS]), value=st.integers(1, 0x7FFFFFFF),
       states=st.lists(st.sampled_from(["arrived", "stale", "poisoned"]), min_size=MAX_RANKS, max_size=MAX_RANKS),
       masked=st.lists(st.booleans(), min_size=MAX_RANKS, max_size=MAX_RANKS))  # fmt: skip
def test_one_reduction_counts_pending_and_poisoned_lanes(device, lanes, value, states, masked):
    stale = value - 2 if value > 2 else value + 2  # the previous phase's epoch (or any other)
    flags = [value if s == "arrived" else FLAG_POISON if s == "poisoned" else stale for s in states[:lanes]]
    in_wait = [not m for m in masked[:lanes]]
    flags_t = torch.tensor(flags, dtype=torch.int32, device=device)
    mask_t = torch.tensor(in_wait, dtype=torch.int32, device=device)
    out = torch.full((1 + lanes,), -7, dtype=torch.int32, device=device)
    _tally_kernel[(1,)](flags_t, mask_t, out, value, EP_PAD=lanes)
    tally = int(out[0])
    pending = sum(1 for f, w in zip(flags, in_wait) if w and f == stale)
    poisoned = sum(1 for f, w in zip(flags, in_wait) if w and f == FLAG_POISON)
    assert (tally & 0xFF, (tally >> 8) & 0xFF, tally >> 16) == (pending, poisoned, 0)
    # The flags handed back: the loaded ones, and `value` (arrived) for lanes outside the wait.
    assert out[1:].tolist() == [f if w else value for f, w in zip(flags, in_wait)]
