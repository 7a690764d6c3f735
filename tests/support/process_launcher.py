"""Run a function as N ranks in N fresh processes (torch.multiprocessing spawn + gloo), fail fast.

`run_ranks(target, world_size, store_dir)` starts one process per rank; each joins a gloo
process group through a FileStore under `store_dir` (no TCP port to race for), calls
`target(rank, world_size, *args)` and sends back its return value (serialised with torch.save, so
tensors come back as copies) or its traceback. The first failing rank fails the whole run
at once: the others are killed, never left waiting in a collective for a peer that died. A rank
that neither reports nor exits within `timeout_s` fails the run too, naming the missing ranks.
"""

from __future__ import annotations

import io
import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


class RankFailure(AssertionError):
    """A rank raised, crashed or timed out; the message carries its traceback or exit code."""


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(
    target: Callable[..., Any], rank: int, world_size: int, store_path: str, args: tuple, results: Any, timeout_s: float
) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        results.put((rank, True, _dumps(target(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    target: Callable[..., Any],
    world_size: int,
    store_dir: Path,
    *args: Any,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """`[target(rank, world_size, *args) for rank in range(world_size)]`, each in its own process.

    `target` must be importable by module and name (spawn); `env` is added to the children's
    environment (set before they import anything, so CUDA and Triton variables take effect).
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    store_path = Path(store_dir) / f"store-{os.getpid()}-{time.monotonic_ns()}"
    processes = [
        context.Process(target=_rank_main, args=(target, rank, world_size, str(store_path), args, results, timeout_s))
        for rank in range(world_size)
    ]
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        for process in processes:
            process.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    reports: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.1)
            except queue.Empty:
                _check_progress(processes, reports, deadline, timeout_s, results)
                continue
            if not ok:
                raise RankFailure(f"rank {rank} of {world_size} failed:\n{payload}")
            reports[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        _stop(processes, graceful=len(reports) == world_size)
    return [reports[rank] for rank in range(world_size)]


def _check_progress(processes: list, reports: dict, deadline: float, timeout_s: float, results: Any) -> None:
    dead = [rank for rank, p in enumerate(processes) if p.exitcode is not None and rank not in reports]
    if dead:
        time.sleep(0.5)  # a report may still be on its way through the pipe
        if not results.empty():
            return
        codes = {rank: processes[rank].exitcode for rank in dead}
        raise RankFailure(f"rank(s) {dead} exited without reporting (exit codes {codes})")
    if time.monotonic() > deadline:
        missing = [rank for rank in range(len(processes)) if rank not in reports]
        raise RankFailure(f"rank(s) {missing} did not finish within {timeout_s:g} s")


def _stop(processes: list, graceful: bool) -> None:
    for process in processes:
        process.join(timeout=30 if graceful else 0.1)
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def mpi_launch_command(num_ranks: int) -> list[str] | None:
    """`mpiexec -n N` (the one beside this Python first, else on PATH), with Open MPI's root flag
    when running as root; None when no launcher exists."""
    import shutil
    import subprocess
    import sys

    beside_python = Path(sys.executable).parent / "mpiexec"
    launcher = str(beside_python) if beside_python.exists() else shutil.which("mpiexec") or shutil.which("mpirun")
    if launcher is None:
        return None
    command = [launcher, "-n", str(num_ranks)]
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True, check=False).stdout
    if ("Open MPI" in version or "OpenRTE" in version) and os.geteuid() == 0:
        command.append("--allow-run-as-root")
    return command


def run_mpi_round(device: str, env: dict[str, str], timeout_s: float) -> None:
    """`tests/support/mpi_round.py <device>` as 2 MPI ranks; both must report ok (skips without a launcher)."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("mpi4py")
    launch = mpi_launch_command(2)
    if launch is None:
        pytest.skip("no mpiexec / mpirun on PATH")
    root = Path(__file__).resolve().parents[2]
    command = [*launch, sys.executable, str(root / "tests" / "support" / "mpi_round.py"), device]
    environment = {**os.environ, **env, "PYTHONPATH": str(root)}
    done = subprocess.run(command, check=False, env=environment, capture_output=True, text=True, timeout=timeout_s, cwd=root)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    # Two processes share one stdout: count each rank's report rather than relying on whole lines.
    assert [done.stdout.count(f"mpi_round rank {rank} of 2: ok") for rank in range(2)] == [1, 1], done.stdout
