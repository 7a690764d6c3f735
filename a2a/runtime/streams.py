"""Rank streams: ordered work plus cross-rank waits, and the "current stream" an op runs on.

A `SignalStream` is one rank's ordered queue of work items (kernel launches). Where a phase's
cross-rank wait runs is the stream's `signal_mode`:

- `SignalMode.KERNEL` (CUDA): inside the phase's kernels (one program signals, waits, compares
  signatures and records faults; a2a.kernels.signal). Nothing to do on the stream.
- `SignalMode.HOST_WAIT` (CPU): the interpreted kernels signal the same way; the host waits
  (`wait`): it holds later work until every awaited flag holds the expected epoch, then judges the
  wait as the kernel would (poisoned peer, timeout, signature mismatch; a2a.runtime.host_signals).

Implementations: `CudaSignalStream` (a torch CUDA stream) and `HostSignalStream` (the CPU path);
`a2a.runtime.current_stream` picks the one an op runs on.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from a2a.runtime.protocol import Phase


class SignalMode(enum.Enum):
    """Where a phase's cross-rank wait runs (see the module docstring)."""

    KERNEL = "kernel"
    HOST_WAIT = "host"


@dataclass(frozen=True)
class FlagWait:
    """One wait of one rank, as raw addresses into its (host) workspace (see a2a.runtime.protocol).

    Done when every `flag_addresses[i]` (own flags[s] of `peer_ranks[i]`) equals the int32 at
    `value_address`, when one of them is FLAG_POISON, or when the rank has already recorded a fault
    (for the ordering wait: once every peer's flag is the value or FLAG_POISON, as in the kernel).
    Judged then: a poisoned peer, a timeout or (with `signature_addresses`) a peer whose signature
    row differs from `own_signature_address`'s row is recorded at `record_address`, and FLAG_POISON
    is stored at every `poison_addresses` entry (this rank's word in every peer's flag arrays);
    after a mismatch, except at `signal_addresses` (this phase's words), so that every peer still
    sees this rank's signal and signature and finds the disagreement itself.
    """

    phase: Phase
    waiting_rank: int
    peer_ranks: tuple[int, ...]
    flag_addresses: tuple[int, ...]
    value_address: int
    record_address: int
    poison_addresses: tuple[int, ...]
    signal_addresses: tuple[int, ...] = ()
    signature_addresses: tuple[int, ...] = ()  # own signatures[phase][s] row of each peer, or none
    own_signature_address: int = 0
    signature_words: int = 0
    timeout_ms: int = 0  # a blocking host wait's bound (A2A_SIGNAL_TIMEOUT_S when the plan was built)
    # When set: only the peers whose bit is set in the 64-bit mask stored there (two int32 words,
    # read when the wait runs) are waited for; the ordering wait reads the last gather's ranks so.
    peer_mask_address: int = 0


class SignalStream(ABC):
    """One rank's ordered stream of work and waits."""

    device: torch.device
    signal_mode: SignalMode

    @abstractmethod
    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` (which launches kernels) in stream order."""

    def wait(self, flag_wait: FlagWait) -> None:
        """HOST_WAIT mode: hold later work until `flag_wait` is done, and judge it."""
        raise NotImplementedError(f"{type(self).__name__} waits inside kernels ({self.signal_mode.value} mode)")

    @abstractmethod
    def synchronize(self) -> None:
        """Block the host until everything submitted so far has run."""

    @contextmanager
    def activate(self) -> Iterator[SignalStream]:
        """Make this the stream that a2a ops (and, on CUDA, torch) use in this thread."""
        _active().append(self)
        try:
            yield self
        finally:
            _active().pop()


_local = threading.local()


def _active() -> list[SignalStream]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack
