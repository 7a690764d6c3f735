"""Rank streams: ordered work plus cross-rank flags, and the "current stream" an op runs on.

A `SignalStream` is one rank's ordered queue of work items (kernel launches). A phase ends with a
cross-rank barrier over one flag array (`u32 [ep_size]` in every segment); where the barrier's
signal and wait run is the stream's `signal_mode`:

- `SignalMode.KERNEL` (CUDA, default): the phase's last kernel signals and waits in one program
  (a2a.kernels.signal): flags carry epoch values from a device counter, never reset, bounded by a
  timeout. Nothing to do on the stream.
- `SignalMode.HOST_WAIT` (CPU): the kernels signal the same epochs; the host waits until every
  own flag equals the own flag value (`wait_for_value`), with a timeout.
- `SignalMode.STREAM_MEMOPS` (CUDA, `A2A_SIGNALS=stream`): stream memory operations instead:
  `set_flags` stores FLAG_SET once all earlier work is visible, `wait_flags` holds the stream until
  every own flag is FLAG_SET, then resets them to FLAG_CLEAR (constant values, so graphs replay;
  no timeout). A peer sets the same word again only in a later phase that itself waits for a
  signal this rank sends after the reset (stream order); see a2a.runtime.scheduler.

Every rank of a world must use the same mode (the flag words mean different things).

Implementations: `CudaSignalStream` (a torch CUDA stream) and `HostSignalStream` (the CPU path).
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

FLAG_SET = 1
FLAG_CLEAR = 0


class SignalMode(enum.Enum):
    """Where a phase's cross-rank barrier runs (see the module docstring)."""

    KERNEL = "kernel"
    HOST_WAIT = "host"
    STREAM_MEMOPS = "stream"


@dataclass(frozen=True)
class FlagWait:
    """What a wait is for, so a timeout can name the ranks whose signal is missing, and where a host
    wait records a timeout (the layout of a2a.layout.RoundState.TIMEOUT_STATUS: phase code, missing
    ranks 0..31, missing ranks 32..63, awaited value) so later calls of the rank can raise too."""

    what: str  # e.g. "dispatch" or "combine"
    waiting_rank: int
    peer_ranks: tuple[int, ...]  # peer_ranks[i] is expected to set addresses[i]
    phase_code: int = 0
    record_address: int = 0  # 0: nowhere


class SignalStream(ABC):
    """One rank's ordered stream of work and flag operations."""

    device: torch.device
    signal_mode: SignalMode

    @abstractmethod
    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` (which launches kernels) in stream order."""

    def wait_for_value(self, addresses: Sequence[int], value_address: int, wait: FlagWait) -> None:
        """HOST_WAIT mode: hold later work until every u32 at `addresses` equals the one at `value_address`."""
        raise NotImplementedError(f"{type(self).__name__} signals in {self.signal_mode.value} mode")

    def set_flags(self, addresses: Sequence[int]) -> None:
        """STREAM_MEMOPS mode: store FLAG_SET at every address once all earlier work is visible."""
        raise NotImplementedError(f"{type(self).__name__} signals in {self.signal_mode.value} mode")

    def wait_flags(self, addresses: Sequence[int], wait: FlagWait) -> None:
        """STREAM_MEMOPS mode: hold later work until every address holds FLAG_SET, then clear them."""
        raise NotImplementedError(f"{type(self).__name__} signals in {self.signal_mode.value} mode")

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


def current_stream_for_launch(mode: SignalMode, device: torch.device | None = None) -> SignalStream | None:
    """None when a phase in `mode` needs nothing from the stream object (KERNEL mode: launches go to
    torch's current CUDA stream, which an activated rank stream also is), else `current_stream`."""
    if mode is SignalMode.KERNEL:
        return None
    return current_stream(device if device is not None else torch.device("cpu" if mode is SignalMode.HOST_WAIT else "cuda"))


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
