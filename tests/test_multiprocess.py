"""One process per rank on the CPU: ProcessWorld + MoeAlltoAll rounds, fd exchange, shm hygiene.

Every multi-rank test starts real processes (spawn) joined by a gloo group; kernels run under the
Triton interpreter in the children (TRITON_INTERPRET=1 there), so these tests run on any machine.
One rank's failure fails the test at once (tests/support/process_launcher.py).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from a2a.runtime.bootstrap import Bootstrap
from a2a.runtime.fd_exchange import FdListener, agree_job_id, exchange_fds, send_fd, socket_name
from tests.conftest import requires_interpreter_in_children
from tests.support.process_launcher import RankFailure, run_mpi_round, run_ranks
from tests.support.process_rounds import PLANS, moe_rounds_rank

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
    # a2a's own shared-memory files only (/dev/shm/a2a-<uid>-<hex>, unlinked, so "(deleted)"): a
    # checkout or virtualenv whose path holds "/a2a-" maps files too.
    own = re.compile(rf"/dev/shm/a2a-{os.getuid()}-[0-9a-f]+\b")
    leaked_maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if own.search(line)]
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


class _RecordingBootstrap(Bootstrap):
    """Delegates to `inner` and records every collective called, in order."""

    def __init__(self, inner: Bootstrap) -> None:
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.calls: list[str] = []

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        self.calls.append("allgather_bytes")
        return self.inner.allgather_bytes(data)

    def barrier(self) -> None:
        self.calls.append("barrier")
        self.inner.barrier()


class _Squatter:
    """A local process (this one) holding `name` before the ranks bind it; counts what arrives."""

    def __init__(self, name: bytes) -> None:
        self.connections = 0
        self.fds_received = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(name)
        self._sock.listen(8)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.connections += 1
                conn.settimeout(5)
                try:
                    while True:
                        message, fds, _, _ = socket.recv_fds(conn, 256, 4)
                        for fd in fds:
                            os.close(fd)
                        self.fds_received += len(fds)
                        if not message and not fds:
                            break
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()


def _exchange_with_a_fault(rank: int, world_size: int, job_id: str, timeout_s: float, misled_rank: int) -> dict:
    """exchange_fds as SymmetricMemory runs it; `misled_rank` expects its own pid to listen for rank 1."""
    from contextlib import ExitStack
    from unittest import mock

    from a2a.runtime import fd_exchange
    from a2a.runtime.bootstrap import bootstrap_from
    from a2a.runtime.symmetric_memory import run_on_every_rank

    bootstrap = _RecordingBootstrap(bootstrap_from(None))
    fds_before = _open_fds()
    fd = os.memfd_create(f"a2a-test-rank{rank}")
    error = None
    start = time.monotonic()
    real_send_fd = fd_exchange.send_fd

    def misled_send_fd(job: str, peer: int, me: int, own_fd: int, deadline: float, *, peer_pid: int) -> None:
        real_send_fd(job, peer, me, own_fd, deadline, peer_pid=os.getpid() if peer == 1 else peer_pid)

    with ExitStack() as patches:
        # The job id is random and agreed inside exchange_fds; fix it so a squatter can know the names.
        patches.enter_context(mock.patch.object(fd_exchange, "agree_job_id", lambda _: job_id))
        if rank == misled_rank:
            patches.enter_context(mock.patch.object(fd_exchange, "send_fd", misled_send_fd))
        try:
            # As SymmetricMemory calls it: its error report is itself a collective after the step.
            fds = run_on_every_rank(
                bootstrap, "fd exchange", lambda: exchange_fds(bootstrap, fd, timeout_s=timeout_s), ExitStack()
            )
        except Exception as exc:  # noqa: BLE001 - every rank must fail; the test checks the messages
            error = f"{type(exc).__name__}: {exc}"
        else:
            for peer_fd in fds:
                if peer_fd != fd:
                    os.close(peer_fd)
    seconds = time.monotonic() - start
    os.close(fd)
    return {"error": error, "seconds": seconds, "calls": bootstrap.calls, "left_open": sorted(_open_fds() - fds_before)}


def _check_every_rank_failed(results: list[dict], timeout_s: float, *expected: str) -> None:
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not fail"
        for text in expected:
            assert text in result["error"], (rank, text, result["error"])
        assert result["seconds"] < timeout_s / 2, f"rank {rank} waited out the deadline: {result}"
        assert result["left_open"] == [], f"rank {rank} left fds open: {result}"
    assert all(result["calls"] == results[0]["calls"] for result in results), [r["calls"] for r in results]


def test_a_squatted_socket_name_fails_every_rank_and_gets_no_fd(tmp_path):
    job_id, timeout_s = secrets.token_hex(8), 30.0
    squatter = _Squatter(socket_name(job_id, 1))  # before rank 1 binds: its bind fails
    try:
        results = run_ranks(_exchange_with_a_fault, 3, tmp_path, job_id, timeout_s, None, timeout_s=90, env=CHILD_ENV)
    finally:
        squatter.close()
    assert (squatter.connections, squatter.fds_received) == (0, 0), "a rank sent to the squatter"
    _check_every_rank_failed(results, timeout_s, "could not listen", "rank(s) [1]", "Address already in use")


def test_a_refused_send_fails_every_rank_at_once(tmp_path):
    timeout_s = 30.0
    results = run_ranks(
        _exchange_with_a_fault, 3, tmp_path, secrets.token_hex(8), timeout_s, 0, timeout_s=90, env=CHILD_ENV
    )
    _check_every_rank_failed(
        results, timeout_s, "rank(s) [0] could not send", "rank 0 refused to send its fd to rank 1", "found pid"
    )


def test_send_fd_refuses_a_listener_with_another_pid():
    from a2a.runtime.bootstrap import SingleProcessBootstrap

    job_id = agree_job_id(SingleProcessBootstrap())
    expected = os.getppid()  # a live process, but not the one that listens on rank 1's name
    fd = os.memfd_create("secret")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as impostor:
        impostor.bind(socket_name(job_id, 1))
        impostor.listen(1)
        try:
            refused = rf"rank 0 refused to send its fd to rank 1 .*pid {expected}, .* found pid {os.getpid()}, "
            with pytest.raises(RuntimeError, match=refused):
                send_fd(job_id, 1, 0, fd, time.monotonic() + 10, peer_pid=expected)
        finally:
            os.close(fd)
        impostor.settimeout(5)
        conn, _ = impostor.accept()  # the sender connected to read the credentials, then hung up
        with conn:
            conn.settimeout(5)
            message, fds, _, _ = socket.recv_fds(conn, 256, 4)
        assert (message, fds) == (b"", []), "the fd was sent to the impostor"


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
            send_fd(job_id, 0, 1, own, time.monotonic() + 10, peer_pid=os.getpid())
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
            send_fd("no-such-job", 5, 0, fd, time.monotonic() + 1, peer_pid=os.getpid())
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
