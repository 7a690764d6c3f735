"""The host side of the flag protocol (CPU): waits for epoch values, parking, deadlock and timeout reports.

Here the test plays the peers' kernels: it stores flag values into the waiter's words directly.
"""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a.runtime.host_signals import CooperativeScheduler, HostSignalStream
from a2a.runtime.streams import FlagWait
from tests.conftest import requires_interpreter


def flags(count: int) -> tuple[torch.Tensor, list[int], int]:
    """`count` flag words and one flag-value word after them (value 7: this round's epoch)."""
    words = torch.zeros(count + 1, dtype=torch.int32)
    words[count] = 7
    return words, [words.data_ptr() + 4 * i for i in range(count)], words.data_ptr() + 4 * count


def test_waiting_stream_parks_until_every_peer_stored_the_flag_value():
    scheduler = CooperativeScheduler()
    waiter, peer = HostSignalStream(scheduler), HostSignalStream(scheduler)
    words, addresses, value = flags(2)
    words[1] = 5  # an older round's value is not this round's signal
    log = []
    waiter.wait_for_value(addresses, value, FlagWait("dispatch", 0, (1, 2)))
    waiter.submit(lambda: log.append("after wait"))
    assert log == []
    peer.submit(lambda: words.__setitem__(0, 7))
    assert log == []
    peer.submit(lambda: words.__setitem__(1, 7))
    assert log == ["after wait"]
    assert words.tolist() == [7, 7, 7]  # epochs: nothing is reset


def test_drain_reports_the_ranks_that_never_signalled():
    scheduler = CooperativeScheduler()
    waiter, peer = HostSignalStream(scheduler), HostSignalStream(scheduler)
    words, addresses, value = flags(3)
    waiter.wait_for_value(addresses, value, FlagWait("combine", 0, (0, 1, 2)))
    peer.submit(lambda: words.__setitem__(1, 7))
    with pytest.raises(a2a.A2ATimeoutError, match=r"combine: rank 0 got no signal from rank\(s\) \[0, 2\]") as info:
        scheduler.drain()
    assert info.value.missing_ranks == (0, 2)


def test_blocking_wait_times_out_naming_the_missing_rank(monkeypatch):
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", "0.2")
    words, addresses, value = flags(2)
    words[0] = 7
    with pytest.raises(a2a.A2ATimeoutError, match=r"rank 3 got no signal within 0.2 s from rank\(s\) \[1\]"):
        HostSignalStream().wait_for_value(addresses, value, FlagWait("dispatch", 3, (0, 1)))


@requires_interpreter  # on CUDA the same fault is issue 5's watchdog
def test_simulated_world_with_a_silent_rank_raises_instead_of_hanging():
    world = a2a.SimulatedWorld(2, "cpu")
    moe = a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 1, 2, hidden_size=4, world=world)
    experts = torch.zeros(1, 1, dtype=torch.int32)
    moe.dispatch(experts, [torch.ones(1, 4)], 1)  # rank 1 never dispatches
    with pytest.raises(a2a.A2ATimeoutError, match=r"dispatch: rank 0 got no signal from rank\(s\) \[1\]"):
        world.synchronize()
