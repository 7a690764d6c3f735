"""The host implementation of the flag protocol: order, parking, deadlock and timeout reports."""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a.runtime.host_signals import CooperativeScheduler, HostSignalStream
from a2a.runtime.streams import FLAG_CLEAR, FLAG_SET, FlagWait
from tests.conftest import requires_interpreter


def flags(count: int) -> tuple[torch.Tensor, list[int]]:
    words = torch.zeros(count, dtype=torch.int32)
    return words, [words.data_ptr() + 4 * i for i in range(count)]


def test_waiting_stream_parks_until_every_peer_signals_then_clears():
    scheduler = CooperativeScheduler()
    waiter, peer_a, peer_b = (HostSignalStream(scheduler) for _ in range(3))
    words, addresses = flags(2)
    log = []
    waiter.wait_flags(addresses, FlagWait("dispatch", 0, (1, 2)))
    waiter.submit(lambda: log.append("after wait"))
    assert log == []
    peer_a.set_flags(addresses[:1])
    assert log == [] and words.tolist() == [FLAG_SET, FLAG_CLEAR]
    peer_b.set_flags(addresses[1:])
    assert log == ["after wait"]
    assert words.tolist() == [FLAG_CLEAR, FLAG_CLEAR]  # the waiter reset its flags


def test_drain_reports_the_ranks_that_never_signalled():
    scheduler = CooperativeScheduler()
    waiter, peer = HostSignalStream(scheduler), HostSignalStream(scheduler)
    _, addresses = flags(3)
    waiter.wait_flags(addresses, FlagWait("combine", 0, (0, 1, 2)))
    peer.set_flags(addresses[1:2])
    with pytest.raises(a2a.A2ATimeoutError, match=r"combine: rank 0 got no signal from rank\(s\) \[0, 2\]") as info:
        scheduler.drain()
    assert info.value.missing_ranks == (0, 2)


def test_blocking_wait_times_out_naming_the_missing_rank(monkeypatch):
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", "0.2")
    words, addresses = flags(2)
    words[0] = FLAG_SET
    with pytest.raises(a2a.A2ATimeoutError, match=r"rank 3 got no signal within 0.2 s from rank\(s\) \[1\]"):
        HostSignalStream().wait_flags(addresses, FlagWait("dispatch", 3, (0, 1)))


@requires_interpreter  # on CUDA the same fault is issue 5's watchdog
def test_simulated_world_with_a_silent_rank_raises_instead_of_hanging():
    world = a2a.SimulatedWorld(2, "cpu")
    moe = a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 1, 2, hidden_size=4, world=world)
    experts = torch.zeros(1, 1, dtype=torch.int32)
    moe.dispatch(experts, [torch.ones(1, 4)], 1)  # rank 1 never dispatches
    with pytest.raises(a2a.A2ATimeoutError, match=r"dispatch: rank 0 got no signal from rank\(s\) \[1\]"):
        world.synchronize()
