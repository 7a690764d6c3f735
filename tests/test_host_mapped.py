"""Host-mapped fault words (a2a.runtime.host_mapped): a block whose owner is gone is freed only
where the device is idle, never by a finalizer that a garbage collection runs mid-round."""

from __future__ import annotations

import contextlib
import ctypes
import gc

import torch

import a2a
from a2a import reference
from a2a.runtime import host_mapped
from a2a.runtime.protocol import FAULT_RECORD_WORDS
from tests.conftest import requires_cuda
from tests.support.process_rounds import HIDDEN, MAX_NUM_TOKENS, NUM_EXPERTS, TOP_K, RoundInputs


class FakeDriver:
    """cuMemHostAlloc on ordinary memory, and a record of every cuMemFreeHost."""

    CU_MEMHOSTALLOC_DEVICEMAP = 1
    CU_MEMHOSTALLOC_PORTABLE = 2

    def __init__(self):
        self.buffers, self.freed = [], []

    def cuMemHostAlloc(self, size, flags):
        buffer = (ctypes.c_char * size)(*([7] * size))  # not zero: the constructor must clear it
        self.buffers.append(buffer)
        return (0, ctypes.addressof(buffer))

    def cuMemHostGetDevicePointer(self, host_address, flags):
        return (0, host_address)

    def cuMemFreeHost(self, host_address):
        self.freed.append(host_address)
        return (0,)


def test_a_dropped_block_is_freed_only_when_asked(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(host_mapped, "driver", lambda: fake)
    monkeypatch.setattr(host_mapped, "check", lambda call, result: result[1])
    monkeypatch.setattr(host_mapped, "_released", [])  # blocks other tests dropped stay out of this one
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    words = host_mapped.HostMappedWords(FAULT_RECORD_WORDS, torch.device("cuda", 0))
    address = ctypes.addressof(words.words)
    assert words.read() == [0] * FAULT_RECORD_WORDS
    del words
    gc.collect()
    assert fake.freed == [], "a finalizer freed the block: cuMemFreeHost waits for the device, mid-round too"
    assert host_mapped.free_released() == 1 and fake.freed == [address]
    assert host_mapped.free_released() == 0 and fake.freed == [address]


@requires_cuda
def test_a_collected_block_does_not_stall_a_round_in_flight(monkeypatch):
    """Rank 0 has dispatched (its kernel waits for rank 1) when a garbage collection drops a block
    between the two ranks' calls. A free there waited for the device, so rank 1 never launched and
    rank 0's wait timed out (an H200 run of the safety tests, 300 s); the round must end correct."""
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", "10")
    world = a2a.SimulatedWorld(2, "cuda")
    moes = [a2a.MoeAlltoAll(a2a.Mapping(2, r), MAX_NUM_TOKENS, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN, world=world)
            for r in range(2)]  # fmt: skip
    inputs = RoundInputs.draw([3, 2], 4, seed=11)
    expert_outputs = [torch.full((2, 4, HIDDEN), 0.5 + r, dtype=torch.bfloat16) for r in range(2)]

    def one_round(between) -> list[torch.Tensor]:
        moes[0].dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), 4)
        between()
        moes[1].dispatch(inputs.experts[1].to(world.device), inputs.payloads(1, world.device), 4)
        outputs = [moe.combine(expert_outputs[r].to(world.device), 4) for r, moe in enumerate(moes)]
        world.synchronize()
        for moe in moes:
            moe.synchronize()
        return [output.cpu() for output in outputs]

    expected = reference.combine(expert_outputs, inputs.expected.routing, inputs.counts)
    outputs = one_round(lambda: None)  # every kernel variant compiled and loaded first
    assert all(torch.equal(got, want) for got, want in zip(outputs, expected))
    doomed = [host_mapped.HostMappedWords(FAULT_RECORD_WORDS, torch.device("cuda"))]

    def drop_a_block() -> None:
        doomed.clear()
        gc.collect()

    outputs = one_round(drop_a_block)
    assert all(torch.equal(got, want) for got, want in zip(outputs, expected))
    torch.cuda.synchronize()
    assert host_mapped.free_released() >= 1
