"""A simulated world: N ranks in ONE process, sharing one workspace tensor, one stream per rank.

On CUDA each rank gets its own driver stream, so N ranks run concurrently on one GPU as N processes
would; a phase's wait is one spinning program per rank, so the data kernels never wait and any
number of ranks up to the hardware queues fits. On the CPU each rank gets a cooperative host
stream: kernels run under the Triton interpreter and a rank whose wait cannot complete yet is
parked until a peer's signal arrives.

Two ways to drive it:
- phase by phase from one thread (every rank's dispatch, then every rank's work on its stream,
  then every rank's combine), as the tests and benchmarks do;
- `run_ranks(fn)`: `fn(rank)` is one rank's whole program, written as a one-process-per-rank
  engine writes it (results read right after each call). On CUDA the ranks' calls are enqueued
  one rank after the other; on the CPU each rank runs in its own thread with blocking waits.

A world of one rank uses the caller's current stream (as FlashInfer's single-GPU path does):
results are ordered before whatever the caller enqueues next.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from a2a import envs
from a2a.runtime.alignment import SEGMENT_ALIGN, align_up
from a2a.runtime.driver import check, driver
from a2a.runtime.host_mapped import free_released
from a2a.runtime.streams import SignalStream

# CUDA_DEVICE_MAX_CONNECTIONS is at most 32; one queue is left to the caller's stream.
MAX_SIMULATED_CUDA_RANKS = 31


class SimulatedWorld:
    """`ep_size` ranks in this process on `device` ("cuda", "cuda:N" or "cpu").

    Test knobs for adversarial schedules: `stream_priorities` (CUDA: one driver stream priority per
    rank, lower is more urgent) and `schedule_seed` (CPU: the cooperative scheduler runs ranks in a
    seeded random order and leaves work queued at random, so a rank's next round can run before a
    peer finished its last one).
    """

    def __init__(self, ep_size: int, device: str | torch.device = "cuda", *,
                 stream_priorities: Sequence[int] | None = None, schedule_seed: int | None = None):  # fmt: skip
        if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ep_size must be an int >= 1, got {ep_size!r}")
        self.ep_size = ep_size
        self.device = torch.device(device)
        self._workspaces: dict[tuple, torch.Tensor] = {}
        self.checkpointed = False  # between checkpoint_prepare and checkpoint_restore
        self._streams: list[SignalStream] = []
        self._thread_streams: list[SignalStream] | None = None
        self._launch_barrier: threading.Barrier | None = None
        if stream_priorities is not None and len(stream_priorities) != ep_size:
            raise ValueError(f"stream_priorities needs one priority per rank ({ep_size}), got {len(stream_priorities)}")
        if self.device.type == "cuda":
            if ep_size > MAX_SIMULATED_CUDA_RANKS:
                raise ValueError(
                    f"a simulated world on one GPU holds at most {MAX_SIMULATED_CUDA_RANKS} ranks, got {ep_size}: "
                    f"CUDA has {MAX_SIMULATED_CUDA_RANKS + 1} hardware queues per device, and two ranks sharing one "
                    "deadlock (a spinning wait holds back the peer's signal queued behind it). Use one process "
                    "per rank, or the CPU simulation, for more."
                )
            _prepare_cuda_for_simulation(ep_size)
            from a2a.runtime.cuda_signals import CudaSignalStream, new_cuda_stream

            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            if ep_size > 1:
                # Fresh driver streams: torch.cuda.Stream() recycles a pool of 32, which would put two
                # ranks on one stream.
                priorities = stream_priorities or [0] * ep_size
                self._streams = [CudaSignalStream(new_cuda_stream(self.device, p)) for p in priorities]
        elif self.device.type == "cpu":
            from a2a.runtime.host_signals import CooperativeScheduler, HostSignalStream

            scheduler = CooperativeScheduler(schedule_seed)
            self._streams = [HostSignalStream(scheduler) for _ in range(ep_size)]
        else:
            raise ValueError(f"device must be cuda or cpu, got {self.device}")

    @property
    def switches_streams(self) -> bool:
        """Whether ops of a rank switch to its own stream, ordered after the caller's work (see
        MoeAlltoAll); a one-rank world on CUDA runs on the caller's current stream instead."""
        return bool(self._streams)

    def stream(self, rank: int) -> SignalStream:
        """Rank `rank`'s stream; activate it (`with world.stream(r).activate():`) to run ops as that rank."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {rank}")
        if not self._streams:
            from a2a.runtime.cuda_signals import CudaSignalStream

            return CudaSignalStream.wrap(torch.cuda.current_stream(self.device))
        if self._thread_streams is not None:  # inside run_ranks on the CPU: the ranks' blocking streams
            return self._thread_streams[rank]
        return self._streams[rank]

    def workspace(self, key: tuple, size_per_rank: int) -> torch.Tensor:
        """The zero-initialised `[ep_size, size_per_rank]` uint8 workspace for `key`, made once.
        Its segments start on SEGMENT_ALIGN boundaries in memory, as the process worlds' allocators
        place them (row stride = align_up(size_per_rank, SEGMENT_ALIGN))."""
        workspace = self._workspaces.get(key)
        if workspace is None or workspace.shape[1] != size_per_rank:
            self.synchronize()
            workspace = _aligned_segments(self.ep_size, size_per_rank, self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                free_released()  # the device is idle: no peer spins while the frees wait for it
            self._workspaces[key] = workspace
        return workspace

    def release_workspace(self, key: tuple) -> None:
        """Drop the workspace of `key` once every rank's stream has finished with it (drop its views too)."""
        self.synchronize()
        self._workspaces.pop(key, None)

    def wait_for_caller(self, rank: int) -> None:
        """Order rank `rank`'s stream after the caller's current work (CUDA: an event, CPU: nothing)."""
        if self.device.type == "cuda" and self._streams:
            self._streams[rank].stream.wait_stream(torch.cuda.current_stream(self.device))  # type: ignore[attr-defined]

    def join_into_caller(self) -> None:
        """Order the caller's current stream after everything the ranks submitted so far (CUDA: event
        waits, e.g. to close a CUDA-graph capture that forked into the rank streams; CPU: drain)."""
        if self.device.type == "cuda":
            caller = torch.cuda.current_stream(self.device)
            for stream in self._streams:
                caller.wait_stream(stream.stream)  # type: ignore[attr-defined]
        else:
            self.synchronize()

    def peers_not_arrived(self, rank: int) -> list[int]:
        """CPU, driven from one thread: the peers whose signal rank `rank`'s queued work still needs
        and that have not submitted it (e.g. their dispatch was never called), after running all
        that can run. [] on CUDA (waits run on the GPU) and inside run_ranks (waits block)."""
        if self.device.type != "cpu" or self._thread_streams is not None:
            return []
        return self._streams[rank].blocking_peers()  # type: ignore[attr-defined]

    def barrier(self) -> None:
        """Nothing to wait for: every rank's host calls run in this process, in program order."""

    # Nothing is shared with another process, so a checkpoint releases nothing: the workspaces stay
    # as they are and the generation never changes; MoeAlltoAll still refuses rounds in between.
    checkpoint_generation = 0

    def checkpoint_prepare(self) -> None:
        """Finish every rank's work; the workspaces stay mapped (nothing is shared with another process)."""
        self.synchronize()
        self.checkpointed = True

    def checkpoint_restore(self, group: object = None) -> None:
        """End the pause of checkpoint_prepare; nothing was released, `group` is not used."""
        self.checkpointed = False

    def synchronize(self) -> None:
        """Block until every rank's stream has run everything submitted (raises on a deadlock)."""
        if not self._streams:
            torch.cuda.current_stream(self.device).synchronize()
        for stream in self._streams:
            stream.synchronize()

    def run_ranks(self, fn: Callable[[int], Any]) -> list[Any]:
        """`[fn(rank) for rank in range(ep_size)]`, each call running as that rank in a thread of its
        own, written as one rank's program: a2a calls and torch ops inside `fn` see their inputs
        ready (the receive views after dispatch, for instance), as in a process of its own.

        Every rank's program must make the same sequence of a2a calls. Each call plans its launch
        (kernels compiled and loaded) and then waits until every rank has planned the same call
        (`ready_to_launch`): on one GPU, loading a kernel while a peer's kernel spins in a wait
        blocks until that wait ends, so no rank may still be loading when the waits of a call
        start. CPU: each thread has a blocking stream; kernels are interpreted one at a time. CUDA:
        each thread launches on its rank's stream, ordered after the caller's work and joined back
        into it at the end. The first exception of any rank is raised once every rank has finished
        (a rank whose peer failed raises its own timeout or peer-failed error).
        """
        from a2a.runtime.host_signals import HostSignalStream

        if self._launch_barrier is not None:
            raise RuntimeError("run_ranks is already running on this world")
        self.synchronize()  # nothing of the phase-by-phase streams may still be queued
        results: list[Any] = [None] * self.ep_size
        errors: list[tuple[int, BaseException]] = []
        barrier = threading.Barrier(self.ep_size)

        def run(rank: int) -> None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                    self.wait_for_caller_stream(rank, caller)
                with self.stream(rank).activate():
                    results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
                errors.append((rank, exc))
                barrier.abort()  # a peer waiting for this rank to plan its next call would wait forever

        caller = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if self.device.type == "cpu":  # blocking waits: each thread is its rank, a wait holds that thread
            self._thread_streams = [HostSignalStream() for _ in range(self.ep_size)]
        self._launch_barrier = barrier
        try:
            threads = [threading.Thread(target=run, args=(rank,), name=f"a2a-rank-{rank}")
                       for rank in range(self.ep_size)]  # fmt: skip
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            self._thread_streams = None
            self._launch_barrier = None
        if self.device.type == "cuda":
            self.join_into_caller()
        if errors:
            raise min(errors, key=lambda e: e[0])[1]
        return results

    def ready_to_launch(self, rank: int) -> None:
        """Inside `run_ranks`: return once every rank has planned its current a2a call (a no-op
        otherwise). Raises if a peer's program ended or failed before reaching the same call."""
        barrier = self._launch_barrier
        if barrier is None:
            return
        try:
            barrier.wait(timeout=envs.signal_timeout_s())
        except threading.BrokenBarrierError:
            raise RuntimeError(
                f"rank {rank}: a peer's program in run_ranks raised, or did not make this a2a call within "
                "A2A_SIGNAL_TIMEOUT_S; every rank's program must make the same sequence of dispatch / combine calls"
            ) from None

    def wait_for_caller_stream(self, rank: int, caller: torch.cuda.Stream) -> None:
        """Order rank `rank`'s stream after `caller` (another thread's current stream)."""
        self._streams[rank].stream.wait_stream(caller)  # type: ignore[attr-defined]


def _prepare_cuda_for_simulation(num_streams: int) -> None:
    """Give a one-process simulated world on CUDA what it needs, or explain why it can't run.

    Both variables only take effect before CUDA initialises in this process; with one rank there is
    nothing to deadlock, so nothing is required.
    """
    if not torch.cuda.is_initialized():
        envs.set_simulation_env()
    if num_streams <= 1:
        return
    fix = (
        "Set CUDA_MODULE_LOADING=EAGER and CUDA_DEVICE_MAX_CONNECTIONS=32 in the environment before the "
        "process first uses CUDA (or call a2a.envs.set_simulation_env() first thing)."
    )
    cu = driver()
    check("cuInit", cu.cuInit(0))
    mode = check("cuModuleGetLoadingMode", cu.cuModuleGetLoadingMode())
    if mode != cu.CUmoduleLoadingMode.CU_MODULE_EAGER_LOADING:
        raise RuntimeError(
            f"a simulated world of {num_streams} ranks on CUDA needs eager module loading (got {mode.name}): "
            "with lazy loading, the first launch of a kernel while a rank's stream is parked in a wait "
            f"never returns, and the one host thread that would unblock it hangs. {fix}"
        )
    connections = int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8"))
    if connections < num_streams + 1:
        raise RuntimeError(
            f"a simulated world of {num_streams} ranks on CUDA needs CUDA_DEVICE_MAX_CONNECTIONS >= "
            f"{num_streams + 1} (got {connections}): otherwise two ranks' streams share a hardware queue "
            f"and a parked wait blocks the peer it waits for. {fix}"
        )


def _aligned_segments(ep_size: int, size_per_rank: int, device: torch.device) -> torch.Tensor:
    """Zeroed `[ep_size, size_per_rank]` uint8 rows, each starting on a SEGMENT_ALIGN boundary."""
    stride = align_up(size_per_rank, SEGMENT_ALIGN)
    memory = torch.zeros(ep_size * stride + SEGMENT_ALIGN, dtype=torch.uint8, device=device)
    start = -memory.data_ptr() % SEGMENT_ALIGN
    return memory[start : start + ep_size * stride].view(ep_size, stride)[:, :size_per_rank]
