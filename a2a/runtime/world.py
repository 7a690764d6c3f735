"""What `MoeAlltoAll` needs from a world: the ranks' workspace and each rank's stream.

Two implementations: `a2a.runtime.simulated.SimulatedWorld` (every rank in this process, one
stream each) and `a2a.runtime.process_world.ProcessWorld` (one process per rank; the caller's
current stream is the rank's stream). Every method is called with this process's view of rank
`rank`; what must agree across ranks (keys and sizes of workspaces) is the caller's to keep.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from a2a.runtime.streams import SignalStream


@runtime_checkable
class World(Protocol):
    ep_size: int
    device: torch.device

    @property
    def switches_streams(self) -> bool:
        """Whether a rank's ops run on the rank's own stream, ordered after the caller's work
        (`wait_for_caller`), rather than on the caller's current stream."""
        ...

    def stream(self, rank: int) -> SignalStream:
        """Rank `rank`'s stream (activate it to run ops as that rank)."""
        ...

    def workspace(self, key: tuple, size_per_rank: int) -> torch.Tensor:
        """The zero-initialised `[ep_size, size_per_rank]` uint8 workspace of `key`, made once."""
        ...

    def release_workspace(self, key: tuple) -> None:
        """Drop the workspace of `key` once no rank uses it."""
        ...

    def wait_for_caller(self, rank: int) -> None:
        """Order rank `rank`'s stream after the caller's current work."""
        ...

    def ready_to_launch(self, rank: int) -> None:
        """Called by an op of rank `rank` after it planned and before it launches: a world whose
        ranks run in threads of one process holds it until every rank planned (see
        SimulatedWorld.run_ranks); otherwise nothing."""
        ...

    def peers_not_arrived(self, rank: int) -> list[int]:
        """The peers whose signal rank `rank`'s queued work still needs and that have not
        submitted it, where this process can tell (a one-thread CPU simulation); else []."""
        ...

    def synchronize(self) -> None:
        """Block until the work of this process's ranks has run."""
        ...

    def barrier(self) -> None:
        """Host barrier of every rank (collective); nothing to wait for in a one-process world."""
        ...

    checkpointed: bool  # between checkpoint_prepare and checkpoint_restore: no round may run
    checkpoint_generation: int  # restores that gave fresh, zeroed workspaces (the host forgets their rounds)

    def checkpoint_prepare(self) -> None:
        """Release the memory shared with other processes, keeping every workspace's addresses, so
        the process can be checkpointed (collective; the workspaces are unusable until restore)."""
        ...

    def checkpoint_restore(self, group: object) -> None:
        """After checkpoint_prepare: fresh, zeroed workspaces at the same addresses over `group` (a
        rebuilt communicator of the same rank and size; collective)."""
        ...
