"""Bootstrap: the host-side collectives that set up a multi-process world (one process per rank).

Symmetric memory needs a few small collectives before any workspace exists: agree on a random
name, gather sizes, pids and handles, and hold every rank at a barrier until all segments are
zeroed. `Bootstrap` is that interface; it moves bytes and ints on the host only, never tensors on
a device, so it works under any launcher:

- `TorchDistributedBootstrap(group)`: a `torch.distributed` process group (gloo or nccl: the
  object collectives pickle on the host; with nccl, set the CUDA device of each process first).
- `MpiBootstrap(comm)`: an mpi4py communicator.
- `SingleProcessBootstrap()`: one rank, no peers (tests, single-GPU runs).

`bootstrap_from(obj)` accepts any of these, a torch `ProcessGroup`, an mpi4py `Comm`, or None (the
default torch.distributed group). Every method is collective: all ranks call it in the same order.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Any


class Bootstrap(ABC):
    """Host collectives over the ranks of one world; `rank` is in `[0, world_size)`."""

    rank: int
    world_size: int

    @abstractmethod
    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, indexed by rank (the same list on every rank)."""

    def allgather_int(self, value: int) -> list[int]:
        """Every rank's `value`, indexed by rank."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"value must be an int, got {type(value).__name__}")
        return [int(item.decode()) for item in self.allgather_bytes(str(value).encode())]

    def barrier(self) -> None:
        """Return only once every rank has entered the barrier."""
        self.allgather_bytes(b"")


def _check_bytes(data: Any) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return bytes(data)


class SingleProcessBootstrap(Bootstrap):
    """A world of one rank: every collective returns this rank's own contribution."""

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [_check_bytes(data)]


class TorchDistributedBootstrap(Bootstrap):
    """Collectives over a `torch.distributed` process group (None: the default group).

    Uses `all_gather_object`, which pickles on the host; with an nccl group it stages through the
    current CUDA device, so call `torch.cuda.set_device` in each process first.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributedBootstrap needs an initialised torch.distributed: call "
                "torch.distributed.init_process_group(...) in every process first"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("group must contain this process (torch.distributed.get_rank(group) returned -1)")

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        gathered: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(gathered, _check_bytes(data), group=self.group)
        return [bytes(item) for item in gathered]


class MpiBootstrap(Bootstrap):
    """Collectives over an mpi4py communicator (e.g. `MPI.COMM_WORLD`)."""

    def __init__(self, comm: Any) -> None:
        for method in ("Get_rank", "Get_size", "allgather", "Barrier"):
            if not hasattr(comm, method):
                raise TypeError(f"comm must be an mpi4py communicator (no {method}), got {type(comm).__name__}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [bytes(item) for item in self.comm.allgather(_check_bytes(data))]

    def barrier(self) -> None:
        self.comm.Barrier()


class CommBackendBootstrap(Bootstrap):
    """Collectives over a FlashInfer-style `CommBackend`: an object with `Get_rank()`, `Get_size()`,
    `allgather(obj)` (a per-rank sequence) and `barrier()` (`bcast` and `Split` are not needed),
    e.g. the communicator wrappers vLLM and SGLang pass to FlashInfer's MnnvlConfig."""

    def __init__(self, comm: Any) -> None:
        if not is_comm_backend(comm):
            raise TypeError(f"comm must have Get_rank, Get_size, allgather and barrier, got {type(comm).__name__}")
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.world_size = int(comm.Get_size())

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        gathered = list(self.comm.allgather(_check_bytes(data)))
        if len(gathered) != self.world_size:
            raise RuntimeError(f"comm.allgather returned {len(gathered)} items for {self.world_size} ranks")
        return [bytes(item) for item in gathered]

    def barrier(self) -> None:
        self.comm.barrier()


def is_comm_backend(obj: Any) -> bool:
    """Whether `obj` has the methods of FlashInfer's CommBackend that a bootstrap uses."""
    return all(callable(getattr(obj, name, None)) for name in ("Get_rank", "Get_size", "allgather", "barrier"))


def _is_mpi_comm(obj: Any) -> bool:
    # Never import mpi4py.MPI here: importing it initialises MPI. An mpi4py Comm exists only
    # where the caller already imported it.
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and isinstance(obj, mpi.Comm)


def _is_process_group(obj: Any) -> bool:
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def bootstrap_from(obj: Any = None) -> Bootstrap:
    """A `Bootstrap` for `obj`: a Bootstrap (returned as is), a torch.distributed ProcessGroup, an
    mpi4py Comm, a FlashInfer-style CommBackend, or None for the default torch.distributed group."""
    if isinstance(obj, Bootstrap):
        return obj
    if obj is None or _is_process_group(obj):
        return TorchDistributedBootstrap(obj)
    if _is_mpi_comm(obj):
        return MpiBootstrap(obj)
    if is_comm_backend(obj):
        return CommBackendBootstrap(obj)
    raise TypeError(
        "bootstrap must be an a2a Bootstrap, a torch.distributed ProcessGroup, an mpi4py Comm, a FlashInfer-style "
        f"CommBackend or None (the default torch.distributed group), got {type(obj).__name__}"
    )
