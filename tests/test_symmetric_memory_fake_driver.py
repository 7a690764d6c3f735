"""CudaSymmetricMemory's driver-call sequence and undo-on-failure, against a recording fake driver.

Runs anywhere: the driver's types and enums are the real `cuda.bindings.driver` ones, its calls are
replaced by a fake that hands out handles and addresses and records what is still alive, and the
torch CUDA calls are stubbed. The real thing runs in tests/test_multiprocess_gpu.py.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

cu = pytest.importorskip("cuda.bindings.driver")

from a2a.runtime import driver as driver_module  # noqa: E402
from a2a.runtime import symmetric_memory  # noqa: E402
from a2a.runtime.bootstrap import Bootstrap, SingleProcessBootstrap  # noqa: E402
from a2a.runtime.driver import CudaDriverError  # noqa: E402

OK = cu.CUresult.CUDA_SUCCESS
GRANULARITY = 2 << 20


class FakeDriver:
    """Records live handles, mappings and reservations; `fail` names a call to fail (once)."""

    def __init__(self, fabric: bool, fail: tuple[str, int] | None = None):
        self.fabric, self.fail = fabric, fail
        self.calls: list[str] = []
        self.handles: set[int] = set()
        self.maps: dict[int, int] = {}  # address -> handle
        self.reservations: set[tuple[int, int]] = set()
        self._next = 100

    def __getattr__(self, name: str):  # types and enums: the real ones
        return getattr(cu, name)

    def _result(self, call: str, value=None):
        self.calls.append(call)
        if self.fail is not None and self.fail[0] == call and self.calls.count(call) == self.fail[1]:
            return (cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None)
        return (OK, value)

    def _new_handle(self) -> int:
        self._next += 1
        self.handles.add(self._next)
        return self._next

    def cuGetErrorString(self, code):
        return (OK, b"fake failure")

    def cuCtxGetDevice(self):
        return self._result("cuCtxGetDevice", cu.CUdevice(0))

    def cuDeviceGetAttribute(self, attribute, device):
        return self._result("cuDeviceGetAttribute", int(self.fabric))

    def cuMemGetAllocationGranularity(self, prop, flag):
        return self._result("cuMemGetAllocationGranularity", GRANULARITY)

    def cuMemCreate(self, size, prop, flags):
        assert size % GRANULARITY == 0 and prop.location.id == 0
        result = self._result("cuMemCreate")
        return result if result[0] != OK else (OK, cu.CUmemGenericAllocationHandle(self._new_handle()))

    def cuMemExportToShareableHandle(self, handle, handle_type, flags):
        if handle_type == cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC:
            exported = cu.CUmemFabricHandle()
            exported.data = int(handle).to_bytes(8, "little") * 8
            return self._result("cuMemExportToShareableHandle", exported)
        return self._result("cuMemExportToShareableHandle", os.open(os.devnull, os.O_RDONLY))

    def cuMemImportFromShareableHandle(self, os_handle, handle_type):
        result = self._result("cuMemImportFromShareableHandle")
        return result if result[0] != OK else (OK, cu.CUmemGenericAllocationHandle(self._new_handle()))

    def cuMemRelease(self, handle):
        self.handles.remove(int(handle))
        return self._result("cuMemRelease")

    def cuMemAddressReserve(self, size, alignment, address, flags):
        base = 1 << 40
        result = self._result("cuMemAddressReserve", cu.CUdeviceptr(base))
        if result[0] == OK:
            self.reservations.add((base, size))
        return result

    def cuMemAddressFree(self, base, size):
        self.reservations.remove((int(base), size))
        return self._result("cuMemAddressFree")

    def cuMemMap(self, address, size, offset, handle, flags):
        result = self._result("cuMemMap")
        if result[0] == OK:
            assert int(handle) in self.handles and int(address) not in self.maps
            self.maps[int(address)] = int(handle)
        return result

    def cuMemSetAccess(self, address, size, descriptors, count):
        assert count == 1 and int(address) in self.maps
        return self._result("cuMemSetAccess")

    def cuMemUnmap(self, address, size):
        del self.maps[int(address)]
        return self._result("cuMemUnmap")


class FakeDeviceBytes:
    """What torch.as_tensor returns for the __cuda_array_interface__ view."""

    def __init__(self, view):
        interface = view.__cuda_array_interface__
        self.address, self.shape, self.strides = interface["data"][0], interface["shape"], interface["strides"]
        self.device = torch.device("cuda", 0)
        self.zeroed: list[int] = []

    def data_ptr(self) -> int:
        return self.address

    def view(self, *shape):
        return self

    def as_strided(self, size, stride, storage_offset):
        self.address, self.shape, self.strides = self.address + storage_offset, tuple(size), tuple(stride)
        return self

    def __getitem__(self, rank: int):
        return SimpleNamespace(zero_=lambda: self.zeroed.append(rank))


class ScriptedPeer(Bootstrap):
    """Rank 0 of two; rank 1 contributes what each collective expects of a healthy peer."""

    def __init__(self, peer: list[bytes]):
        self.rank, self.world_size, self.peer = 0, 2, list(peer)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [data, self.peer.pop(0)]


def healthy_fabric_peer(size: int) -> list[bytes]:
    """Rank 1's contributions: size, device check, fabric vote, create, handle, map, zeroing."""
    return [str(size).encode(), b"", b"1", b"", bytes(range(64)), b"", b""]


@pytest.fixture
def fake(monkeypatch):
    def install(fabric: bool, fail: tuple[str, int] | None = None) -> FakeDriver:
        fake_driver = FakeDriver(fabric, fail)
        monkeypatch.setattr(driver_module, "driver", lambda: fake_driver)
        monkeypatch.setattr(symmetric_memory, "driver", lambda: fake_driver)
        monkeypatch.setattr(symmetric_memory, "_fabric_probes", {})
        monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(synchronize=lambda: None))
        monkeypatch.setattr(torch, "as_tensor", FakeDeviceBytes)
        return fake_driver

    return install


def test_posix_fd_path_maps_zeroes_and_closes_everything(fake):
    driver = fake(fabric=False)
    memory = symmetric_memory.CudaSymmetricMemory(SingleProcessBootstrap(), 3 << 20, "cuda:0")
    assert memory.handle_type == cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    assert memory.stride == 4 << 20 and memory.tensor.shape == (1, 3 << 20) and memory.tensor.strides == (4 << 20, 1)
    assert memory.tensor.zeroed == [0] and not memory._fds, "own segment zeroed, exported fd closed"
    # The own segment and the head granule (this device's memory at the start of the view).
    assert len(driver.handles) == 2 and len(driver.maps) == 2 and len(driver.reservations) == 1
    memory.close()
    memory.close()  # idempotent
    assert not driver.handles and not driver.maps and not driver.reservations


def test_fabric_path_imports_the_peer_segment(fake):
    driver = fake(fabric=True)
    memory = symmetric_memory.CudaSymmetricMemory(ScriptedPeer(healthy_fabric_peer(1000)), 1000, "cuda:0")
    assert memory.handle_type == cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC
    # The head granule at base, then segment r at base + (r + 1) * stride.
    assert sorted(driver.maps) == [1 << 40, (1 << 40) + GRANULARITY, (1 << 40) + 2 * GRANULARITY]
    assert driver.calls.count("cuMemImportFromShareableHandle") == 2  # the probe's own, then rank 1's
    memory.close()
    assert not driver.handles and not driver.maps and not driver.reservations


@pytest.mark.parametrize(
    "fail",
    [("cuMemCreate", 2), ("cuMemAddressReserve", 1), ("cuMemImportFromShareableHandle", 2), ("cuMemMap", 2),
     ("cuMemSetAccess", 1)],
    ids=lambda fail: f"{fail[0]}#{fail[1]}",
)  # fmt: skip
def test_a_failing_step_undoes_the_steps_before_it(fake, fail):
    driver = fake(fabric=True, fail=fail)
    with pytest.raises(CudaDriverError, match=f"{fail[0]} failed: CUDA_ERROR_OUT_OF_MEMORY"):
        symmetric_memory.CudaSymmetricMemory(ScriptedPeer(healthy_fabric_peer(1000)), 1000, "cuda:0")
    assert not driver.handles and not driver.maps and not driver.reservations


def test_a_peer_failure_undoes_local_steps_and_names_the_peer(fake):
    driver = fake(fabric=True)
    peer = healthy_fabric_peer(1000)
    peer[5] = b"CudaDriverError('cuMemMap failed')"  # rank 1 fails to map
    with pytest.raises(RuntimeError, match=r"import \+ map failed on rank\(s\) \[1\]"):
        symmetric_memory.CudaSymmetricMemory(ScriptedPeer(peer), 1000, "cuda:0")
    assert not driver.handles and not driver.maps and not driver.reservations


def test_no_fabric_anywhere_unless_every_rank_can(fake):
    fake(fabric=True)
    peer = [b"1000", b"", b"0", b"myhost-2"]  # rank 1 cannot use fabric handles, and is elsewhere
    with pytest.raises(RuntimeError, match="needs every rank on one host"):
        symmetric_memory.CudaSymmetricMemory(ScriptedPeer(peer), 1000, "cuda:0")


def test_release_and_restore_keep_the_addresses_and_free_the_shared_memory(fake):
    """checkpoint_prepare / restore: the segments' handles and mappings go, the range and the head
    granule stay; restore maps fresh segments at the same addresses and zeroes the own one."""
    driver = fake(fabric=True)
    peer = healthy_fabric_peer(1000) + [b"", bytes(range(64)), b"", b""]  # restore: create, handle, map, zero
    memory = symmetric_memory.CudaSymmetricMemory(ScriptedPeer(peer), 1000, "cuda:0")
    mapped, address, handles = sorted(driver.maps), memory.tensor.data_ptr(), len(driver.handles)
    head = driver.maps[1 << 40]
    memory.release_segments()
    memory.release_segments()  # repeated: nothing more
    assert driver.maps == {1 << 40: head} and driver.handles == {head} and len(driver.reservations) == 1
    with pytest.raises(ValueError, match="rank / size 0 / 2"):
        memory.restore_segments(SingleProcessBootstrap())
    memory.restore_segments(ScriptedPeer(peer[len(healthy_fabric_peer(1000)):]))
    memory.restore_segments(SingleProcessBootstrap())  # not released: nothing to do, no collective
    assert sorted(driver.maps) == mapped and memory.tensor.data_ptr() == address
    assert memory.tensor.zeroed == [0, 0] and len(driver.handles) == handles == 3  # head, own, rank 1's
    memory.close()
    assert not driver.handles and not driver.maps and not driver.reservations


def test_a_failed_restore_leaves_the_segments_released(fake):
    driver = fake(fabric=True)
    peer = healthy_fabric_peer(1000) + [b"", bytes(range(64)), b"CudaDriverError('cuMemMap failed')"]
    memory = symmetric_memory.CudaSymmetricMemory(ScriptedPeer(peer), 1000, "cuda:0")
    head = driver.maps[1 << 40]
    memory.release_segments()
    with pytest.raises(RuntimeError, match=r"import \+ map failed on rank\(s\) \[1\]"):
        memory.restore_segments(ScriptedPeer(peer[len(healthy_fabric_peer(1000)):]))
    assert memory.segments_released and driver.maps == {1 << 40: head} and driver.handles == {head}
    memory.close()
    assert not driver.handles and not driver.maps and not driver.reservations
