"""A world of one process per rank: what `MoeAlltoAll(..., world=...)` needs across processes.

`ProcessWorld(bootstrap_or_group, device)` is this process's view of the world: its rank, the
rank count, its one stream, and symmetric workspaces mapped from every rank:

- CUDA (`device="cuda"` or `"cuda:N"`, one device per process): workspaces are
  `CudaSymmetricMemory` (driver VMM; segments of other processes, on this or other GPUs, mapped
  into this process); the rank stream is the device's current torch stream at each call; the
  phase barriers run inside the kernels.
- CPU (`device="cpu"`): workspaces are `HostSharedMemory` (one shared-memory file mapped by all);
  the rank stream is a blocking `HostSignalStream`: a wait polls the flags and raises the fault
  it finds (`A2ATimeoutError` after `A2A_SIGNAL_TIMEOUT_S` seconds naming the ranks that never
  signalled, a failed peer, a disagreeing round).

Collective calls (every rank, same order, same arguments): the constructor, `workspace` when it
allocates (a new key or a new size), `release_workspace`, `barrier` and `close`. Workspaces, and
every view of them, stay valid until `release_workspace(key)` or `close()`.
"""

from __future__ import annotations

import torch

from a2a.runtime.bootstrap import Bootstrap, bootstrap_from
from a2a.runtime.host_mapped import free_released
from a2a.runtime.streams import SignalStream
from a2a.runtime.symmetric_memory import SymmetricMemory


class ProcessWorld:
    """This process's rank of a world of `bootstrap.world_size` processes, on `device`.

    `bootstrap_or_group`: an a2a `Bootstrap`, a torch.distributed ProcessGroup, an mpi4py Comm, or
    None (the default torch.distributed group).
    """

    def __init__(self, bootstrap_or_group: object = None, device: str | torch.device = "cuda"):
        self.bootstrap: Bootstrap = bootstrap_from(bootstrap_or_group)
        self.rank = self.bootstrap.rank
        self.ep_size = self.bootstrap.world_size
        device = torch.device(device)
        self._stream: SignalStream | None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {device} asked for, but torch sees no CUDA device: use device='cpu'")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self._stream = None  # the current stream at each call (see stream())
        elif device.type == "cpu":
            from a2a.runtime.host_signals import HostSignalStream

            self._stream = HostSignalStream()  # no scheduler: waits block, polling, with a timeout
        else:
            raise ValueError(f"device must be cuda, cuda:N or cpu, got {device}")
        self.device = device
        self._memories: dict[tuple, SymmetricMemory] = {}
        self._closed = False
        self.checkpointed = False  # between checkpoint_prepare and checkpoint_restore: no workspace is mapped
        self.checkpoint_generation = 0  # restores so far: every workspace's segments are fresh and zeroed since

    # Ops of this rank run on the caller's current stream (CUDA) or in call order (CPU): nothing to
    # switch to or order against (see MoeAlltoAll).
    switches_streams = False

    def stream(self, rank: int) -> SignalStream:
        """This rank's stream; `rank` must be this process's rank (peers live in other processes).

        On CUDA it is the device's current torch stream at the time of the call, as engines expect
        (ops run on the current stream; a CUDA-graph capture stream works like any other).
        """
        if rank != self.rank:
            raise ValueError(f"rank must be this process's rank {self.rank} (one process per rank), got {rank}")
        if self._stream is None:
            from a2a.runtime.cuda_signals import CudaSignalStream

            return CudaSignalStream.wrap(torch.cuda.current_stream(self.device))
        return self._stream

    def workspace(self, key: tuple, size_per_rank: int) -> torch.Tensor:
        """The zero-initialised `[ep_size, size_per_rank]` uint8 workspace for `key`.

        Allocated once per key (collective); later calls with the same size return the same
        tensor without communicating. A different size for a key is collective too: every rank
        finishes its work, waits at a barrier (no peer still uses the old one), frees it and
        allocates a fresh, zeroed one. Row stride may exceed `size_per_rank`.
        """
        self._check_open()
        if not isinstance(key, tuple):
            raise TypeError(f"key must be a tuple, got {type(key).__name__}")
        memory = self._memories.get(key)
        if memory is not None and memory.size_per_rank == size_per_rank:
            return memory.tensor
        if memory is not None:
            self.release_workspace(key)
        memory = self._allocate(size_per_rank)
        self._memories[key] = memory
        return memory.tensor

    def _allocate(self, size_per_rank: int) -> SymmetricMemory:
        if self.device.type == "cuda":
            from a2a.runtime.symmetric_memory import CudaSymmetricMemory

            return CudaSymmetricMemory(self.bootstrap, size_per_rank, self.device)
        from a2a.runtime.host_shared_memory import HostSharedMemory

        return HostSharedMemory(self.bootstrap, size_per_rank)

    def release_workspace(self, key: tuple) -> None:
        """Free the workspace of `key` on every rank (collective; drop its views first)."""
        self._check_open()
        self.synchronize()
        self.bootstrap.barrier()  # no peer still reads or writes this rank's segment
        memory = self._memories.pop(key, None)
        if memory is not None:
            memory.close()

    def wait_for_caller(self, rank: int) -> None:
        """Nothing to do: the rank stream is the caller's current stream (CUDA), or work runs in
        call order (CPU)."""
        self.stream(rank)  # checks the rank

    def ready_to_launch(self, rank: int) -> None:
        """Nothing to wait for: each process plans and launches its own rank's ops."""

    def peers_not_arrived(self, rank: int) -> list[int]:
        """[]: peers live in other processes (their absence shows as a timeout)."""
        return []

    def synchronize(self) -> None:
        """Block until this rank's work has run (on CUDA: the whole device; not a barrier)."""
        if self._stream is None:
            torch.cuda.synchronize(self.device)
            free_released()  # the device is idle (see a2a.runtime.host_mapped)
        else:
            self._stream.synchronize()

    def barrier(self) -> None:
        """Host barrier across the ranks (does not synchronise streams: call `synchronize` first)."""
        self.bootstrap.barrier()

    def checkpoint_prepare(self) -> None:
        """FlashInfer's checkpoint_prepare for every workspace of this world: finish this rank's work,
        wait for every rank, unmap and release the shared memory (the addresses stay reserved, so
        captured CUDA graphs stay valid), wait again (collective; repeated calls do nothing). CUDA
        only: host shared memory raises NotImplementedError, before anything happens."""
        self._check_open()
        if self.checkpointed:
            return
        if self.device.type != "cuda":
            raise NotImplementedError("checkpoint_prepare: host shared memory (device='cpu') cannot be released and "
                                      "mapped again at the same addresses; only CUDA workspaces can")  # fmt: skip
        self.synchronize()
        self.bootstrap.barrier()  # no rank still reads or writes a peer's segment
        for memory in self._memories.values():
            memory.release_segments()
        self.checkpointed = True
        self.bootstrap.barrier()  # no rank goes on while a peer still holds its handles

    def checkpoint_restore(self, group: object) -> None:
        """After checkpoint_prepare: fresh, zeroed segments at the same addresses for every
        workspace, shared over `group` (a Bootstrap, ProcessGroup, mpi4py Comm or CommBackend of the
        same rank and size, e.g. the rebuilt one), which this world then uses (collective)."""
        self._check_open()
        bootstrap = bootstrap_from(group)
        if (bootstrap.rank, bootstrap.world_size) != (self.rank, self.ep_size):
            raise ValueError(f"checkpoint_restore needs a group where this process is rank {self.rank} of "
                             f"{self.ep_size}, got rank {bootstrap.rank} of {bootstrap.world_size}")  # fmt: skip
        self.synchronize()
        for memory in self._memories.values():
            memory.restore_segments(bootstrap)
        self.bootstrap = bootstrap
        if self.checkpointed:
            self.checkpointed = False
            self.checkpoint_generation += 1
        bootstrap.barrier()  # every segment is zeroed before any rank dispatches into it

    def close(self) -> None:
        """Finish this rank's work, wait for every rank, free every workspace (collective, idempotent)."""
        if self._closed:
            return
        self.synchronize()
        self.bootstrap.barrier()
        self._closed = True
        memories, self._memories = self._memories, {}
        errors = []
        for memory in memories.values():
            try:
                memory.close()
            except Exception as exc:  # noqa: BLE001 - free the others, then report the first
                errors.append(exc)
        if errors:
            raise errors[0]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ProcessWorld is closed")

    def __enter__(self) -> ProcessWorld:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# One ProcessWorld per (group, device) for worlds built from a bare group, so every MoeAlltoAll
# built from the same group shares its workspaces (one per geometry), as instances of one world do.
_worlds_by_group: dict[tuple[int, str], tuple[object, ProcessWorld]] = {}


def process_world_for(group: object, device: str | torch.device) -> ProcessWorld:
    """The ProcessWorld of `group` (a torch.distributed group, an mpi4py communicator or a
    Bootstrap) on `device`, made once (collectively) and reused; closed worlds are rebuilt."""
    key = (id(group), str(torch.device(device)))
    entry = _worlds_by_group.get(key)
    if entry is None or entry[0] is not group or entry[1]._closed:
        entry = _worlds_by_group[key] = (group, ProcessWorld(group, device))
    return entry[1]
