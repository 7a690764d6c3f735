"""Engine-like traffic for adversarial tests: steps of several MoE layers sharing one workspace.

Each step has new token counts per rank (zeros included) and `runtime_max_tokens_per_rank` = their
max (sometimes more), so the receive planes move every round; layers differ in payload set and
combine dtype / width and may combine in the workspace or from a separate tensor. All ranks' calls
of a whole run are issued without host synchronisation: each rank's "experts" run on its own
stream, so a fast rank's next round can overtake a slow rank's last gather. Schedules are
adversarial: on CUDA random delays (`torch.cuda._sleep`) on the rank streams and random stream
priorities; on the CPU the cooperative scheduler's seeded random order (SimulatedWorld's
`schedule_seed`).

Every receive view is snapshotted on its rank's stream and compared with `a2a.reference` (valid
rows bit-exact, the sanitized expert-id plane in full); every combine output is compared bit for
bit with the reference combine of the same expert function; each output sits between two guard
rows of NaN that must survive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import a2a
from a2a import reference
from tests.support import round_inputs

INVALID_ID = -1
GUARD_BYTE = 0x7F  # 0x7F7F... is NaN in fp16 / bf16 / fp32 alike


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer's payload set: hidden (payload 0), expert ids (payload 1), extras; its combine."""

    hidden_dtype: torch.dtype
    hidden_width: int
    extras: tuple[tuple[torch.dtype, int], ...]
    combine_dtype: torch.dtype
    combine_hidden: int  # <= bytes per token of payload 0 (the expert function reads those bytes)
    in_workspace: bool

    def payload_specs(self, top_k: int) -> list[tuple[torch.dtype, int]]:
        return [(self.hidden_dtype, self.hidden_width), (torch.int32, top_k), *self.extras]


@dataclass(frozen=True)
class TrafficCase:
    ep_size: int
    top_k: int
    num_experts: int
    max_num_tokens: int
    layers: tuple[LayerSpec, ...]
    steps: tuple[tuple[tuple[int, ...], int], ...]  # per step: (tokens per rank, runtime_max_tokens_per_rank)
    seed: int
    schedule_seed: int  # CPU: the scheduler's order; CUDA: delays and stream priorities

    @property
    def rounds(self) -> int:
        return len(self.steps) * len(self.layers)

    def workspace_size(self) -> int:
        sizes = []
        for layer in self.layers:
            row_bytes = [dtype.itemsize * width for dtype, width in layer.payload_specs(self.top_k)]
            combine = layer.combine_hidden * layer.combine_dtype.itemsize
            sizes.append(a2a.moe_a2a_get_workspace_size_per_rank(self.ep_size, self.max_num_tokens, row_bytes, combine))
        return max(sizes)


# Layer shapes for GPU runs: kernels compile once per shape (about a second each on the H200), so
# CUDA cases draw their layers from these and their ranks / top-k from a short menu; what changes
# every round (token counts, rt, order, delays, layer sequence) is still drawn.
COMPILED_LAYERS = (
    LayerSpec(torch.bfloat16, 64, ((torch.float32, 4),), torch.bfloat16, 128, in_workspace=True),
    LayerSpec(torch.uint8, 96, ((torch.float32, 2),), torch.float16, 48, in_workspace=False),
    LayerSpec(torch.float32, 24, (), torch.float32, 16, in_workspace=True),
)


@st.composite
def traffic_cases(draw, max_ranks: int = 4, max_tokens: int = 10, max_layers: int = 3, max_steps: int = 3,
                  compiled: bool = False) -> TrafficCase:  # fmt: skip
    """A traffic case; `compiled` (GPU): layers from COMPILED_LAYERS, 2 or 4 ranks, top-k 4."""
    ep_size = draw(st.sampled_from([2, 4]) if compiled else st.integers(2, max_ranks))
    top_k = 4 if compiled else draw(st.sampled_from([1, 2, 3, 4, 6]))
    num_experts = draw(st.integers(ep_size, 3 * ep_size + 2))
    max_num_tokens = draw(st.integers(2, max_tokens))
    layers = []
    for _ in range(draw(st.integers(1, max_layers))):
        if compiled:
            layers.append(draw(st.sampled_from(COMPILED_LAYERS)))
            continue
        hidden_dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.uint8]))
        hidden_width = draw(st.integers(1, 24))
        extras = tuple((draw(st.sampled_from([torch.float32, torch.uint8, torch.int16])), draw(st.integers(1, 6)))
                       for _ in range(draw(st.integers(0, 2))))  # fmt: skip
        row_bytes = hidden_width * hidden_dtype.itemsize
        layers.append(LayerSpec(hidden_dtype, hidden_width, extras,
                                draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
                                draw(st.integers(1, row_bytes)), draw(st.booleans())))  # fmt: skip
    steps = []
    for _ in range(draw(st.integers(2, max_steps))):
        counts = tuple(draw(st.integers(0, max_num_tokens)) for _ in range(ep_size))
        rt = draw(st.integers(max(1, max(counts)), max_num_tokens))
        steps.append((counts, rt))
    return TrafficCase(ep_size, top_k, num_experts, max_num_tokens, tuple(layers), tuple(steps),
                       draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)))  # fmt: skip


def expert_function(recv_hidden: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """The toy expert of every rank: the first `hidden` bytes of each received row, as numbers.
    Row-wise and exact on CPU and GPU alike, so the reference applies it to its own receive rows."""
    ep_size, rt = recv_hidden.shape[:2]
    data = recv_hidden.view(torch.uint8).reshape(ep_size, rt, -1)[:, :, :hidden]
    return (data.to(torch.float32) * 0.03125 - 3.0).to(dtype)


@dataclass
class RoundInputs:
    experts: list[torch.Tensor]  # per rank [n, top_k] int32 (CPU)
    payloads: list[list[torch.Tensor]]  # per rank, per payload (CPU)
    runtime_max_tokens: int


def draw_inputs(case: TrafficCase, layer: LayerSpec, counts: tuple[int, ...], rt: int,
                generator: torch.Generator) -> RoundInputs:  # fmt: skip
    experts, payloads = [], []
    for n in counts:
        ids = round_inputs.expert_ids(n, case.top_k, case.num_experts, generator)
        if n and torch.rand(1, generator=generator).item() < 0.3:
            ids[0, -1] = case.num_experts + 3  # skipped by routing, counted as invalid
        rank_payloads = []
        for p, (dtype, width) in enumerate(layer.payload_specs(case.top_k)):
            if p == 1:
                rank_payloads.append(ids.clone())
            else:
                rank_payloads.append(round_inputs.payload_bytes(n, dtype, width, generator))
        experts.append(ids)
        payloads.append(rank_payloads)
    return RoundInputs(experts, payloads, rt)


def check_round(case: TrafficCase, layer: LayerSpec, inputs: RoundInputs, snapshots, outputs, where: str) -> None:
    """One round against the reference: `snapshots[rank]` (the receive views as the experts saw
    them: valid rows exact, the sanitized expert-id plane in full) and `outputs[rank]` (the
    combine output, bit for bit)."""
    expected = reference.dispatch(inputs.experts, inputs.payloads, case.num_experts, inputs.runtime_max_tokens)
    planes = []
    for rank in range(case.ep_size):
        valid = expected.valid_rows(rank)
        got, want = snapshots[rank], expected.recv_payloads[rank]
        for p in (0, *range(2, len(want))):
            assert torch.equal(got[p].cpu()[valid].view(torch.uint8), want[p][valid].view(torch.uint8)), \
                f"{where}: payload {p} received by rank {rank}"
        sanitized = reference.sanitize(want[1], expected.recv_counts[rank], INVALID_ID)
        assert torch.equal(got[1].cpu(), sanitized), f"{where}: sanitized expert ids of rank {rank}"
        planes.append(expert_function(want[0], layer.combine_hidden, layer.combine_dtype))
    combined = reference.combine(planes, expected.routing, [e.shape[0] for e in inputs.experts])
    for rank in range(case.ep_size):
        assert torch.equal(outputs[rank].cpu().view(torch.uint8), combined[rank].view(torch.uint8)), \
            f"{where}: combine output of rank {rank}"


@dataclass
class RoundRecord:
    """What one rank kept of one round: its inputs' round, the receive snapshots, the output."""

    inputs: RoundInputs
    layer: LayerSpec
    snapshots: list[list[torch.Tensor] | None]  # per rank, per payload: the receive view as the experts saw it
    outputs: list[torch.Tensor | None]  # per rank [n + 2, H]: guard row, output rows, guard row (None: it raised)


class Traffic:
    """Runs a TrafficCase on `device`; `run()` issues everything, `check()` compares it all."""

    def __init__(self, case: TrafficCase, device: str, after: Traffic | None = None):
        """`after`: continue on that run's world and instances (same ranks, experts, capacity and
        layers), whose rounds must have been checked."""
        self.case = case
        self.schedule = random.Random(case.schedule_seed)
        self.records: list[RoundRecord] = []
        self.stopped: set[int] = set()  # ranks that stopped issuing calls (a rank that raised mid-run)
        self.raised: list[tuple[int, int, BaseException]] = []  # (round, rank, error) of every refused call
        if after is not None:
            self.world, self.layers = after.world, after.layers
            return
        if device == "cpu":
            self.world = a2a.SimulatedWorld(case.ep_size, "cpu", schedule_seed=case.schedule_seed)
        else:
            priorities = [self.schedule.choice([0, -1, -2, -5]) for _ in range(case.ep_size)]
            self.world = a2a.SimulatedWorld(case.ep_size, device, stream_priorities=priorities)
        size = case.workspace_size()
        self.layers = [
            [a2a.MoeAlltoAll(a2a.Mapping(case.ep_size, r), case.max_num_tokens, case.top_k, case.num_experts,
                             workspace_size_per_rank=size, world=self.world) for r in range(case.ep_size)]
            for _ in case.layers
        ]  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.world.device

    def on_rank(self, rank: int, work) -> None:
        """Run `work` on rank `rank`'s stream, in its order (CUDA: enqueued now; CPU: submitted)."""
        stream = self.world.stream(rank)
        if self.device.type == "cuda":
            with stream.activate():
                work()
        else:
            stream.submit(work)

    def maybe_delay(self, rank: int) -> None:
        """CUDA: sometimes hold the rank's stream for 5 us to 0.5 ms before its next call."""
        if self.device.type == "cuda" and self.schedule.random() < 0.4:
            cycles = self.schedule.choice([10_000, 100_000, 1_000_000])
            with self.world.stream(rank).activate():
                torch.cuda._sleep(cycles)

    def run(self, crash: tuple[int, int] | None = None) -> None:
        """Issue every round; with `crash=(round, rank)` that rank's dispatch of that round is a
        call that raises (a bad argument), after which the rank issues nothing more, as a crashed
        engine rank would. Calls the other ranks get refused (their fault surfacing) are recorded."""
        case = self.case
        generator = torch.Generator().manual_seed(case.seed)
        for counts, rt in case.steps:
            for layer, moes in zip(case.layers, self.layers):
                inputs = draw_inputs(case, layer, counts, rt, generator)
                self.records.append(self.run_round(layer, moes, inputs, crash))

    def call(self, rank: int, fn):
        """`fn()` for a rank still running; a refused call (the rank's fault surfacing, or a phase
        error when a peer never dispatched) is recorded and gives None."""
        if rank in self.stopped:
            return None
        try:
            return fn()
        except (a2a.A2AFaultError, a2a.PhaseError) as error:
            self.raised.append((len(self.records), rank, error))
            return None

    def rank_order(self) -> list[int]:
        """The order in which this phase's calls are issued: random, so any rank can run ahead."""
        order = list(range(self.case.ep_size))
        self.schedule.shuffle(order)
        return order

    def run_round(self, layer: LayerSpec, moes: list[a2a.MoeAlltoAll], inputs: RoundInputs,
                  crash: tuple[int, int] | None = None) -> RoundRecord:  # fmt: skip
        device, ep_size, rt = self.device, self.case.ep_size, inputs.runtime_max_tokens
        recv: list = [None] * ep_size
        for rank in self.rank_order():
            self.maybe_delay(rank)
            bad = crash == (len(self.records), rank)
            if bad and rank not in self.stopped:
                self.stopped.add(rank)
                try:  # rt above max_num_tokens: refused before anything runs; this rank then stops
                    moes[rank].dispatch(inputs.experts[rank].to(device), [p.to(device) for p in inputs.payloads[rank]],
                                        self.case.max_num_tokens + 1)  # fmt: skip
                except ValueError:
                    continue
                raise AssertionError("a dispatch with rt > max_num_tokens was accepted")
            recv[rank] = self.call(rank, lambda rank=rank: moes[rank].dispatch(
                inputs.experts[rank].to(device), [p.to(device) for p in inputs.payloads[rank]], rt,
                invalid_token_expert_id=INVALID_ID, expert_id_payload_index=1))  # fmt: skip
        snapshots: list = [None] * ep_size
        planes: list = [None] * ep_size
        for rank in self.rank_order():
            moe = moes[rank]
            views = recv[rank]
            if views is None:
                continue
            copies = [torch.empty_like(view) for view in views]
            if layer.in_workspace:
                plane = self.call(rank, lambda moe=moe: moe.get_combine_payload_tensor_in_workspace(
                    rt, layer.combine_hidden, layer.combine_dtype))  # fmt: skip
                if plane is None:
                    continue
            else:
                plane = torch.empty(ep_size, rt, layer.combine_hidden, dtype=layer.combine_dtype, device=device)

            def experts(views=views, copies=copies, plane=plane) -> None:
                for view, copy in zip(views, copies):
                    copy.copy_(view)
                plane.copy_(expert_function(views[0], layer.combine_hidden, layer.combine_dtype))

            self.maybe_delay(rank)
            self.on_rank(rank, experts)
            snapshots[rank] = copies
            planes[rank] = plane
        outputs: list = [None] * ep_size
        for rank in self.rank_order():
            if planes[rank] is None:
                continue
            n = inputs.experts[rank].shape[0]
            guarded = torch.full((n + 2, layer.combine_hidden * layer.combine_dtype.itemsize), GUARD_BYTE,
                                 dtype=torch.uint8, device=device).view(layer.combine_dtype)  # fmt: skip
            self.maybe_delay(rank)
            done = self.call(rank, lambda rank=rank, guarded=guarded, n=n: moes[rank].combine(
                planes[rank], rt, payload_in_workspace=layer.in_workspace, output=guarded[1 : n + 1]))  # fmt: skip
            outputs[rank] = guarded if done is not None else None
        return RoundRecord(inputs, layer, snapshots, outputs)

    def check_after_crash(self, crash_round: int) -> None:
        """Rounds before the crash are exact; from the crash round on, every surviving rank's call
        raised or its output is NaN (never plausible rows), and every surviving rank raises."""
        try:
            self.world.synchronize()
        except a2a.A2AFaultError:  # the CPU scheduler reports the deadlock the crashed rank left
            pass
        self.check(rounds=range(crash_round))
        for index in range(crash_round, len(self.records)):
            for rank, guarded in enumerate(self.records[index].outputs):
                if guarded is not None and rank not in self.stopped:
                    n = guarded.shape[0] - 2
                    assert torch.isnan(guarded[1 : n + 1].float().cpu()).all(), \
                        f"round {index}: rank {rank} returned rows after the crash"
        for rank, moes in enumerate(zip(*self.layers)):
            if rank not in self.stopped:
                try:
                    moes[0].synchronize()
                except a2a.A2AFaultError:
                    continue
                raise AssertionError(f"rank {rank} never raised after its peer crashed")

    def check(self, rounds=None) -> None:
        self.world.synchronize()
        case = self.case
        for index, record in enumerate(self.records):
            if rounds is not None and index not in rounds:
                continue
            where = f"round {index} (step {index // len(case.layers)}, layer {index % len(case.layers)})"
            rows = [guarded[1 : guarded.shape[0] - 1] for guarded in record.outputs]
            check_round(case, record.layer, record.inputs, record.snapshots, rows, where)
            for rank, guarded in enumerate(record.outputs):
                guards = guarded[[0, guarded.shape[0] - 1]].cpu().view(torch.uint8)
                assert (guards == GUARD_BYTE).all(), f"{where}: a guard row around rank {rank}'s output was written"

    def close(self) -> None:
        """Release the workspace (after a crash, once the recorded faults have been reported)."""
        try:
            self.world.synchronize()
        except a2a.A2AFaultError:
            if not self.stopped:
                raise
        self.layers[0][0]._reset_workspace()  # every layer and rank shares the one workspace


class GraphTraffic:
    """CUDA graphs of engine steps: per rank, one graph of a whole step (every layer: dispatch with
    a device-side token count, the experts, combine), captured for two values of rt; replayed with
    new inputs and counts, ranks started in a random order after random delays, the rt of each
    replay drawn at random. Every replay is checked against the reference."""

    def __init__(self, case: TrafficCase, rts: tuple[int, ...]):
        self.case = case
        self.rts = rts
        self.traffic = Traffic(case, "cuda")  # world, instances, schedule
        self.world, self.layers = self.traffic.world, self.traffic.layers
        ep, dev = case.ep_size, self.traffic.device
        self.buffers: dict = {}  # (rt, layer index, rank) -> dict of static tensors
        for rt in rts:
            for index, layer in enumerate(case.layers):
                for rank in range(ep):
                    specs = layer.payload_specs(case.top_k)
                    self.buffers[(rt, index, rank)] = dict(
                        experts=torch.zeros(rt, case.top_k, dtype=torch.int32, device=dev),
                        payloads=[torch.zeros(rt, width * dtype.itemsize, dtype=torch.uint8, device=dev).view(dtype)
                                  for dtype, width in specs],
                        count=torch.zeros(1, dtype=torch.int32, device=dev),
                        output=torch.full((rt, layer.combine_hidden), float("nan"), dtype=layer.combine_dtype,
                                          device=dev),
                    )  # fmt: skip
        self.graphs = {}
        for rt in rts:  # warm up eagerly (plans, kernels), then capture each rank's step
            self.step_all_ranks(rt)
            self.world.synchronize()
            for rank in range(ep):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.world.stream(rank).stream):
                    self.step(rt, rank)
                self.graphs[(rt, rank)] = graph
        torch.cuda.synchronize()

    def step(self, rt: int, rank: int) -> None:
        """Rank `rank`'s step, layer after layer (each layer a whole round of that rank)."""
        for index, (layer, moes) in enumerate(zip(self.case.layers, self.layers)):
            self.rank_round(rt, index, layer, moes[rank])

    def rank_round(self, rt: int, index: int, layer: LayerSpec, moe: a2a.MoeAlltoAll) -> None:
        self.combine(rt, index, layer, moe, self.dispatch(rt, index, moe))

    def dispatch(self, rt: int, index: int, moe: a2a.MoeAlltoAll) -> list[torch.Tensor]:
        buffers = self.buffers[(rt, index, moe.ep_rank)]
        return moe.dispatch(buffers["experts"], buffers["payloads"], rt, invalid_token_expert_id=INVALID_ID,
                            expert_id_payload_index=1, token_count=buffers["count"])  # fmt: skip

    def combine(self, rt: int, index: int, layer: LayerSpec, moe: a2a.MoeAlltoAll, recv: list[torch.Tensor]) -> None:
        """The rank's experts (snapshots of its views, the expert function) and its combine."""
        buffers = self.buffers[(rt, index, moe.ep_rank)]
        with self.world.stream(moe.ep_rank).activate():
            if "snapshots" not in buffers:
                buffers["snapshots"] = [torch.empty_like(view) for view in recv]
            for view, copy in zip(recv, buffers["snapshots"]):
                copy.copy_(view)
            if layer.in_workspace:
                plane = moe.get_combine_payload_tensor_in_workspace(rt, layer.combine_hidden, layer.combine_dtype)
            else:
                if "plane" not in buffers:
                    buffers["plane"] = torch.empty(self.case.ep_size, rt, layer.combine_hidden,
                                                   dtype=layer.combine_dtype, device=self.traffic.device)  # fmt: skip
                plane = buffers["plane"]
            plane.copy_(expert_function(recv[0], layer.combine_hidden, layer.combine_dtype))
        moe.combine(plane, rt, payload_in_workspace=layer.in_workspace, output=buffers["output"])

    def step_all_ranks(self, rt: int) -> None:
        """An eager step (warm-up before capture), phase by phase over the ranks: in a one-process
        GPU simulation a kernel loaded while a peer's wait spins blocks until that wait ends, so
        every rank dispatches before any rank combines."""
        for index, (layer, moes) in enumerate(zip(self.case.layers, self.layers)):
            recv = [self.dispatch(rt, index, moe) for moe in moes]
            for moe, views in zip(moes, recv):
                self.combine(rt, index, layer, moe, views)

    def fill(self, rt: int, generator: torch.Generator) -> list[RoundInputs]:
        """New inputs (and counts <= rt) in the static buffers of the `rt` graphs, per layer."""
        rounds = []
        for index, layer in enumerate(self.case.layers):
            counts = tuple(int(torch.randint(0, rt + 1, (1,), generator=generator)) for _ in range(self.case.ep_size))
            inputs = draw_inputs(self.case, layer, counts, rt, generator)
            for rank in range(self.case.ep_size):
                buffers, n = self.buffers[(rt, index, rank)], counts[rank]
                padded = torch.randint(0, self.case.num_experts, (rt, self.case.top_k), dtype=torch.int32,
                                       generator=generator)  # padding rows: ids that must not be sent
                padded[:n] = inputs.experts[rank]
                buffers["experts"].copy_(padded)
                for p, payload in enumerate(inputs.payloads[rank]):
                    full = buffers["payloads"][p]
                    rows = padded if p == 1 else torch.zeros(rt, *payload.shape[1:], dtype=payload.dtype)
                    if p != 1:
                        rows[:n] = payload
                    full.copy_(rows.to(full.device))
                buffers["count"].fill_(n)
                buffers["output"].fill_(float("nan"))
            rounds.append(inputs)
        return rounds

    def replay(self, rt: int) -> None:
        caller = torch.cuda.current_stream()
        traffic = self.traffic
        for rank in traffic.rank_order():
            stream = self.world.stream(rank)
            stream.stream.wait_stream(caller)
            traffic.maybe_delay(rank)
            with stream.activate():
                self.graphs[(rt, rank)].replay()
        self.world.join_into_caller()

    def check(self, rt: int, rounds: list[RoundInputs], where: str) -> None:
        torch.cuda.synchronize()
        case = self.case
        for index, (layer, inputs) in enumerate(zip(case.layers, rounds)):
            buffers = [self.buffers[(rt, index, rank)] for rank in range(case.ep_size)]
            counts = [e.shape[0] for e in inputs.experts]
            outputs = [b["output"][:n] for b, n in zip(buffers, counts)]
            check_round(case, layer, inputs, [b["snapshots"] for b in buffers], outputs, f"{where}, layer {index}")
            for rank, (b, n) in enumerate(zip(buffers, counts)):
                assert not b["output"][n:].any(), f"{where}, layer {index}: padding rows of rank {rank} are not zero"

    def close(self) -> None:
        self.traffic.close()
