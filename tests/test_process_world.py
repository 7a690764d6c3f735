"""ProcessWorld, bootstrap and symmetric-memory rules that need no second process."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from a2a.runtime.bootstrap import Bootstrap, SingleProcessBootstrap, TorchDistributedBootstrap, bootstrap_from
from a2a.runtime.process_world import ProcessWorld
from a2a.runtime.symmetric_memory import agreed_size, run_on_every_rank


class ScriptedPeers(Bootstrap):
    """Rank 0 of a 2-rank world whose peer's contributions are scripted, one per collective."""

    def __init__(self, *peer_contributions: bytes):
        self.rank, self.world_size = 0, 2
        self._peer = list(peer_contributions)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [data, self._peer.pop(0)]


def test_bootstrap_from_accepts_a_bootstrap_and_rejects_other_things():
    bootstrap = SingleProcessBootstrap()
    assert bootstrap_from(bootstrap) is bootstrap
    assert bootstrap.allgather_int(-7) == [-7] and bootstrap.allgather_bytes(b"x") == [b"x"]
    bootstrap.barrier()
    with pytest.raises(TypeError, match="bootstrap must be an a2a Bootstrap"):
        bootstrap_from("tcp://localhost:1234")
    with pytest.raises(TypeError, match="value must be an int"):
        bootstrap.allgather_int(True)
    with pytest.raises(TypeError, match="data must be bytes"):
        bootstrap.allgather_bytes("text")


def test_torch_bootstrap_needs_an_initialised_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistributedBootstrap()


def test_sizes_must_agree_across_ranks():
    assert agreed_size(ScriptedPeers(b"4096"), 4096) == 4096
    with pytest.raises(ValueError, match=r"size_per_rank must be the same on every rank, got \[4096, 8192\]"):
        agreed_size(ScriptedPeers(b"8192"), 4096)
    with pytest.raises(ValueError, match="size_per_rank must be a positive int, got 0"):
        agreed_size(SingleProcessBootstrap(), 0)


def test_a_peer_failure_undoes_local_steps_and_names_the_peer():
    undone = []
    with ExitStack() as undo:
        undo.callback(undone.append, "unmapped")
        with pytest.raises(RuntimeError, match=r"import \+ map failed on rank\(s\) \[1\]: rank 1: CudaDriverError"):
            run_on_every_rank(ScriptedPeers(b"CudaDriverError('cuMemMap failed')"), "import + map", lambda: 1, undo)
        assert undone == ["unmapped"]


def test_a_local_failure_is_raised_as_itself_after_telling_the_peers():
    told = []

    class Recording(ScriptedPeers):
        def allgather_bytes(self, data: bytes) -> list[bytes]:
            told.append(data)
            return super().allgather_bytes(data)

    with ExitStack() as undo, pytest.raises(KeyError, match="boom"):
        run_on_every_rank(Recording(b""), "step", lambda: {}["boom"], undo)
    assert told == [b"KeyError('boom')"]


def test_process_world_rules():
    world = ProcessWorld(SingleProcessBootstrap(), "cpu")
    assert (world.rank, world.ep_size, world.device.type) == (0, 1, "cpu")
    with pytest.raises(ValueError, match="rank must be this process's rank 0"):
        world.stream(1)
    with pytest.raises(TypeError, match="key must be a tuple"):
        world.workspace("moe", 64)
    first = world.workspace(("moe",), 64)
    assert world.workspace(("moe",), 64) is first  # cached per key and size
    first.fill_(5)
    del first
    grown = world.workspace(("moe",), 128)  # a new size: a fresh, zeroed workspace
    assert grown.shape == (1, 128) and not grown.any()
    del grown
    world.close()
    world.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        world.workspace(("moe",), 64)
    with pytest.raises(ValueError, match="device must be cuda, cuda:N or cpu"):
        ProcessWorld(SingleProcessBootstrap(), "meta")
