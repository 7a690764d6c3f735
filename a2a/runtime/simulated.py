"""A simulated world: N ranks in ONE process, sharing one workspace tensor, one stream per rank.

On CUDA each rank gets its own driver stream, so N ranks run concurrently on one GPU as N processes
would; a phase's wait is one spinning program per rank (or a stream wait with `A2A_SIGNALS=stream`),
so the data kernels never wait and any number of ranks up to the hardware queues fits. On the CPU each rank gets a cooperative host stream:
kernels run under the Triton interpreter and a rank whose wait cannot complete yet is parked until
a peer's signal arrives.
"""

from __future__ import annotations

import torch

from a2a import envs
from a2a.runtime.streams import SignalStream

# CUDA_DEVICE_MAX_CONNECTIONS is at most 32; one queue is left to the caller's stream.
MAX_SIMULATED_CUDA_RANKS = 31


class SimulatedWorld:
    """`ep_size` ranks in this process on `device` ("cuda", "cuda:N" or "cpu")."""

    def __init__(self, ep_size: int, device: str | torch.device = "cuda"):
        if ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {ep_size}")
        self.ep_size = ep_size
        self.device = torch.device(device)
        self._workspaces: dict[tuple, torch.Tensor] = {}
        self._streams: list[SignalStream]
        if self.device.type == "cuda":
            if ep_size > MAX_SIMULATED_CUDA_RANKS:
                raise ValueError(
                    f"a simulated world on one GPU holds at most {MAX_SIMULATED_CUDA_RANKS} ranks, got {ep_size}: "
                    f"CUDA has {MAX_SIMULATED_CUDA_RANKS + 1} hardware queues per device, and two ranks sharing one "
                    "deadlock (a parked wait holds back the peer's signal queued behind it). Use one process "
                    "per rank, or the CPU simulation, for more."
                )
            envs.prepare_cuda_for_simulation(ep_size)
            from a2a.runtime.cuda_signals import CudaSignalStream, new_cuda_stream

            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            # Fresh driver streams: torch.cuda.Stream() recycles a pool of 32, which would put two
            # ranks on one stream.
            self._streams = [CudaSignalStream(new_cuda_stream(self.device)) for _ in range(ep_size)]
        elif self.device.type == "cpu":
            from a2a.runtime.host_signals import CooperativeScheduler, HostSignalStream

            scheduler = CooperativeScheduler()
            self._streams = [HostSignalStream(scheduler) for _ in range(ep_size)]
        else:
            raise ValueError(f"device must be cuda or cpu, got {self.device}")

    # Each rank has its own stream: ops switch to it, ordered after the caller's work (see MoeAlltoAll).
    switches_streams = True

    def stream(self, rank: int) -> SignalStream:
        """Rank `rank`'s stream; activate it (`with world.stream(r).activate():`) to run ops as that rank."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {rank}")
        return self._streams[rank]

    def workspace(self, key: tuple, size_per_rank: int) -> torch.Tensor:
        """The zero-initialised `[ep_size, size_per_rank]` uint8 workspace for `key`, made once."""
        workspace = self._workspaces.get(key)
        if workspace is None or workspace.shape[1] != size_per_rank:
            self.synchronize()
            workspace = torch.zeros(self.ep_size, size_per_rank, dtype=torch.uint8, device=self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._workspaces[key] = workspace
        return workspace

    def release_workspace(self, key: tuple) -> None:
        """Drop the workspace of `key` once every rank's stream has finished with it (drop its views too)."""
        self.synchronize()
        self._workspaces.pop(key, None)

    def wait_for_caller(self, rank: int) -> None:
        """Order rank `rank`'s stream after the caller's current work (CUDA: an event, CPU: nothing)."""
        stream = self._streams[rank]
        if self.device.type == "cuda":
            stream.stream.wait_stream(torch.cuda.current_stream(self.device))  # type: ignore[attr-defined]

    def join_into_caller(self) -> None:
        """Order the caller's current stream after everything the ranks submitted so far (CUDA: event
        waits, e.g. to close a CUDA-graph capture that forked into the rank streams; CPU: drain)."""
        if self.device.type == "cuda":
            caller = torch.cuda.current_stream(self.device)
            for stream in self._streams:
                caller.wait_stream(stream.stream)  # type: ignore[attr-defined]
        else:
            self.synchronize()

    def synchronize(self) -> None:
        """Block until every rank's stream has run everything submitted (raises on a deadlock)."""
        for stream in self._streams:
            stream.synchronize()
