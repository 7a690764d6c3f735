"""Symmetric memory on the host: one shared-memory file mapped by every rank (the CPU path).

The CPU counterpart of `CudaSymmetricMemory`, with the same contract (see
a2a.runtime.symmetric_memory): `tensor` is `[world_size, size_per_rank]` uint8, row r is rank r's
segment at byte `r * stride` of one mapping, this rank's row is zero and every rank has passed a
barrier when the constructor returns. Sequence (collective):

    rank 0   creates /dev/shm/a2a-<uid>-<random> (O_EXCL, mode 0600), sized world_size * stride
    all      learn the name (bootstrap), open it, mmap it shared, close the fd (the map keeps it)
    all      agree that every rank mapped it; then rank 0 unlinks it (no file outlives the setup)
    all      zero the own segment, agree again (the barrier)

After `close()` nothing is left: no file, no descriptor, no mapping (views become dangling).
Kernels under the Triton interpreter and `HostSignalStream` flags address this memory directly;
aligned 32-bit stores on x86 are atomic and not reordered with earlier stores, so a peer that sees
a flag also sees the data written before it.
"""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

import torch

from a2a.runtime.bootstrap import Bootstrap
from a2a.runtime.alignment import align_up
from a2a.runtime.symmetric_memory import SymmetricMemory, agreed_size, run_on_every_rank

DEFAULT_DIRECTORY = Path("/dev/shm")


class HostSharedMemory(SymmetricMemory):
    """`world_size` host segments of `size_per_rank` bytes in one file under `directory`, mapped by
    every rank of `bootstrap`; rows are page aligned (stride = align_up(size, page size))."""

    def __init__(self, bootstrap: Bootstrap, size_per_rank: int, directory: str | Path = DEFAULT_DIRECTORY):
        super().__init__()
        self.rank, self.world_size = bootstrap.rank, bootstrap.world_size
        self.size_per_rank = agreed_size(bootstrap, size_per_rank)
        self.stride = align_up(self.size_per_rank, mmap.PAGESIZE)
        self._path: Path | None = None
        self._mapping: mmap.mmap | None = None
        self._undo.callback(self._unmap)
        undo = self._undo
        directory = Path(directory)
        created = run_on_every_rank(
            bootstrap, f"creating a shared-memory file in {directory}",
            lambda: self._create(directory) if self.rank == 0 else "", undo,
        )  # fmt: skip
        path = Path(bootstrap.allgather_bytes(created.encode())[0].decode())
        try:
            run_on_every_rank(bootstrap, f"mapping {path}", lambda: self._map(path), undo)
        finally:
            self._unlink()  # on rank 0: every rank mapped it (or gave up); the name is not needed
        run_on_every_rank(bootstrap, "zeroing the own segment", lambda: self.tensor[self.rank].zero_(), undo)

    def _create(self, directory: Path) -> str:
        if not directory.is_dir():
            raise RuntimeError(f"{directory} does not exist: host shared memory needs a tmpfs such as /dev/shm")
        path = directory / f"a2a-{os.getuid()}-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._path = path
        self._undo.callback(self._unlink)
        try:
            os.ftruncate(fd, self.world_size * self.stride)
        finally:
            os.close(fd)
        return str(path)

    def _map(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._mapping = mmap.mmap(fd, self.world_size * self.stride, mmap.MAP_SHARED)
        finally:
            os.close(fd)  # the mapping holds its own reference
        flat = torch.frombuffer(self._mapping, dtype=torch.uint8)
        self.tensor = flat.as_strided((self.world_size, self.size_per_rank), (self.stride, 1))

    def _unlink(self) -> None:
        if self._path is not None:
            path, self._path = self._path, None
            path.unlink(missing_ok=True)

    def _unmap(self) -> None:
        if hasattr(self, "tensor"):
            del self.tensor
        if self._mapping is not None:
            mapping, self._mapping = self._mapping, None
            mapping.close()
