"""One process per rank on the CPU: ProcessWorld + MoeAlltoAll rounds, fd exchange, shm hygiene.

Every multi-rank test starts real processes (spawn) joined by a gloo group; kernels run under the
Triton interpreter in the children (TRITON_INTERPRET=1 there), so these tests run on any machine.
One rank's failure fails the test at once (tests/process_launcher.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from a2a.runtime.fd_exchange import FdListener, agree_job_id, exchange_fds, send_fd
from tests.conftest import requires_interpreter_in_children
from tests.process_launcher import RankFailure, run_mpi_round, run_ranks
from tests.process_rounds import PLANS, moe_rounds_rank

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = {"TRITON_INTERPRET": "1", "A2A_SIGNAL_TIMEOUT_S": "60"}


@pytest.fixture(params=[2, 4], ids=lambda n: f"{n}ranks")
def world_size(request) -> int:
    return request.param


@requires_interpreter_in_children
def test_moe_rounds_across_processes(world_size, tmp_path):
    results = run_ranks(moe_rounds_rank, world_size, tmp_path, "cpu", env=CHILD_ENV)
    assert [len(per_rank) for per_rank in results] == [len(PLANS[world_size])] * world_size


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    from a2a.runtime.bootstrap import bootstrap_from

    if rank == 1:
        raise ValueError("rank 1 gives up")
    bootstrap_from(None).barrier()  # would wait forever for rank 1


def test_one_rank_failure_fails_the_run_quickly(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 of 2 failed(.|\n)*rank 1 gives up"):
        run_ranks(_fail_on_rank_one, 2, tmp_path, timeout_s=60, env=CHILD_ENV)
    assert time.monotonic() - start < 30


@requires_interpreter_in_children
def test_moe_rounds_through_mpi():
    run_mpi_round("cpu", CHILD_ENV, timeout_s=180)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"a2a-{os.getuid()}-")}


def _workspace_cycles(rank: int, world_size: int, num_cycles: int) -> dict[str, int]:
    import torch
    import torch.distributed as dist

    from a2a.runtime.bootstrap import TorchDistributedBootstrap
    from a2a.runtime.process_world import ProcessWorld

    world = ProcessWorld(dist.group.WORLD, "cpu")  # a ProcessGroup works as well as a Bootstrap
    assert isinstance(world.bootstrap, TorchDistributedBootstrap)
    world.barrier()
    fds_before, shm_before = _open_fds(), _shm_files()
    for cycle in range(num_cycles):
        size = 4096 + 40 * cycle  # a new size every cycle: no reuse hides a leak
        workspace = world.workspace(("hygiene", cycle), size)
        assert workspace.shape == (world_size, size) and not workspace.any(), "not zero-initialised"
        world.barrier()  # every rank saw zeros before anyone writes
        workspace[rank, -4:] = torch.tensor([rank + 1, cycle % 256, 7, 9], dtype=torch.uint8)
        world.barrier()
        for peer in range(world_size):  # every segment is shared: peers' writes are visible
            assert workspace[peer, -4:].tolist() == [peer + 1, cycle % 256, 7, 9], (cycle, peer)
        del workspace
        world.release_workspace(("hygiene", cycle))
    for size in (100, 5000, 9000):  # one key, growing: each size is a fresh, zeroed workspace
        workspace = world.workspace(("grow",), size)
        assert workspace.shape == (world_size, size) and not workspace.any()
        world.barrier()
        workspace[rank].fill_(1)
        world.synchronize()
        world.barrier()
        del workspace
    world.close()
    leaked_maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if "/a2a-" in line]
    return {
        "new_fds": len(_open_fds() - fds_before),
        "new_shm_files": len(_shm_files() - shm_before),
        "leaked_maps": len(leaked_maps),
    }


def test_shared_memory_workspace_cycles_leave_nothing_behind(tmp_path):
    results = run_ranks(_workspace_cycles, 2, tmp_path, 100, env=CHILD_ENV)
    assert results == [{"new_fds": 0, "new_shm_files": 0, "leaked_maps": 0}] * 2


def test_shared_memory_single_process_cycles():
    from a2a.runtime.bootstrap import SingleProcessBootstrap
    from a2a.runtime.host_shared_memory import HostSharedMemory

    fds_before, shm_before = _open_fds(), _shm_files()
    for cycle in range(100):
        with HostSharedMemory(SingleProcessBootstrap(), 1000 + cycle) as memory:
            assert memory.tensor.shape == (1, 1000 + cycle) and memory.stride % 4096 == 0
            memory.tensor[0].fill_(3)
    assert _open_fds() == fds_before and _shm_files() == shm_before


def _exchange_memfds(rank: int, world_size: int) -> list[str]:
    from a2a.runtime.bootstrap import bootstrap_from

    fds_before = _open_fds()
    fd = os.memfd_create(f"a2a-test-rank{rank}")
    os.write(fd, f"rank {rank} of {world_size}".encode())
    fds = exchange_fds(bootstrap_from(None), fd, timeout_s=30)
    assert fds[rank] == fd and len(set(fds)) == world_size
    contents = [os.pread(peer_fd, 64, 0).decode() for peer_fd in fds]
    for peer_fd in fds:
        os.close(peer_fd)
    assert _open_fds() == fds_before, "exchange_fds left a socket or fd open"
    return contents


def test_fd_exchange_between_three_processes(tmp_path):
    results = run_ranks(_exchange_memfds, 3, tmp_path, env=CHILD_ENV)
    assert results == [[f"rank {r} of 3" for r in range(3)]] * 3


INTRUDER = """
import os, socket, sys
job = sys.argv[1]
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.connect(("\\0a2a-fds-%s-0" % job).encode())
    fd = os.memfd_create("intruder")
    os.write(fd, b"intruder")
    socket.send_fds(sock, [("%s:1" % job).encode()], [fd])
"""


def test_fd_listener_refuses_a_foreign_pid():
    from a2a.runtime.bootstrap import SingleProcessBootstrap

    job_id = agree_job_id(SingleProcessBootstrap())
    # Rank 1 is played by this process (a thread would do as well): only its pid is admitted.
    with FdListener(job_id, 0, [os.getpid(), os.getpid()]) as listener:
        subprocess.run([sys.executable, "-c", INTRUDER, job_id], check=True, timeout=30)  # queued first
        own = os.memfd_create("rank1")
        os.write(own, b"rank 1")
        try:
            send_fd(job_id, 0, 1, own, time.monotonic() + 10)
            sender, received = listener.accept_fd(time.monotonic() + 10)
        finally:
            os.close(own)
        assert sender == 1 and os.pread(received, 16, 0) == b"rank 1"
        os.close(received)
        assert len(listener.refused) == 1 and "not a rank of job" in listener.refused[0], listener.refused
        with pytest.raises(TimeoutError):
            listener.accept_fd(time.monotonic() + 0.2)


def test_fd_exchange_rejects_bad_arguments():
    from a2a.runtime.bootstrap import SingleProcessBootstrap

    with pytest.raises(ValueError, match="fd must be a non-negative int"):
        exchange_fds(SingleProcessBootstrap(), -1)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        exchange_fds(SingleProcessBootstrap(), 0, timeout_s=0)
    assert exchange_fds(SingleProcessBootstrap(), 0) == [0]


def test_send_fd_to_a_missing_peer_names_it():
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(RuntimeError, match="could not send its fd to rank 5"):
            send_fd("no-such-job", 5, 0, fd, time.monotonic() + 1)
    finally:
        os.close(fd)


def _group_as_world(rank: int, world_size: int) -> list[float]:
    import torch
    import torch.distributed as dist

    import a2a

    moe = a2a.MoeAlltoAll(a2a.Mapping(world_size, rank), 2, 1, world_size, hidden_size=4, world=dist.group.WORLD)
    assert isinstance(moe.world, a2a.ProcessWorld) and moe.world.rank == rank
    second_layer = a2a.MoeAlltoAll(a2a.Mapping(world_size, rank), 2, 1, world_size, hidden_size=4, world=dist.group.WORLD)
    assert second_layer.world is moe.world and second_layer.workspace.data_ptr() == moe.workspace.data_ptr()
    # Every rank sends one token to expert 0, owned by rank 0; its row carries the sender's rank.
    recv = moe.dispatch(torch.zeros(1, 1, dtype=torch.int32), [torch.full((1, 4), float(rank))], 1)[0]
    received = recv[:, 0, 0].tolist() if rank == 0 else []
    moe.combine(torch.zeros(world_size, 1, 4), 1)
    moe.world.close()
    return received


@requires_interpreter_in_children
def test_moe_alltoall_takes_a_process_group_as_its_world(tmp_path):
    results = run_ranks(_group_as_world, 2, tmp_path, env=CHILD_ENV)
    assert results[0] == [0.0, 1.0] and results[1] == []
