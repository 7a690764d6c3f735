"""Cross-rank flags inside kernels: one program signals every peer and waits for every peer.

Protocol (one flag array per phase, `u32 [EP_SIZE]` in every segment, never reset):
- signal: the program bumps this rank's `flag_value` (a counter in its own segment that only it
  writes), then stores the new value into `flags[ep_rank]` of every segment with system-scope
  release semantics, so every store this rank made before (earlier kernels on its stream, and the
  other programs of this kernel, which the caller orders through an acq_rel election counter) is
  visible to a peer that sees the flag.
- wait: spin on its own `flags[0 .. EP_SIZE)` until every word equals `flag_value`, then a
  system-scope acquire fence. Ranks run the same phases in the same order, so their counters
  agree; a peer can raise a flag again only after a later phase that needs this rank's signal,
  so equality cannot be overtaken, and u32 wraparound is harmless.

Because the value comes from device memory, a CUDA graph replays the protocol unchanged.

Only active ranks take part (`active_low` / `active_high`: bits 0..31 / 32..63 of the active-rank
mask, as int32): inactive peers (failed or fenced off) are neither signalled nor waited for.

The wait is bounded: after `timeout_ns` of `%globaltimer` the program records the timeout (phase,
missing ranks as a 64-bit mask, the awaited value) in this rank's `timeout_status` words and in a
host-mapped copy the host reads without synchronising, and returns. Once a timeout is recorded,
later waits of this rank return at once (the round is lost; the host raises), so a dead peer
costs one timeout, not one per queued phase.

Under the Triton interpreter (CPU) only the signal runs in the kernel; the host waits instead
(WAIT=False), since interpreted programs run one after another on the calling thread.
"""

import triton
import triton.language as tl


@triton.jit
def _global_time_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _fence_acquire_system():
    tl.inline_asm_elementwise("fence.acq_rel.sys;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _rank_is_active(ranks, active_low, active_high):
    """Bit `rank` of the 64-bit active-rank mask given as two int32 halves (ranks: an int vector)."""
    ranks = ranks.to(tl.int32)
    word = tl.where(ranks < 32, active_low, active_high)
    return ((word >> (ranks & 31)) & 1) != 0


@triton.jit
def _signal_peers(flag_value_ptr, flags_ptr, stride_flags_rank, ep_rank, active_low, active_high,
                  EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr):
    """Bump `flag_value` and store it into `flags[ep_rank]` of every segment (release, system scope).

    flag_value_ptr: own segment, u32 counter. flags_ptr: this phase's flag array of segment 0
    (int32); segment t's at + t * stride_flags_rank. Returns the new value.
    """
    value = tl.load(flag_value_ptr, volatile=True) + 1
    tl.store(flag_value_ptr, value)
    ranks = tl.arange(0, EP_PAD)
    targets = flags_ptr + ranks.to(tl.int64) * stride_flags_rank + ep_rank
    mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high)
    tl.atomic_xchg(targets, tl.zeros([EP_PAD], dtype=tl.int32) + value, mask=mask, sem="release", scope="sys")
    return value


@triton.jit
def _wait_peers(own_flags_ptr, value, timeout_status_ptr, host_status_ptr, timeout_ns, active_low, active_high,
                PHASE: tl.constexpr, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr, HAS_HOST_STATUS: tl.constexpr):
    """Spin until own `flags[s] == value` for every s, or record a timeout (see the module docstring).

    own_flags_ptr: this phase's flag array of the own segment. timeout_status_ptr: own segment,
    int32 [4] = (phase, missing ranks 0..31, missing ranks 32..63, value); host_status_ptr: the same
    four words in host-mapped memory (int64 address, used when HAS_HOST_STATUS).
    """
    ranks = tl.arange(0, EP_PAD)
    rank_mask = (ranks < EP_SIZE) & _rank_is_active(ranks, active_low, active_high)
    arrived = tl.load(own_flags_ptr + ranks, mask=rank_mask, other=value, volatile=True) == value
    waiting = tl.sum((~arrived).to(tl.int32), axis=0) > 0
    # A timeout already recorded: this round is lost; do not wait again.
    waiting = waiting & (tl.load(timeout_status_ptr, volatile=True) == 0)
    deadline = _global_time_ns() + timeout_ns
    timed_out = deadline < 0  # a false scalar tensor: the loop below reassigns it
    while waiting:
        arrived = tl.load(own_flags_ptr + ranks, mask=rank_mask, other=value, volatile=True) == value
        timed_out = _global_time_ns() > deadline
        waiting = (tl.sum((~arrived).to(tl.int32), axis=0) > 0) & (~timed_out)
    if timed_out:
        missing = (~arrived) & rank_mask
        low = tl.sum(tl.where(missing & (ranks < 32), 1 << (ranks & 31), 0), axis=0)
        high = tl.sum(tl.where(missing & (ranks >= 32), 1 << (ranks & 31), 0), axis=0)
        tl.store(timeout_status_ptr + 1, low)
        tl.store(timeout_status_ptr + 2, high)
        tl.store(timeout_status_ptr + 3, value)
        tl.store(timeout_status_ptr, PHASE)
        if HAS_HOST_STATUS:
            host = host_status_ptr.to(tl.pointer_type(tl.int32))
            tl.store(host + 1, low)
            tl.store(host + 2, high)
            tl.store(host + 3, value)
            tl.atomic_xchg(host, PHASE, sem="release", scope="sys")
    _fence_acquire_system()


@triton.jit
def _signal_and_wait(flag_value_ptr, flags_ptr, stride_flags_rank, timeout_status_ptr, host_status_ptr, timeout_ns,
                     active_low, active_high, ep_rank, PHASE: tl.constexpr, EP_SIZE: tl.constexpr,
                     EP_PAD: tl.constexpr, WAIT: tl.constexpr, HAS_HOST_STATUS: tl.constexpr):
    value = _signal_peers(flag_value_ptr, flags_ptr, stride_flags_rank, ep_rank, active_low, active_high, EP_SIZE,
                          EP_PAD)
    if WAIT:
        own_flags_ptr = flags_ptr + ep_rank.to(tl.int64) * stride_flags_rank
        _wait_peers(own_flags_ptr, value, timeout_status_ptr, host_status_ptr, timeout_ns, active_low, active_high,
                    PHASE, EP_SIZE, EP_PAD, HAS_HOST_STATUS)


@triton.jit(do_not_specialize=["ep_rank", "stride_flags_rank", "host_status_ptr", "timeout_ns", "active_low",
                               "active_high"])
def _barrier_kernel(
    flag_value_ptr,  # [1] u32 (as int32), own segment
    flags_ptr,  # [EP_SIZE] int32: this phase's flags in segment 0; segment t at + t * stride_flags_rank
    stride_flags_rank,  # int32 elements between two segments
    timeout_status_ptr,  # [4] int32, own segment
    host_status_ptr,  # int64 address of 4 host-mapped int32 words (0 without one)
    timeout_ns,
    active_low,  # active-rank mask, bits 0..31 (int32)
    active_high,  # bits 32..63
    ep_rank,
    PHASE: tl.constexpr,  # code recorded on timeout (a2a.layout.TimeoutPhase)
    EP_SIZE: tl.constexpr,
    EP_PAD: tl.constexpr,
    WAIT: tl.constexpr,
    HAS_HOST_STATUS: tl.constexpr,
):
    """One program: everything this rank's stream did before is visible to every peer, then (WAIT)
    every peer's signal for the same phase has arrived."""
    _signal_and_wait(flag_value_ptr, flags_ptr, stride_flags_rank, timeout_status_ptr, host_status_ptr, timeout_ns,
                     active_low, active_high, ep_rank, PHASE, EP_SIZE, EP_PAD, WAIT, HAS_HOST_STATUS)
