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


@st.composite
def traffic_cases(draw, max_ranks: int = 4, max_tokens: int = 10, max_layers: int = 3, max_steps: int = 3) -> TrafficCase:
    ep_size = draw(st.integers(2, max_ranks))
    top_k = draw(st.sampled_from([1, 2, 3, 4, 6]))
    num_experts = draw(st.integers(ep_size, 3 * ep_size + 2))
    max_num_tokens = draw(st.integers(2, max_tokens))
    layers = []
    for _ in range(draw(st.integers(1, max_layers))):
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
        ids = torch.randint(0, case.num_experts, (n, case.top_k), generator=generator, dtype=torch.int32)
        if n and torch.rand(1, generator=generator).item() < 0.3:
            ids[0, -1] = case.num_experts + 3  # skipped by routing, counted as invalid
        rank_payloads = []
        for p, (dtype, width) in enumerate(layer.payload_specs(case.top_k)):
            if p == 1:
                rank_payloads.append(ids.clone())
            else:
                raw = torch.randint(0, 256, (n, width * dtype.itemsize), dtype=torch.uint8, generator=generator)
                rank_payloads.append(raw.view(dtype).contiguous())
        experts.append(ids)
        payloads.append(rank_payloads)
    return RoundInputs(experts, payloads, rt)


@dataclass
class RoundRecord:
    """What one rank kept of one round: its inputs' round, the receive snapshots, the output."""

    inputs: RoundInputs
    layer: LayerSpec
    snapshots: list[list[torch.Tensor]]  # per rank, per payload: the receive view as the experts saw it
    outputs: list[torch.Tensor]  # per rank [n + 2, H]: guard row, output rows, guard row


class Traffic:
    """Runs a TrafficCase on `device`; `run()` issues everything, `check()` compares it all."""

    def __init__(self, case: TrafficCase, device: str):
        self.case = case
        self.schedule = random.Random(case.schedule_seed)
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
        self.records: list[RoundRecord] = []

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

    def run(self) -> None:
        case = self.case
        generator = torch.Generator().manual_seed(case.seed)
        for counts, rt in case.steps:
            for layer, moes in zip(case.layers, self.layers):
                self.records.append(self.run_round(layer, moes, draw_inputs(case, layer, counts, rt, generator)))

    def rank_order(self) -> list[int]:
        """The order in which this phase's calls are issued: random, so any rank can run ahead."""
        order = list(range(self.case.ep_size))
        self.schedule.shuffle(order)
        return order

    def run_round(self, layer: LayerSpec, moes: list[a2a.MoeAlltoAll], inputs: RoundInputs) -> RoundRecord:
        device, ep_size, rt = self.device, self.case.ep_size, inputs.runtime_max_tokens
        recv: list = [None] * ep_size
        for rank in self.rank_order():
            self.maybe_delay(rank)
            recv[rank] = moes[rank].dispatch(inputs.experts[rank].to(device), [p.to(device) for p in inputs.payloads[rank]],
                                             rt, invalid_token_expert_id=INVALID_ID, expert_id_payload_index=1)  # fmt: skip
        snapshots: list = [None] * ep_size
        planes: list = [None] * ep_size
        for rank in self.rank_order():
            moe = moes[rank]
            views = recv[rank]
            copies = [torch.empty_like(view) for view in views]
            if layer.in_workspace:
                plane = moe.get_combine_payload_tensor_in_workspace(rt, layer.combine_hidden, layer.combine_dtype)
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
            n = inputs.experts[rank].shape[0]
            guarded = torch.full((n + 2, layer.combine_hidden * layer.combine_dtype.itemsize), GUARD_BYTE,
                                 dtype=torch.uint8, device=device).view(layer.combine_dtype)  # fmt: skip
            self.maybe_delay(rank)
            moes[rank].combine(planes[rank], rt, payload_in_workspace=layer.in_workspace, output=guarded[1 : n + 1])
            outputs[rank] = guarded
        return RoundRecord(inputs, layer, snapshots, outputs)

    def check(self) -> None:
        self.world.synchronize()
        case = self.case
        for index, record in enumerate(self.records):
            where = f"round {index} (step {index // len(case.layers)}, layer {index % len(case.layers)})"
            inputs, layer = record.inputs, record.layer
            expected = reference.dispatch(inputs.experts, inputs.payloads, case.num_experts, inputs.runtime_max_tokens)
            planes = []
            for rank in range(case.ep_size):
                valid = expected.valid_rows(rank)
                got, want = record.snapshots[rank], expected.recv_payloads[rank]
                for p in (0, *range(2, len(want))):
                    assert torch.equal(got[p].cpu()[valid].view(torch.uint8), want[p][valid].view(torch.uint8)), \
                        f"{where}: payload {p} received by rank {rank}"
                sanitized = reference.sanitize(want[1], expected.recv_counts[rank], INVALID_ID)
                assert torch.equal(got[1].cpu(), sanitized), f"{where}: sanitized expert ids of rank {rank}"
                planes.append(expert_function(want[0], layer.combine_hidden, layer.combine_dtype))
            combined = reference.combine(planes, expected.routing, [e.shape[0] for e in inputs.experts])
            for rank, guarded in enumerate(record.outputs):
                out = guarded.cpu()
                n = combined[rank].shape[0]
                assert torch.equal(out[1 : n + 1].view(torch.uint8), combined[rank].view(torch.uint8)), \
                    f"{where}: combine output of rank {rank}"
                guards = out[[0, n + 1]].view(torch.uint8)
                assert (guards == GUARD_BYTE).all(), f"{where}: a guard row around rank {rank}'s output was written"

    def close(self) -> None:
        self.world.synchronize()
        for moes in self.layers:
            for moe in moes:
                moe._reset_workspace()
