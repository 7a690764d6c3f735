"""Benchmark building blocks: inputs (drawn by tests/support/round_inputs.py, the drawer the tests
use), the correctness gate, timers, byte counts, the copy roofline.

All ranks are simulated on one GPU (one stream each), so every rank's traffic shares one device's
memory system and the roofline is that device's copy bandwidth, measured in the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

import a2a
from a2a import reference
from a2a.expert_partition import ExpertPartition
from tests.support import round_inputs

SHAPES = {  # hidden, top_k, experts
    "deepseek": (7168, 8, 256),
    "qwen3": (4096, 8, 128),
    "mixtral": (4096, 2, 8),
    "gptoss": (2880, 4, 128),
}


@dataclass
class Round:
    """One configuration's inputs on every rank, and its MoeAlltoAll instances."""

    world: a2a.SimulatedWorld
    ranks: list[a2a.MoeAlltoAll]
    experts: list[torch.Tensor]
    payloads: list[list[torch.Tensor]]
    expert_outputs: list[torch.Tensor]  # [ep, rt, hidden] bf16, separate tensors
    tokens: int
    hidden: int
    num_experts: int

    @classmethod
    def build(cls, world, tokens: int, shape: str, payloads: str, seed: int = 0) -> Round:
        hidden, top_k, num_experts = SHAPES[shape]
        ep = world.ep_size
        generator = torch.Generator(device="cuda").manual_seed(seed)
        dev = world.device
        experts, inputs = [], []
        for _ in range(ep):
            ids = round_inputs.expert_ids(tokens, top_k, num_experts, generator, routing="distinct", device=dev)
            x = round_inputs.hidden_states(tokens, hidden, generator, device=dev)
            w = round_inputs.routing_weights(tokens, top_k, generator, device=dev)
            experts.append(ids)
            inputs.append(round_inputs.activation_payloads(payloads, x, ids, w, generator))
        size = a2a.moe_a2a_get_workspace_size_per_rank(
            ep, tokens, [p.shape[1] * p.element_size() for p in inputs[0]], hidden * 2
        )
        ranks = [
            a2a.MoeAlltoAll(a2a.Mapping(ep, r), tokens, top_k, num_experts, workspace_size_per_rank=size, world=world)
            for r in range(ep)
        ]
        outputs = [round_inputs.expert_outputs(ep, tokens, hidden, generator, device=dev) for _ in range(ep)]
        return cls(world, ranks, experts, inputs, outputs, tokens, hidden, num_experts)

    def dispatch(self) -> list[list[torch.Tensor]]:
        return [moe.dispatch(self.experts[r], self.payloads[r], self.tokens) for r, moe in enumerate(self.ranks)]

    def fill_planes(self) -> list[torch.Tensor]:
        planes = []
        for r, moe in enumerate(self.ranks):
            plane = moe.get_combine_payload_tensor_in_workspace(self.tokens, self.hidden, torch.bfloat16)
            with self.world.stream(r).activate():
                plane.copy_(self.expert_outputs[r])
            planes.append(plane)
        return planes

    def combine(self, planes: list[torch.Tensor] | None) -> list[torch.Tensor]:
        payloads = planes if planes is not None else self.expert_outputs
        return [
            moe.combine(payloads[r], self.tokens, payload_in_workspace=planes is not None)
            for r, moe in enumerate(self.ranks)
        ]

    def check(self) -> None:
        """Correctness gate: one eager round against the reference (dispatch exact, combine exact)."""
        recv = self.dispatch()
        self.world.synchronize()
        cpu_payloads = [[p.cpu() for p in ps] for ps in self.payloads]
        experts = [e.cpu() for e in self.experts]
        expected = reference.dispatch(experts, cpu_payloads, self.num_experts, self.tokens)
        for r in range(len(self.ranks)):
            valid = expected.valid_rows(r)
            for got, want in zip(recv[r], expected.recv_payloads[r]):
                if not torch.equal(got.cpu()[valid].view(torch.uint8), want[valid].view(torch.uint8)):
                    raise AssertionError(f"dispatch mismatch on rank {r}")
        planes = self.fill_planes()
        outputs = self.combine(planes)
        self.world.synchronize()
        want = reference.combine([p.cpu() for p in self.expert_outputs], expected.routing, [self.tokens] * len(self.ranks))
        for r, out in enumerate(outputs):
            if not torch.equal(out.cpu().view(torch.uint8), want[r].view(torch.uint8)):
                raise AssertionError(f"combine mismatch on rank {r}")
        self.routing = expected.routing
        self.unique_pairs = int(sum(route.send_counts.sum() for route in expected.routing))


def dispatch_row_bytes(round_: Round) -> int:
    return sum(p.shape[1] * p.element_size() for p in round_.payloads[0])


class L2Flush:
    """Overwrites a buffer twice the L2 size so the next run starts cold."""

    def __init__(self):
        size = 2 * torch.cuda.get_device_properties(0).L2_cache_size
        self.buffer = torch.empty(size, dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        self.buffer.fill_(1)


def time_region(run: Callable[[], None], iterations: int, before: Callable[[], None] | None = None) -> float:
    """Median microseconds of `run` on the current stream, measured with CUDA events."""
    samples = []
    for _ in range(iterations):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def copy_roofline_gbps(iterations: int = 10) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / median time."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(3)
    target = torch.empty_like(source)
    microseconds = time_region(lambda: target.copy_(source), iterations)
    return 2 * source.numel() / microseconds / 1e3


def owned_ranges(num_experts: int, ep: int) -> list[range]:
    partition = ExpertPartition(num_experts, ep)
    return [partition.experts_of(r) for r in range(ep)]


def capture_graph(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Capture `body` into a CUDA graph on a side stream forked from (and joined back by) the caller.
    A body that forks into other streams must join them into the capture stream itself."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            body()
    torch.cuda.synchronize()
    return graph


class RankGraphs:
    """One CUDA graph per rank (its dispatch + in-workspace combine), captured on the rank's stream
    and replayed concurrently, as N processes would each replay their own graph.

    A single graph holding every rank's branch runs the branches' kernels in capture order on this
    driver (rank r+1's first kernel waits for rank r's), which adds ~6 us per rank to a small round
    that separate processes never pay. Replays are gated: a sleep on the caller's stream holds every
    rank until all replays are enqueued, so host launch time is not measured either.
    """

    GATE_CYCLES = 2_000_000  # ~1 ms at ~1.8 GHz: longer than enqueueing N graph replays

    def __init__(self, round_: Round, planes: list[torch.Tensor]):
        self.world = round_.world
        self.graphs = []
        for r, moe in enumerate(round_.ranks):
            stream = self.world.stream(r).stream
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                moe.dispatch(round_.experts[r], round_.payloads[r], round_.tokens)
                moe.combine(planes[r], round_.tokens, payload_in_workspace=True)
            self.graphs.append((stream, graph))
        torch.cuda.synchronize()

    def time_us(self, iterations: int, before: Callable[[], None] | None = None) -> float:
        """Median us from the gate's release to the last rank's end."""
        samples = []
        caller = torch.cuda.current_stream()
        for _ in range(iterations):
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(self.GATE_CYCLES)
            start.record(caller)
            for stream, graph in self.graphs:
                stream.wait_stream(caller)
                with torch.cuda.stream(stream):
                    graph.replay()
            for stream, _ in self.graphs:
                caller.wait_stream(stream)
            end.record(caller)
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        return statistics.median(samples)
