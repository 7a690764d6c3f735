"""Rank streams: ordered work plus cross-rank flags, and the "current stream" an op runs on.

A `SignalStream` is one rank's ordered queue: work items (kernel launches) and flag operations run
in submission order. Flags are u32 words in some rank's workspace segment, addressed by raw
address. The protocol is set / wait / reset with constant values, so a round captured in a CUDA
graph replays correctly (no value is baked in that changes between rounds):

    sender:   set_flags(addresses)   -- each word := FLAG_SET, after all earlier work is visible
    receiver: wait_flags(addresses)  -- until every word == FLAG_SET, then each word := FLAG_CLEAR

The receiver may reset because a sender sets the same word again only in a later phase that itself
waits for a signal the receiver sends after the reset (stream order); see a2a.scheduler.

Implementations: `CudaSignalStream` (stream memory operations of the CUDA driver) and
`HostSignalStream` (the same protocol on the host, for the CPU path).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

FLAG_SET = 1
FLAG_CLEAR = 0


@dataclass(frozen=True)
class FlagWait:
    """What a wait is for, so a timeout can name the ranks whose signal is missing."""

    what: str  # e.g. "dispatch" or "combine"
    waiting_rank: int
    peer_ranks: tuple[int, ...]  # peer_ranks[i] is expected to set addresses[i]


class SignalStream(ABC):
    """One rank's ordered stream of work and flag operations."""

    device: torch.device

    @abstractmethod
    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` (which launches kernels) in stream order."""

    @abstractmethod
    def set_flags(self, addresses: Sequence[int]) -> None:
        """Store FLAG_SET at every address once all earlier work of this stream is visible."""

    @abstractmethod
    def wait_flags(self, addresses: Sequence[int], wait: FlagWait) -> None:
        """Hold later work until every address holds FLAG_SET, then clear them."""

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


def current_stream(device: torch.device) -> SignalStream:
    """The stream an op on `device` runs on: the activated one, else the device's current stream."""
    stack = _active()
    if stack and stack[-1].device.type == device.type:
        return stack[-1]
    if device.type == "cuda":
        from a2a.runtime.cuda_signals import CudaSignalStream

        return CudaSignalStream.wrap(torch.cuda.current_stream(device))
    from a2a.runtime.host_signals import default_host_stream

    return default_host_stream()
