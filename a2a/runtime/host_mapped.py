"""Page-locked host words that kernels can write and the host reads without synchronising.

A timed-out wait on the GPU records its status here as well as in device memory, so the host
learns of it at its next call (a plain memory read, ~0.1 us) instead of having to synchronise a
stream that might be stuck behind the wait.

Blocks whose owner is gone are freed only by `free_released`, called where the device is already
idle: `cuMemFreeHost` waits for the device, and a garbage collection can run a finalizer at any
allocation. On one GPU with every rank in one process that wait deadlocks: an H200 run of the
safety tests blocked in the free, inside a plan build between two ranks' launches, while the
first rank's kernel spun in its wait for the second rank (300 s, until the wait timed out).
"""

from __future__ import annotations

import ctypes
import threading
import weakref

import torch

from a2a.runtime.driver import check, driver

_released: list[int] = []  # host addresses of blocks whose owner is gone, not yet freed
_released_lock = threading.Lock()


def _release(host_address: int) -> None:
    """A finalizer: queue the block for `free_released` (never free it here, see the module docstring)."""
    with _released_lock:
        _released.append(host_address)


def free_released() -> int:
    """`cuMemFreeHost` every queued block; returns how many. Call it only after a device-wide
    synchronize, so the free's own wait for the device returns at once; the blocks are small
    (one page each), so waiting for such a point costs little memory."""
    with _released_lock:
        addresses = _released[:]
        _released.clear()
    for host_address in addresses:
        driver().cuMemFreeHost(host_address)  # a block that cannot be freed stays leaked: no call fails for it
    return len(addresses)


class HostMappedWords:
    """`count` int32 words of page-locked host memory, mapped into the address space of `device`."""

    def __init__(self, count: int, device: torch.device):
        cu = driver()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # make the primary context current in this thread
            flags = cu.CU_MEMHOSTALLOC_DEVICEMAP | cu.CU_MEMHOSTALLOC_PORTABLE
            host_address = int(check("cuMemHostAlloc", cu.cuMemHostAlloc(4 * count, flags)))
            weakref.finalize(self, _release, host_address)
            ctypes.memset(host_address, 0, 4 * count)
            self.device_address = int(check("cuMemHostGetDevicePointer", cu.cuMemHostGetDevicePointer(host_address, 0)))
        self.words = (ctypes.c_int32 * count).from_address(host_address)

    def read(self) -> list[int]:
        return list(self.words)
