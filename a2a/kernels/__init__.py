"""Triton kernels of a2a. Only `@triton.jit` code: no allocation, no processes, no driver calls.

Ground floor (docs/architecture.md): imports nothing else of a2a; the launchers in `a2a.ops` call them.

The same kernels run compiled on CUDA and under the Triton interpreter on the CPU
(`TRITON_INTERPRET=1`, set before this package is imported).
"""

from a2a.kernels.combine import _combine_barrier_kernel, _combine_kernel, _fused_combine_kernel, _stage_combine_kernel
from a2a.kernels.dispatch import _dispatch_copy_kernel, _fused_dispatch_kernel, _share_stats_kernel
from a2a.kernels.routing import _route_kernel
from a2a.kernels.sanitize import _sanitize_kernel

__all__ = [
    "_combine_barrier_kernel",
    "_combine_kernel",
    "_dispatch_copy_kernel",
    "_fused_combine_kernel",
    "_fused_dispatch_kernel",
    "_route_kernel",
    "_sanitize_kernel",
    "_share_stats_kernel",
    "_stage_combine_kernel",
]
