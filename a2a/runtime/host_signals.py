"""The flag protocol on the host: the CPU path of every rank stream (`SignalMode.HOST_WAIT`).

`HostSignalStream` runs submitted work in order on the calling thread. The (interpreted) kernels
signal: they store the rank's new flag value into its word of every peer's flag array. The stream
waits: `wait_for_value` holds later work until every own flag equals the own flag value. Flags are
u32 words read through their addresses (a CPU workspace, possibly shared between processes; x86
stores of aligned words are atomic and not reordered with earlier stores, so data written before a
flag is visible to whoever sees the flag).

Two ways to wait:
- blocking (no scheduler): poll until the flags are set or `A2A_SIGNAL_TIMEOUT_S` passes, then
  raise `A2ATimeoutError` naming the missing ranks. Used when each rank is its own process.
- cooperative (a `CooperativeScheduler` shared by the streams of a one-process simulated world):
  a wait that cannot complete parks the stream; every submission lets every parked stream try
  again, so N ranks driven from one thread progress like N CUDA streams would. `drain()` raises
  `A2ATimeoutError` when work is left that nothing can unblock (a rank that never signals), after
  recording it for every stuck rank and dropping their queued work.
"""

from __future__ import annotations

import ctypes
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from a2a import envs
from a2a.errors import A2ATimeoutError
from a2a.runtime.streams import FlagWait, SignalMode, SignalStream


def _word(address: int) -> ctypes.c_uint32:
    return ctypes.c_uint32.from_address(address)


@dataclass
class _Work:
    run: Callable[[], None]


@dataclass
class _WaitFlags:
    addresses: tuple[int, ...]
    value_address: int
    wait: FlagWait

    def missing(self) -> list[int]:
        value = _word(self.value_address).value
        return [peer for peer, address in zip(self.wait.peer_ranks, self.addresses) if _word(address).value != value]

    def timed_out(self, timeout_s: float | None) -> A2ATimeoutError:
        """Record the timeout where the wait says (see FlagWait) and return the error to raise."""
        missing = self.missing()
        if self.wait.record_address:
            mask = sum(1 << peer for peer in missing)
            record = (ctypes.c_uint32 * 4).from_address(self.wait.record_address)
            record[1], record[2], record[3] = mask & 0xFFFFFFFF, mask >> 32, _word(self.value_address).value
            record[0] = self.wait.phase_code
        return A2ATimeoutError(self.wait.what, self.wait.waiting_rank, missing, timeout_s)


_Op = _Work | _WaitFlags


class CooperativeScheduler:
    """Lets the host streams of one simulated world take turns until none can progress."""

    def __init__(self) -> None:
        self.streams: list[HostSignalStream] = []
        self._running = False

    def progress(self) -> None:
        if self._running:  # a work item that submits more work: the outer loop picks it up
            return
        self._running = True
        try:
            advanced = True
            while advanced:
                advanced = False
                for stream in self.streams:
                    advanced |= stream._run_ready()
        finally:
            self._running = False

    def drain(self) -> None:
        """Run everything that can run; if waits are left that nothing can satisfy, record the timeout
        for every stuck rank, drop their queued work (the round is lost; this releases the streams so
        the world can be torn down) and raise for the first."""
        self.progress()
        errors = []
        for stream in self.streams:
            if stream._pending:
                head = stream._pending[0]
                assert isinstance(head, _WaitFlags)
                errors.append(head.timed_out(None))
                stream._pending.clear()
        if errors:
            raise errors[0]


class HostSignalStream(SignalStream):
    """A rank stream on the host; see the module docstring for the two waiting modes."""

    signal_mode = SignalMode.HOST_WAIT

    def __init__(self, scheduler: CooperativeScheduler | None = None) -> None:
        self.device = torch.device("cpu")
        self._scheduler = scheduler
        self._pending: deque[_Op] = deque()
        if scheduler is not None:
            scheduler.streams.append(self)

    def submit(self, work: Callable[[], None]) -> None:
        self._enqueue(_Work(work))

    def wait_for_value(self, addresses: Sequence[int], value_address: int, wait: FlagWait) -> None:
        if len(addresses) != len(wait.peer_ranks):
            raise ValueError("wait_for_value needs one peer rank per address")
        self._enqueue(_WaitFlags(tuple(addresses), value_address, wait))

    def synchronize(self) -> None:
        if self._scheduler is not None:
            self._scheduler.drain()

    def _enqueue(self, op: _Op) -> None:
        if self._scheduler is None:
            self._run_blocking(op)
            return
        self._pending.append(op)
        self._scheduler.progress()

    def _run_ready(self) -> bool:
        """Run queued ops until the head is an unsatisfied wait; True if anything ran."""
        advanced = False
        while self._pending:
            op = self._pending[0]
            if isinstance(op, _WaitFlags) and op.missing():
                break
            self._pending.popleft()
            _execute(op)
            advanced = True
        return advanced

    @staticmethod
    def _run_blocking(op: _Op) -> None:
        if isinstance(op, _WaitFlags):
            timeout_s = envs.signal_timeout_s()
            poll_s = envs.host_poll_s()
            deadline = time.monotonic() + timeout_s
            while op.missing():
                if time.monotonic() > deadline:
                    raise op.timed_out(timeout_s)
                time.sleep(poll_s)
        _execute(op)


def _execute(op: _Op) -> None:
    if isinstance(op, _Work):
        op.run()


_default: HostSignalStream | None = None


def default_host_stream() -> HostSignalStream:
    """The blocking host stream used by ops on CPU tensors when no stream is activated."""
    global _default
    if _default is None:
        _default = HostSignalStream()
    return _default
