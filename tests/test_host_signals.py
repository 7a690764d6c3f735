"""The host side of the flag protocol (CPU): waits for epoch values, parking, deadlock and timeout
reports, poisoned peers, signature mismatches, and the fault record + poison a judged wait leaves.

Here the test plays the peers' kernels: it stores flag values into the waiter's words directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import a2a
from a2a.errors import A2AMismatchError, A2APeerFailedError
from a2a.runtime.host_signals import CooperativeScheduler, HostSignalStream
from a2a.runtime.protocol import FLAG_POISON, FaultKind, FaultRecord, Phase
from a2a.runtime.streams import FlagWait
from tests.conftest import requires_interpreter

EPOCH = 7


@dataclass
class Words:
    """One waiter's words in a plain int32 tensor: flags, value, fault record, poison targets, signatures."""

    peers: tuple[int, ...]
    words: torch.Tensor

    @classmethod
    def make(cls, peers: tuple[int, ...], signature_words: int = 4) -> Words:
        n = len(peers)
        words = torch.zeros(n + 1 + 16 + 3 * n + (n + 1) * signature_words, dtype=torch.int32)
        words[n] = EPOCH
        return cls(peers, words)

    def address(self, index: int) -> int:
        return self.words.data_ptr() + 4 * index

    @property
    def flags(self) -> torch.Tensor:
        return self.words[: len(self.peers)]

    @property
    def record(self) -> torch.Tensor:
        n = len(self.peers)
        return self.words[n + 1 : n + 17]

    @property
    def poison_targets(self) -> torch.Tensor:
        n = len(self.peers)
        return self.words[n + 17 : n + 17 + 3 * n]

    def signatures(self, row: int) -> torch.Tensor:
        """Row `row` (0..n-1: peers, n: own) of the signature block."""
        n = len(self.peers)
        first = n + 17 + 3 * n + 4 * row
        return self.words[first : first + 4]

    def wait(self, phase: Phase = Phase.DISPATCH, rank: int = 0, timeout_ms: int = 0, signatures: bool = False) -> FlagWait:
        n = len(self.peers)
        return FlagWait(
            phase=phase, waiting_rank=rank, peer_ranks=self.peers,
            flag_addresses=tuple(self.address(i) for i in range(n)), value_address=self.address(n),
            record_address=self.address(n + 1), poison_addresses=tuple(self.address(n + 17 + i) for i in range(3 * n)),
            signature_addresses=tuple(self.address(n + 17 + 3 * n + 4 * i) for i in range(n)) if signatures else (),
            own_signature_address=self.address(n + 17 + 3 * n + 4 * n), signature_words=4, timeout_ms=timeout_ms,
        )  # fmt: skip


def test_waiting_stream_parks_until_every_peer_stored_the_flag_value():
    scheduler = CooperativeScheduler()
    waiter, peer = HostSignalStream(scheduler), HostSignalStream(scheduler)
    words = Words.make((1, 2))
    words.flags[1] = 5  # an older round's value is not this round's signal
    log = []
    waiter.wait(words.wait())
    waiter.submit(lambda: log.append("after wait"))
    assert log == []
    peer.submit(lambda: words.flags.__setitem__(0, EPOCH))
    assert log == []
    peer.submit(lambda: words.flags.__setitem__(1, EPOCH))
    assert log == ["after wait"]
    assert words.flags.tolist() == [EPOCH, EPOCH]  # epochs: nothing is reset
    assert int(words.record[0]) == 0 and not words.poison_targets.any()


def test_drain_reports_the_ranks_that_never_signalled_without_claiming_a_wait():
    scheduler = CooperativeScheduler()
    waiter, peer = HostSignalStream(scheduler), HostSignalStream(scheduler)
    words = Words.make((0, 1, 2))
    waiter.wait(words.wait(Phase.COMBINE, timeout_ms=300_000))
    peer.submit(lambda: words.flags.__setitem__(1, EPOCH))
    with pytest.raises(a2a.A2ATimeoutError, match=r"combine: rank 0 got no signal from rank\(s\) \[0, 2\] \(deadlock") as info:
        scheduler.drain()
    assert info.value.missing_ranks == (0, 2)
    assert "within" not in str(info.value)  # nothing waited 300 s: the simulated world deadlocked
    assert int(words.record[FaultRecord.KIND]) == FaultKind.TIMEOUT
    assert (words.poison_targets == FLAG_POISON).all(), "a rank that records a fault poisons its flags everywhere"


def test_blocking_wait_times_out_naming_the_missing_rank():
    words = Words.make((0, 1))
    words.flags[0] = EPOCH
    with pytest.raises(a2a.A2ATimeoutError, match=r"rank 3 got no signal within 0.2 s from rank\(s\) \[1\]"):
        HostSignalStream().wait(words.wait(rank=3, timeout_ms=200))
    assert int(words.record[FaultRecord.PHASE]) == Phase.DISPATCH


def test_a_poisoned_peer_ends_the_wait_at_once_and_spreads():
    words = Words.make((0, 1, 2))
    words.flags[0] = EPOCH
    words.flags[2] = FLAG_POISON
    with pytest.raises(A2APeerFailedError, match=r"rank\(s\) \[2\] failed earlier") as info:
        HostSignalStream().wait(words.wait(rank=0, timeout_ms=60_000))  # no 60 s wait: the poison decides
    assert info.value.failed_ranks == (2,)
    assert (words.poison_targets == FLAG_POISON).all()


def test_a_peer_with_another_signature_is_a_mismatch_naming_the_field():
    words = Words.make((0, 1))
    words.flags[:] = EPOCH
    for row in range(3):
        words.signatures(row)[:] = torch.tensor([16, 4, 7, 0])
    words.signatures(1)[0] = 24  # rank 1 says runtime_max_tokens_per_rank = 24
    with pytest.raises(A2AMismatchError, match=r"disagrees with rank\(s\) \[1\] on runtime_max_tokens_per_rank "
                                               r"\(e.g. runtime_max_tokens_per_rank: 16 here, 24 on rank 1\)"):
        HostSignalStream().wait(words.wait(rank=0, timeout_ms=1000, signatures=True))
    assert int(words.record[FaultRecord.KIND]) == FaultKind.MISMATCH


def test_a_rank_that_already_failed_passes_its_waits():
    words = Words.make((0, 1))
    words.record[FaultRecord.KIND] = FaultKind.TIMEOUT
    words.record[FaultRecord.PHASE] = Phase.DISPATCH
    HostSignalStream().wait(words.wait(rank=0, timeout_ms=60_000))  # returns at once; the call layer raises
    assert int(words.record[FaultRecord.PHASE]) == Phase.DISPATCH


@requires_interpreter  # on CUDA the same fault is the in-kernel timeout (tests/test_peer_faults.py)
def test_simulated_world_with_a_silent_rank_raises_instead_of_hanging():
    world = a2a.SimulatedWorld(2, "cpu")
    moe = a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 1, 2, hidden_size=4, world=world)
    experts = torch.zeros(1, 1, dtype=torch.int32)
    moe.dispatch(experts, [torch.ones(1, 4)], 1)  # rank 1 never dispatches
    with pytest.raises(a2a.A2ATimeoutError, match=r"dispatch.*: rank 0 got no signal from rank\(s\) \[1\]"):
        world.synchronize()
