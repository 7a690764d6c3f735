"""Rank streams on CUDA: a torch stream whose phases signal and wait inside the kernels.

Nothing is enqueued besides the kernels: every phase's barrier runs in one program of the phase's
kernels (a2a.kernels.signal), so a stream only orders launches. Captured CUDA graphs replay the
protocol unchanged (its values come from device memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from a2a.runtime.driver import check, driver
from a2a.runtime.streams import SignalMode, SignalStream


def new_cuda_stream(device: torch.device, priority: int = 0) -> torch.cuda.ExternalStream:
    """A new non-blocking driver stream on `device` with `priority` (lower is more urgent; clamped
    to the device's range), owned by the process (never destroyed: rank streams live as long as
    their world, and a world usually as long as the process)."""
    cu = driver()
    with torch.cuda.device(device):
        torch.cuda.current_stream(device)  # make sure the primary context is current
        least, greatest = check("cuCtxGetStreamPriorityRange", cu.cuCtxGetStreamPriorityRange())
        priority = max(greatest, min(least, priority))
        flags = cu.CUstream_flags.CU_STREAM_NON_BLOCKING.value
        handle = check("cuStreamCreateWithPriority", cu.cuStreamCreateWithPriority(flags, priority))
    return torch.cuda.ExternalStream(int(handle), device=device)


class CudaSignalStream(SignalStream):
    """A rank stream backed by a torch CUDA stream."""

    signal_mode = SignalMode.KERNEL
    _wrapped: dict[int, CudaSignalStream] = {}

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream
        self.device = stream.device

    @classmethod
    def wrap(cls, stream: torch.cuda.Stream) -> CudaSignalStream:
        wrapped = cls._wrapped.get(stream.cuda_stream)
        if wrapped is None:
            wrapped = cls._wrapped[stream.cuda_stream] = cls(stream)
        return wrapped

    def submit(self, work) -> None:
        with torch.cuda.stream(self.stream):
            work()

    def synchronize(self) -> None:
        self.stream.synchronize()

    @contextmanager
    def activate(self) -> Iterator[CudaSignalStream]:
        """Also make the torch stream current, so allocations and launches land on it."""
        with torch.cuda.stream(self.stream), SignalStream.activate(self):
            yield self
