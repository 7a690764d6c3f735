"""Symmetric memory across processes: every rank's segment mapped into every rank's address space.

`SymmetricMemory.tensor` is a `[world_size, size_per_rank]` uint8 tensor whose row r is rank r's
segment; the row stride may exceed `size_per_rank` (segments start at `base + r * stride`). Each
rank zeroes its own segment and then waits at a barrier before its constructor returns, so every
segment is zero when the first rank returns (no peer writes into a segment still being zeroed).
Construction and `close()` are collective: all ranks call them in the same order with the same
size. After `close()`, views of `tensor` are dangling: drop them first.

`CudaSymmetricMemory` (here) uses the driver's virtual memory management on one device per process:

    granularity  cuMemGetAllocationGranularity(RECOMMENDED); stride = align_up(size, granularity)
    create       cuMemCreate(stride), pinned on this device, shareable as FABRIC if every rank can
                 export one (probed by trying, AND-ed across ranks), else as a POSIX fd
    exchange     FABRIC: allgather the 64-byte handles; POSIX fd: SCM_RIGHTS (a2a.runtime.fd_exchange)
    map          cuMemAddressReserve((world_size + 1) * stride); a granule of this device's memory at
                 base (so torch sees this device at the view's start); own handle at
                 base + (rank + 1) * stride and every imported one (cuMemImportFromShareableHandle) at
                 base + (r + 1) * stride; cuMemSetAccess read/write for this device
    view         a strided tensor over the range via __cuda_array_interface__ (no copy)

A failing step undoes what the steps before it did (unmap, release, free the range, close fds) and
every rank raises, so no rank waits forever for a peer that gave up. `HostSharedMemory`
(a2a.runtime.host_shared_memory) is the CPU counterpart.
"""

from __future__ import annotations

import os
import socket
from abc import ABC
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import torch

from a2a.runtime.alignment import align_up
from a2a.runtime.bootstrap import Bootstrap
from a2a.runtime.driver import CudaDriverError, check, driver
from a2a.runtime.fd_exchange import exchange_fds

T = TypeVar("T")


class SymmetricMemory(ABC):
    """Segments of `size_per_rank` bytes, one per rank, visible to every rank through `tensor`."""

    tensor: torch.Tensor  # [world_size, size_per_rank] uint8, stride (stride, 1)
    size_per_rank: int
    stride: int
    rank: int
    world_size: int

    def __init__(self) -> None:
        self._undo = ExitStack()

    def close(self) -> None:
        """Unmap and free everything this rank holds (idempotent). Not a barrier: the caller makes
        sure no peer still accesses this rank's segment."""
        self._undo.close()

    def release_segments(self) -> None:
        """For a process checkpoint: unmap every segment and release the shared memory, keeping the
        virtual addresses (so captured CUDA graphs stay valid after `restore_segments`). Not a
        barrier: the caller makes sure no rank still accesses the segments."""
        raise NotImplementedError(f"{type(self).__name__} cannot release its segments for a checkpoint "
                                  "(only CUDA symmetric memory can)")  # fmt: skip

    def restore_segments(self, bootstrap: Bootstrap) -> None:
        """Map fresh, zeroed segments at the same addresses after `release_segments` (collective
        over `bootstrap`, whose rank and size must be this memory's)."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore segments after a checkpoint "
                                  "(only CUDA symmetric memory can)")  # fmt: skip

    def __enter__(self) -> SymmetricMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def agreed_size(bootstrap: Bootstrap, size_per_rank: int) -> int:
    """Check that `size_per_rank` is a positive int, the same on every rank (collective)."""
    if isinstance(size_per_rank, bool) or not isinstance(size_per_rank, int) or size_per_rank <= 0:
        raise ValueError(f"size_per_rank must be a positive int, got {size_per_rank!r}")
    sizes = bootstrap.allgather_int(size_per_rank)
    if len(set(sizes)) != 1:
        raise ValueError(f"size_per_rank must be the same on every rank, got {sizes} (indexed by rank)")
    return size_per_rank


def run_on_every_rank(bootstrap: Bootstrap, what: str, step: Callable[[], T], undo: ExitStack) -> T:
    """Run `step` here, then agree with every rank on whether all succeeded (collective).

    If any rank failed, `undo` is closed and every rank raises: the failing rank its own error,
    the others a RuntimeError naming the failed ranks and their errors.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised
        error = exc
    try:
        reports = bootstrap.allgather_bytes(b"" if error is None else repr(error).encode()[:2000])
        failed = {r: report.decode(errors="replace") for r, report in enumerate(reports) if report}
        if error is not None:
            raise error
        if failed:
            details = "; ".join(f"rank {r}: {report}" for r, report in failed.items())
            raise RuntimeError(f"{what} failed on rank(s) {sorted(failed)}: {details}")
    except BaseException:
        undo.close()
        raise
    return result


def _allocation_prop(ordinal: int, handle_type: Any) -> Any:
    cu = driver()
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    prop.requestedHandleTypes = handle_type
    return prop


_fabric_probes: dict[int, bool] = {}


def can_export_fabric_handle(ordinal: int) -> bool:
    """Whether this process can create, export and import a FABRIC-shareable allocation on the device
    (tried once per device: the attribute, then a real create + export + import of one granule)."""
    if ordinal not in _fabric_probes:
        cu = driver()
        fabric = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC
        try:
            supported = check(
                "cuDeviceGetAttribute",
                cu.cuDeviceGetAttribute(
                    cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, cu.CUdevice(ordinal)
                ),
            )
            if supported:
                prop = _allocation_prop(ordinal, fabric)
                granularity = check(
                    "cuMemGetAllocationGranularity",
                    cu.cuMemGetAllocationGranularity(
                        prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                    ),
                )
                handle = check("cuMemCreate", cu.cuMemCreate(granularity, prop, 0))
                try:  # export AND import: importing needs access to the exporter's IMEX channel
                    exported = check("cuMemExportToShareableHandle", cu.cuMemExportToShareableHandle(handle, fabric, 0))
                    imported = check(
                        "cuMemImportFromShareableHandle", cu.cuMemImportFromShareableHandle(exported.getPtr(), fabric)
                    )
                    check("cuMemRelease", cu.cuMemRelease(imported))
                finally:
                    check("cuMemRelease", cu.cuMemRelease(handle))
            _fabric_probes[ordinal] = bool(supported)
        except CudaDriverError:
            _fabric_probes[ordinal] = False
    return _fabric_probes[ordinal]


class _DeviceBytes:
    """A `[rows, row_bytes]` uint8 device array with row stride `stride`, for `torch.as_tensor`."""

    def __init__(self, address: int, rows: int, row_bytes: int, stride: int):
        self.__cuda_array_interface__ = {
            "shape": (rows, row_bytes),
            "strides": (stride, 1),
            "typestr": "|u1",
            "data": (address, False),
            "version": 2,
        }


class CudaSymmetricMemory(SymmetricMemory):
    """Symmetric memory on the CUDA device `device` (one per process) over `bootstrap`'s ranks.

    `handle_type` is the CUmemAllocationHandleType used (FABRIC or POSIX_FILE_DESCRIPTOR).
    """

    def __init__(self, bootstrap: Bootstrap, size_per_rank: int, device: torch.device | str):
        super().__init__()
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.rank, self.world_size = bootstrap.rank, bootstrap.world_size
        self.size_per_rank = agreed_size(bootstrap, size_per_rank)
        self._fds: set[int] = set()  # exported / received fds not closed yet
        self._undo.callback(self._close_fds)
        # The shared handles and their mappings, released (and made again) on their own for a
        # checkpoint; the address range and the head granule stay in _undo.
        self._segments = ExitStack()
        self._undo.callback(lambda: self._segments.close())  # a failure before the range is reserved
        self.segments_released = False
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)  # the primary context exists and is current
            self._allocate(bootstrap)

    def _allocate(self, bootstrap: Bootstrap) -> None:
        cu = driver()
        undo = self._undo
        fabric_here = run_on_every_rank(bootstrap, "device check", self._check_device, undo)
        use_fabric = all(bootstrap.allgather_int(int(fabric_here)))
        handle_types = cu.CUmemAllocationHandleType
        self.handle_type = (
            handle_types.CU_MEM_HANDLE_TYPE_FABRIC
            if use_fabric
            else handle_types.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        )
        if not use_fabric:
            hosts = [h.decode() for h in bootstrap.allgather_bytes(socket.gethostname().encode())]
            if len(set(hosts)) != 1:
                raise RuntimeError(
                    f"CUDA symmetric memory over POSIX fds needs every rank on one host, got hosts {hosts}; "
                    "ranks on several hosts need FABRIC handles (multi-node NVLink with an IMEX channel)"
                )
        shared = self._share_segments(bootstrap, undo)
        run_on_every_rank(bootstrap, "import + map", lambda: self._map_every_segment(shared), undo)
        # Zero the own segment, then agree: the agreement is the barrier that keeps peers out until then.
        run_on_every_rank(bootstrap, "zeroing the own segment", self._zero_own_segment, undo)

    def _share_segments(self, bootstrap: Bootstrap, undo: ExitStack) -> list:
        """Create this rank's segment and hand every rank every segment's shareable handle."""
        prop = _allocation_prop(self.device.index, self.handle_type)
        exported = run_on_every_rank(bootstrap, "cuMemCreate + export", lambda: self._create(prop), undo)
        if self.handle_type == driver().CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC:
            return bootstrap.allgather_bytes(bytes(exported.data))
        return run_on_every_rank(bootstrap, "fd exchange", lambda: self._exchange_fds(bootstrap, exported), undo)

    def _check_device(self) -> bool:
        cu = driver()
        current = int(check("cuCtxGetDevice", cu.cuCtxGetDevice()))
        if current != self.device.index:
            raise RuntimeError(f"the current CUDA context is on device {current}, expected {self.device.index}")
        return can_export_fabric_handle(self.device.index)

    def _create(self, prop: Any) -> Any:
        cu = driver()
        flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        self.granularity = check("cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity(prop, flag))
        self.stride = align_up(self.size_per_rank, self.granularity)
        handle = check("cuMemCreate", cu.cuMemCreate(self.stride, prop, 0))
        self._segments.callback(lambda: check("cuMemRelease", cu.cuMemRelease(handle)))
        self._handle = handle
        exported = check("cuMemExportToShareableHandle", cu.cuMemExportToShareableHandle(handle, self.handle_type, 0))
        if isinstance(exported, int):  # a POSIX fd: peers get copies; closed here once all are imported
            self._fds.add(exported)
        return exported

    def _exchange_fds(self, bootstrap: Bootstrap, own_fd: int) -> list[int]:
        fds = exchange_fds(bootstrap, own_fd)
        self._fds.update(fds)
        return fds

    def _map_every_segment(self, shared: list) -> None:
        cu = driver()
        # One stride of head room before segment 0 holds a granule of this device's own memory:
        # torch takes a __cuda_array_interface__ view's device from the memory at its data pointer,
        # and segment 0 lives on rank 0's GPU, so the view starts at the head granule instead.
        total = (self.world_size + 1) * self.stride
        base = int(check("cuMemAddressReserve", cu.cuMemAddressReserve(total, self.granularity, 0, 0)))
        self._undo.callback(lambda: check("cuMemAddressFree", cu.cuMemAddressFree(base, total)))
        head_prop = _allocation_prop(self.device.index, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE)
        head = check("cuMemCreate", cu.cuMemCreate(self.granularity, head_prop, 0))
        self._undo.callback(lambda: check("cuMemRelease", cu.cuMemRelease(head)))
        self._map(base, self.granularity, head, self._undo)
        self._undo.callback(lambda: self._segments.close())  # segments unmapped before the range is freed
        self._base = base
        self._map_segments(shared)
        whole = torch.as_tensor(_DeviceBytes(base, 1, total, total)).view(-1)
        if whole.data_ptr() != base or whole.device != self.device:
            raise RuntimeError(f"torch.as_tensor copied the workspace view (to {whole.device}) instead of wrapping it")
        self.tensor = whole.as_strided((self.world_size, self.size_per_rank), (self.stride, 1), self.stride)

    def _map(self, address: int, length: int, handle: Any, undo: ExitStack) -> None:
        cu = driver()
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device.index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        check("cuMemMap", cu.cuMemMap(address, length, 0, handle, 0))
        undo.callback(lambda: check("cuMemUnmap", cu.cuMemUnmap(address, length)))
        check("cuMemSetAccess", cu.cuMemSetAccess(address, length, [access], 1))

    def _map_segments(self, shared: list) -> None:
        """Import every peer's segment and map segment r at base + (r + 1) * stride."""
        for r in range(self.world_size):
            handle = self._handle if r == self.rank else self._import(shared[r])
            self._map(self._base + (r + 1) * self.stride, self.stride, handle, self._segments)
        self._close_fds()  # every handle is imported: the fds are no longer needed

    def release_segments(self) -> None:
        """See SymmetricMemory.release_segments; repeated calls do nothing."""
        if self.segments_released:
            return
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
        self._segments.close()
        self._segments = ExitStack()
        self.segments_released = True

    def restore_segments(self, bootstrap: Bootstrap) -> None:
        """See SymmetricMemory.restore_segments; does nothing unless the segments were released. A
        failure on any rank leaves every rank's segments released (and raises)."""
        if not self.segments_released:
            return
        if (bootstrap.rank, bootstrap.world_size) != (self.rank, self.world_size):
            raise ValueError(f"restore_segments needs this memory's rank / size {self.rank} / {self.world_size}, "
                             f"got {bootstrap.rank} / {bootstrap.world_size}")  # fmt: skip
        undo = self._segments
        undo.callback(self._close_fds)
        with torch.cuda.device(self.device):
            shared = self._share_segments(bootstrap, undo)
            run_on_every_rank(bootstrap, "import + map", lambda: self._map_segments(shared), undo)
            run_on_every_rank(bootstrap, "zeroing the own segment", self._zero_own_segment, undo)
        self.segments_released = False

    def _import(self, shared: Any) -> Any:
        cu = driver()
        if isinstance(shared, int):
            os_handle = shared  # the fd's value is the handle
        else:
            fabric = cu.CUmemFabricHandle()
            fabric.data = shared
            os_handle = fabric.getPtr()  # `fabric` stays alive until the call returns
        handle = check("cuMemImportFromShareableHandle", cu.cuMemImportFromShareableHandle(os_handle, self.handle_type))
        self._segments.callback(lambda: check("cuMemRelease", cu.cuMemRelease(handle)))
        return handle

    def _zero_own_segment(self) -> None:
        self.tensor[self.rank].zero_()
        torch.cuda.current_stream(self.device).synchronize()

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def close(self) -> None:
        """Wait for this device's work, then unmap, release every handle and free the range."""
        with torch.cuda.device(self.device):
            if hasattr(self, "tensor"):
                torch.cuda.synchronize(self.device)
                del self.tensor
            super().close()
