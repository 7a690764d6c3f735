"""The flag protocol on the host: the CPU path of every rank stream (`SignalMode.HOST_WAIT`).

`HostSignalStream` runs submitted work in order. The (interpreted) kernels signal: they store the
rank's signature and epoch into its words of every peer's arrays. The stream waits (`wait`): it
holds later work until the awaited flags hold the expected epoch, then judges the wait exactly as
the kernels do on CUDA (a2a.runtime.protocol): a poisoned peer, a timeout or (when the wait is
given signature addresses) a peer whose round signature differs is recorded in the rank's fault
record, and the rank poisons its flags in every peer. The dispatch's wait compares; a combine's
signatures are compared by this wait or by its gather kernel, as on CUDA (a2a.ops.combine picks by
the round's rows), and a disagreement the gather finds is recorded there and raised at the rank's
next call. A rank that has recorded a fault passes every later wait at once; its kernels then make
no remote store. Words are read and written through their addresses (a CPU workspace, possibly
shared between processes; x86 stores of aligned words are atomic and not reordered with earlier
stores, so data written before a flag is visible to whoever sees the flag).

Two ways to wait:
- blocking (no scheduler): poll until done or `A2A_SIGNAL_TIMEOUT_S` passes; a fault raises at
  once. Used when each rank is its own process (and by `SimulatedWorld.run_ranks` threads).
- cooperative (a `CooperativeScheduler` shared by the streams of a one-process simulated world):
  a wait that cannot complete parks the stream; submissions let parked streams try again, so N
  ranks driven from one thread progress like N CUDA streams would. A fault found there is recorded
  and raised by the rank's next call, as on CUDA. `drain()` records a timeout for every rank left
  waiting when nothing queued can signal any more, lets the rounds finish (poisoned) and raises.
  With a seed the scheduler is adversarial: it runs ranks in a random order and leaves work queued
  at random, so one rank's next round can run before a peer finishes its last gather.
"""

from __future__ import annotations

import ctypes
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from a2a import envs
from a2a.runtime.faults import A2AFaultError, A2ATimeoutError, fault_error
from a2a.runtime.protocol import FAULT_RECORD_WORDS, FLAG_POISON, FaultKind, FaultRecord, Phase, mask_halves
from a2a.runtime.streams import FlagWait, SignalMode, SignalStream


def _word(address: int) -> ctypes.c_int32:
    return ctypes.c_int32.from_address(address)


def _words(address: int, count: int) -> list[int]:
    return list((ctypes.c_int32 * count).from_address(address))


def read_fault_record(address: int) -> list[int]:
    return _words(address, FAULT_RECORD_WORDS)


def record_fault(wait: FlagWait, kind: FaultKind, ranks: list[int], *, fields: int = 0, first_rank: int = -1,
                 first_field: int = -1, own_value: int = 0, peer_value: int = 0, timeout_ms: int = 0,
                 missing: list[int] = ()) -> None:  # fmt: skip
    """Record a fault as the kernels do (phase word last) and poison this rank's flags in every peer."""
    record = (ctypes.c_int32 * FAULT_RECORD_WORDS).from_address(wait.record_address)
    low, high = mask_halves(sum(1 << r for r in ranks))
    missing_low, missing_high = mask_halves(sum(1 << r for r in missing))
    values = {FaultRecord.MISSING_LOW: missing_low, FaultRecord.MISSING_HIGH: missing_high,
              FaultRecord.KIND: int(kind), FaultRecord.RANKS_LOW: low, FaultRecord.RANKS_HIGH: high,
              FaultRecord.FIELDS: mask_halves(fields)[0], FaultRecord.FIRST_RANK: first_rank,
              FaultRecord.FIRST_FIELD: first_field, FaultRecord.OWN_VALUE: own_value,
              FaultRecord.PEER_VALUE: peer_value, FaultRecord.AWAITED: _word(wait.value_address).value,
              FaultRecord.TIMEOUT_MS: timeout_ms}  # fmt: skip
    for index, value in values.items():
        record[index] = value
    record[FaultRecord.PHASE] = int(wait.phase)
    spared = set(wait.signal_addresses) if kind == FaultKind.MISMATCH else set()
    for address in wait.poison_addresses:
        if address not in spared:
            _word(address).value = FLAG_POISON


class _PendingWait:
    """A `FlagWait` in a stream's queue."""

    def __init__(self, wait: FlagWait):
        self.wait = wait
        self.abandoned = False  # a faulted rank's ordering wait that can never complete (CPU deadlock)

    def faulted(self) -> bool:
        return _word(self.wait.record_address).value != 0

    def _peers_and_flags(self) -> list[tuple[int, int]]:
        wait = self.wait
        if wait.peer_mask_address:
            low, high = _words(wait.peer_mask_address, 2)
            mask = (low & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)
        else:
            mask = -1
        return [(peer, _word(address).value) for peer, address in zip(wait.peer_ranks, wait.flag_addresses)
                if mask >> peer & 1]  # fmt: skip

    def _flags(self) -> list[int]:
        return [flag for _, flag in self._peers_and_flags()]

    def missing(self) -> list[int]:
        value = _word(self.wait.value_address).value
        return [peer for peer, flag in self._peers_and_flags() if flag != value and flag >= 0]

    def ready(self) -> bool:
        value = _word(self.wait.value_address).value
        flags = self._flags()
        if self.faulted():
            # A faulted rank skips its barriers but still lets every peer finish its last gather
            # before its own next writes (a poisoned peer counts as done), as the kernel does.
            if self.wait.phase is not Phase.ORDERING or self.abandoned:
                return True
            return all(flag == value or flag < 0 for flag in flags)
        return all(flag == value for flag in flags) or any(flag < 0 for flag in flags)

    def judge(self, timed_out: bool = False, waited_ms: int = 0) -> bool:
        """Record what went wrong, if anything (see FlagWait); True if this wait recorded a fault.
        `waited_ms`: the bound a timed-out wait waited for (0: it never waited, e.g. a deadlock)."""
        if self.faulted():
            return False  # recorded earlier: this rank already stopped
        wait = self.wait
        poisoned = [peer for peer, flag in self._peers_and_flags() if flag < 0]
        if poisoned:
            record_fault(wait, FaultKind.PEER_FAILED, poisoned, missing=self.missing())
            return True
        if timed_out:
            record_fault(wait, FaultKind.TIMEOUT, self.missing(), timeout_ms=waited_ms)
            return True
        if wait.signature_addresses:
            words = wait.signature_words
            own = _words(wait.own_signature_address, words)
            mismatched, fields = [], 0
            first = None
            for peer, address in zip(wait.peer_ranks, wait.signature_addresses):  # (no peer mask: all active)
                theirs = _words(address, words)
                differing = [w for w in range(words) if theirs[w] != own[w]]
                if differing:
                    mismatched.append(peer)
                    fields |= sum(1 << w for w in differing)
                    if first is None:
                        first = (peer, differing[0], own[differing[0]], theirs[differing[0]])
            if first is not None:
                record_fault(wait, FaultKind.MISMATCH, mismatched, fields=fields, first_rank=first[0],
                             first_field=first[1], own_value=first[2], peer_value=first[3])  # fmt: skip
                return True
        return False

    def error(self, detail: str = "") -> A2AFaultError:
        error = fault_error(read_fault_record(self.wait.record_address), self.wait.waiting_rank)
        if detail and isinstance(error, A2ATimeoutError):
            error = A2ATimeoutError(error.what, error.waiting_rank, error.missing_ranks, error.timeout_s, detail)
        return error  # type: ignore[return-value]  # judge() recorded one


@dataclass
class _Work:
    run: Callable[[], None]


_Op = _Work | _PendingWait


class CooperativeScheduler:
    """Lets the host streams of one simulated world take turns until none can progress.

    `seed`: None runs every runnable op as soon as it can (streams in rank order); a seed makes the
    order adversarial (random rank order, and work left queued at random until a later submission
    or `drain`), as differently delayed or prioritised GPU streams would interleave.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.streams: list[HostSignalStream] = []
        self._running = False
        self._random = random.Random(seed) if seed is not None else None

    def progress(self, draining: bool = False) -> None:
        if self._running:  # a work item that submits more work: the outer loop picks it up
            return
        self._running = True
        try:
            if self._random is None:
                advanced = True
                while advanced:
                    advanced = False
                    for stream in self.streams:
                        advanced |= stream._run_ready()
            else:
                self._progress_adversarially(draining)
        finally:
            self._running = False

    def _progress_adversarially(self, draining: bool) -> None:
        """Run a random number of ops, one at a time from a random runnable stream, while a random
        subset of the streams is held back (as a delayed or low-priority GPU stream would be);
        `drain` runs everything."""
        budget = None if draining else self._random.randrange(0, 4 * len(self.streams) + 1)
        held = set() if draining else {s for s in self.streams if self._random.random() < 0.4}
        while budget is None or budget > 0:
            runnable = [stream for stream in self.streams if stream not in held and stream._head_ready()]
            if not runnable:
                return
            self._random.choice(runnable)._run_one()
            if budget is not None:
                budget -= 1

    def run_until_idle(self, stream: HostSignalStream) -> list[int]:
        """Run ops (in this scheduler's order) until `stream` has nothing queued or nothing can run;
        returns the peers `stream` is still waiting for ([] when its queue emptied)."""
        while stream._pending:
            runnable = [s for s in self.streams if s._head_ready()]
            if not runnable:
                break
            (self._random.choice(runnable) if self._random is not None else runnable[0])._run_one()
        if not stream._pending:
            return []
        head = stream._pending[0]
        return head.missing() if isinstance(head, _PendingWait) else []

    def drain(self) -> None:
        """Run everything that can run. Waits left that nothing queued can satisfy are recorded as
        timeouts (their ranks then poison their flags, so every rank's queued work finishes); the
        first such error is raised."""
        errors: list[A2AFaultError] = []
        while True:
            self.progress(draining=True)
            stuck = [stream for stream in self.streams if stream._pending]
            if not stuck:
                break
            for stream in stuck:
                head = stream._pending[0]
                if not isinstance(head, _PendingWait):
                    continue
                if head.judge(timed_out=True):
                    errors.append(head.error(" (deadlock: nothing queued in this simulated world could still signal)"))
                else:  # a faulted rank's ordering wait: nothing will complete it, let the rank go on
                    head.abandoned = True
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

    def wait(self, flag_wait: FlagWait) -> None:
        if len(flag_wait.flag_addresses) != len(flag_wait.peer_ranks):
            raise ValueError("a FlagWait needs one peer rank per flag address")
        self._enqueue(_PendingWait(flag_wait))

    def synchronize(self) -> None:
        if self._scheduler is not None:
            self._scheduler.drain()

    def blocking_peers(self) -> list[int]:
        """Cooperative streams: run what can run until this stream's queue is empty; the peers it
        still waits for (their signal was never submitted), else []."""
        return self._scheduler.run_until_idle(self) if self._scheduler is not None else []

    def _enqueue(self, op: _Op) -> None:
        if self._scheduler is None:
            self._run_blocking(op)
            return
        self._pending.append(op)
        self._scheduler.progress()

    def _head_ready(self) -> bool:
        if not self._pending:
            return False
        head = self._pending[0]
        return not isinstance(head, _PendingWait) or head.ready()

    def _run_one(self) -> None:
        op = self._pending.popleft()
        if isinstance(op, _PendingWait):
            op.judge()  # recorded faults are raised by the rank's next call, as on CUDA
        else:
            op.run()

    def _run_ready(self) -> bool:
        """Run queued ops until the head is an unsatisfied wait; True if anything ran."""
        advanced = False
        while self._head_ready():
            self._run_one()
            advanced = True
        return advanced

    @staticmethod
    def _run_blocking(op: _Op) -> None:
        if isinstance(op, _Work):
            op.run()
            return
        poll_s = envs.host_poll_s()
        deadline = time.monotonic() + op.wait.timeout_ms / 1e3
        while not op.ready():
            if time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        if op.judge(timed_out=not op.ready(), waited_ms=op.wait.timeout_ms):
            raise op.error()


_default: HostSignalStream | None = None


def default_host_stream() -> HostSignalStream:
    """The blocking host stream used by ops on CPU tensors when no stream is activated."""
    global _default
    if _default is None:
        _default = HostSignalStream()
    return _default
