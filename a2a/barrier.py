"""Arguments of the phase barrier (a2a.kernels.signal) for one rank and its stream's signal mode.

The dispatch copy kernel runs the dispatch barrier in its last program; combine launches
`_barrier_kernel` on its own. Both take the same pointers, built here once per rank and phase.
"""

from __future__ import annotations

from typing import Any

from a2a import configs, envs
from a2a.kernels import _barrier_kernel
from a2a.launch import KernelLaunch
from a2a.layout import TimeoutPhase
from a2a.runtime.streams import SignalMode
from a2a.workspace import RankWorkspace


def mask_halves(active_rank_mask: int) -> tuple[int, int]:
    """Bits 0..31 and 32..63 of the mask as signed int32 values (always an i32 kernel argument, so
    the mask never changes a kernel variant)."""
    def signed(word: int) -> int:
        return word - (1 << 32) if word >= 1 << 31 else word

    return signed(active_rank_mask & 0xFFFFFFFF), signed(active_rank_mask >> 32 & 0xFFFFFFFF)


def barrier_args(rank_workspace: RankWorkspace, flags_offset: int, active_rank_mask: int) -> tuple:
    """(flag_value_ptr, flags_ptr, stride_flags_rank, timeout_status_ptr, host_status_ptr, timeout_ns,
    active_low, active_high)."""
    flags = rank_workspace.flags_every_rank(flags_offset)
    host_status = rank_workspace.host_timeout_status
    timeout_ns = min(int(envs.signal_timeout_s() * 1e9), 2**62)
    return (rank_workspace.flag_value, flags, flags.stride(0), rank_workspace.timeout_status,
            0 if host_status is None else host_status.device_address, timeout_ns, *mask_halves(active_rank_mask))  # fmt: skip


def barrier_constexprs(rank_workspace: RankWorkspace, mode: SignalMode, phase: int) -> dict[str, Any]:
    return dict(
        EP_PAD=configs.rank_pad(rank_workspace.ep_size),
        SIGNAL=mode is not SignalMode.STREAM_MEMOPS,
        WAIT=mode is SignalMode.KERNEL,
        HAS_HOST_STATUS=rank_workspace.host_timeout_status is not None,
        PHASE=phase,
    )


def combine_barrier_launch(rank_workspace: RankWorkspace, mode: SignalMode, active_rank_mask: int) -> KernelLaunch:
    """One program: signal "my combine plane is ready" to every peer, then (KERNEL mode) wait for theirs."""
    constexprs = barrier_constexprs(rank_workspace, mode, TimeoutPhase.COMBINE)
    del constexprs["SIGNAL"]
    return KernelLaunch(
        _barrier_kernel,
        (1,),
        (*barrier_args(rank_workspace, rank_workspace.layout.combine_flags_offset, active_rank_mask),
         rank_workspace.ep_rank),
        dict(EP_SIZE=rank_workspace.ep_size, num_warps=1, **constexprs),
    )
