"""Page-locked host words that kernels can write and the host reads without synchronising.

A timed-out wait on the GPU records its status here as well as in device memory, so the host
learns of it at its next call (a plain memory read, ~0.1 us) instead of having to synchronise a
stream that might be stuck behind the wait.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from a2a.runtime.driver import check, driver


def _free(host_address: int) -> None:
    driver().cuMemFreeHost(host_address)


class HostMappedWords:
    """`count` int32 words of page-locked host memory, mapped into the address space of `device`."""

    def __init__(self, count: int, device: torch.device):
        cu = driver()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # make the primary context current in this thread
            flags = cu.CU_MEMHOSTALLOC_DEVICEMAP | cu.CU_MEMHOSTALLOC_PORTABLE
            host_address = int(check("cuMemHostAlloc", cu.cuMemHostAlloc(4 * count, flags)))
            weakref.finalize(self, _free, host_address)
            ctypes.memset(host_address, 0, 4 * count)
            self.device_address = int(check("cuMemHostGetDevicePointer", cu.cuMemHostGetDevicePointer(host_address, 0)))
        self.words = (ctypes.c_int32 * count).from_address(host_address)

    def read(self) -> list[int]:
        return list(self.words)
