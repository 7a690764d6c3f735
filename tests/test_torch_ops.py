"""The torch custom ops of `a2a.torch_ops`: schemas, opcheck, rounds eager and under torch.compile
(inductor), and a round of ops captured in a CUDA graph and replayed with new inputs.

Every round is checked against `a2a.reference`: receive rows bit for bit, the sanitized expert-id
plane entirely, combine bit for bit (fp32 accumulation in fixed k order, like the reference) with
NaN in every stale row of the expert outputs, so a stale read shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import a2a
import a2a.torch_ops
from a2a import reference
from a2a.errors import A2ATimeoutError
from a2a.layout import WorkspaceLayout
from tests.conftest import requires_cuda, requires_interpreter
from tests.support.rounds import POISON_BYTE, as_bytes, world_for

EP, TOP_K, NUM_EXPERTS, HIDDEN, RT, MAX_TOKENS = 3, 3, 8, 40, 6, 8
INVALID_ID = -1
PAYLOAD_ROW_BYTES = [HIDDEN * torch.bfloat16.itemsize, TOP_K * torch.int32.itemsize]  # hidden, expert ids


# Each phase also returns whether it ran as compiled code: Dynamo falls back to eager silently (e.g.
# past its recompile limit), which would leave the compiled tests testing nothing new.
def dispatch_phase(experts, hidden, workspace, layout, ep_rank):
    """One rank's dispatch of [hidden, expert ids], the id plane sanitized in the same op."""
    recv, combine_offset = a2a.torch_ops.dispatch(
        experts, [hidden, experts], workspace, layout, RT, ep_rank, EP, TOP_K, NUM_EXPERTS,
        invalid_token_expert_id=INVALID_ID, expert_id_payload_index=1,
    )  # fmt: skip
    return recv[0], recv[1], combine_offset, torch.compiler.is_compiling()


def combine_phase(payload, local_num_tokens, workspace, layout, ep_rank, combine_offset, payload_in_workspace):
    combined = a2a.torch_ops.combine(
        payload, local_num_tokens, workspace, layout, RT, ep_rank, EP, TOP_K, combine_offset, payload_in_workspace
    )
    return combined, torch.compiler.is_compiling()


# Inductor, not aot_eager: inductor calls the ops on the workspace itself (see a2a.torch_ops and
# test_aot_eager_runs_dispatch_on_a_copy_of_the_workspace). These graphs hold only a2a ops and views,
# so inductor generates no kernel and needs no C++ compiler on the CPU.
compiled_dispatch_phase = torch.compile(dispatch_phase, backend="inductor", fullgraph=True)
compiled_combine_phase = torch.compile(combine_phase, backend="inductor", fullgraph=True)


def new_workspace(world: a2a.SimulatedWorld, ep_size: int = EP) -> tuple[torch.Tensor, torch.Tensor]:
    # Combine plane room for fp32 (the single-rank opcheck combines fp32, the rounds bf16).
    size = a2a.moe_a2a_get_workspace_size_per_rank(ep_size, MAX_TOKENS, PAYLOAD_ROW_BYTES, HIDDEN * 4)
    workspace = torch.empty(ep_size, size, dtype=torch.uint8, device=world.device)
    for rank in range(ep_size):
        metainfo = a2a.moe_a2a_initialize(workspace, rank, ep_size, MAX_TOKENS)
    return workspace, metainfo


@dataclass
class OpsRound:
    """Every rank's round through the ops, on inputs that live in fixed tensors (a CUDA graph
    replays them): `fill` writes new inputs, `run` enqueues the round, `check` compares."""

    world: a2a.SimulatedWorld
    workspace: torch.Tensor
    layout: WorkspaceLayout
    counts: tuple[int, ...]
    compiled: bool
    in_workspace: bool  # combine from the workspace's combine plane (eager only) or staged by the op
    experts: list[torch.Tensor]  # per rank [n_r, TOP_K] int32
    hidden: list[torch.Tensor]  # per rank [n_r, HIDDEN] bf16
    expert_outputs: list[torch.Tensor]  # per rank [EP, RT, HIDDEN] bf16, NaN in stale rows

    @classmethod
    def create(cls, device: str, counts: tuple[int, ...], compiled: bool, workspace: torch.Tensor | None = None):
        world = world_for(EP, device)
        if workspace is None:
            workspace, metainfo = new_workspace(world)
        else:
            metainfo = WorkspaceLayout.compute(EP, MAX_TOKENS).to_metainfo()
        dev = world.device
        return cls(
            world, workspace, WorkspaceLayout.from_metainfo(metainfo), counts, compiled, not compiled,
            [torch.zeros(n, TOP_K, dtype=torch.int32, device=dev) for n in counts],
            [torch.zeros(n, HIDDEN, dtype=torch.bfloat16, device=dev) for n in counts],
            [torch.zeros(EP, RT, HIDDEN, dtype=torch.bfloat16, device=dev) for _ in counts],
        )  # fmt: skip

    def fill(self, seed: int) -> reference.DispatchReference:
        """New inputs in place, the payload region poisoned; returns what dispatch must deliver."""
        generator = torch.Generator().manual_seed(seed)
        # Ids in [-1, NUM_EXPERTS]: duplicates and invalid ids (both ends) in most rounds.
        experts = [
            torch.randint(-1, NUM_EXPERTS + 1, (n, TOP_K), generator=generator, dtype=torch.int32) for n in self.counts
        ]
        hidden = [torch.randn(n, HIDDEN, generator=generator).to(torch.bfloat16) for n in self.counts]
        expected = reference.dispatch(experts, [[h, e] for h, e in zip(hidden, experts)], NUM_EXPERTS, RT)
        for rank in range(EP):
            outputs = torch.randn(EP, RT, HIDDEN, generator=generator)
            outputs[~expected.valid_rows(rank)] = float("nan")
            self.experts[rank].copy_(experts[rank])
            self.hidden[rank].copy_(hidden[rank])
            self.expert_outputs[rank].copy_(outputs.to(torch.bfloat16))
        self.workspace[:, self.layout.payload_offset :].fill_(POISON_BYTE)
        return expected

    def run(self):
        """Enqueue dispatch (+sanitize) on every rank, then combine on every rank, and join the rank
        streams into the caller's. Returns the receive views, combine offsets and combined outputs."""
        dispatch = compiled_dispatch_phase if self.compiled else dispatch_phase
        combine = compiled_combine_phase if self.compiled else combine_phase
        recv, offsets, outs = [], [], []
        for rank in range(EP):
            self.world.wait_for_caller(rank)
            with self.world.stream(rank).activate():
                hidden_view, ids_view, offset, traced = dispatch(
                    self.experts[rank], self.hidden[rank], self.workspace, self.layout, rank
                )
            assert traced == self.compiled, "the compiled dispatch phase ran eagerly"
            recv.append((hidden_view, ids_view))
            offsets.append(offset)
        for rank in range(EP):  # on the CPU every rank's dispatch has run here: all ranks enqueued theirs
            with self.world.stream(rank).activate():
                payload = self.expert_outputs[rank]
                if self.in_workspace:
                    start = rank * self.workspace.stride(0) + offsets[rank]
                    plane = a2a.moe_a2a_wrap_payload_tensor_in_workspace(
                        self.workspace, [EP, RT], start, start + payload.numel() * payload.element_size(), payload.dtype
                    )
                    plane.copy_(payload)  # stands in for the rank's experts writing their output there
                    payload = plane
                combined, traced = combine(
                    payload, self.counts[rank], self.workspace, self.layout, rank, offsets[rank], self.in_workspace
                )
            assert traced == self.compiled, "the compiled combine phase ran eagerly"
            outs.append(combined)
        self.world.join_into_caller()
        return recv, offsets, outs

    def check(self, expected: reference.DispatchReference, recv, offsets, outs) -> None:
        combine_offset = self.layout.round_layout(RT, PAYLOAD_ROW_BYTES).combine_offset
        storage = self.workspace.untyped_storage().data_ptr()
        for rank in range(EP):
            hidden_view, ids_view = recv[rank]
            assert offsets[rank] == combine_offset
            # Views of the workspace itself: a copy would mean the op ran on a copy too.
            assert hidden_view.untyped_storage().data_ptr() == storage
            assert ids_view.untyped_storage().data_ptr() == storage
            assert hidden_view.shape == (EP, RT, HIDDEN) and hidden_view.dtype == torch.bfloat16
            valid = expected.valid_rows(rank)
            want_hidden = expected.recv_payloads[rank][0]
            got_hidden = hidden_view.cpu()[valid]
            assert torch.equal(as_bytes(got_hidden), as_bytes(want_hidden[valid])), f"hidden on rank {rank}"
            want_ids = reference.sanitize(expected.recv_payloads[rank][1], expected.recv_counts[rank], INVALID_ID)
            assert torch.equal(ids_view.cpu(), want_ids), f"sanitized expert ids on rank {rank}"
        want = reference.combine([o.cpu() for o in self.expert_outputs], expected.routing, list(self.counts))
        for rank in range(EP):
            assert outs[rank].shape == (self.counts[rank], HIDDEN) and outs[rank].dtype == torch.bfloat16
            assert torch.equal(as_bytes(outs[rank].cpu()), as_bytes(want[rank])), f"combine on rank {rank}"


def test_schemas_declare_exactly_the_writes():
    writes = {
        "dispatch": ["workspace"],
        "combine": ["workspace"],
        "sanitize_expert_ids": ["expert_ids"],
    }
    for name, written in writes.items():
        schema = getattr(torch.ops.a2a, name).default._schema
        assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == written
        assert all(r.alias_info is None for r in schema.returns), f"{name} returns an alias"
    assert [str(r.type) for r in torch.ops.a2a.combine.default._schema.returns] == ["Tensor"]
    assert not torch.ops.a2a.dispatch.default._schema.returns


@pytest.mark.parametrize("op_name", ["dispatch", "combine", "sanitize_expert_ids"])
def test_opcheck_and_single_rank_results(device, op_name):
    """opcheck (declared vs. actual writes, fake vs. real outputs, functionalized vs. eager) on one
    rank, where an op is self-contained (so opcheck's copies of the workspace stay consistent), then
    the op's own result against the reference."""
    world = world_for(1, device)
    workspace, metainfo = new_workspace(world, ep_size=1)
    dev = world.device
    generator = torch.Generator().manual_seed(7)
    experts = torch.tensor([[0, -1, 5], [3, 3, 1], [NUM_EXPERTS, -4, 2], [1, 0, 7]], dtype=torch.int32)
    hidden = torch.randn(4, HIDDEN, generator=generator).to(torch.bfloat16)
    expected = reference.dispatch([experts], [[hidden, experts]], NUM_EXPERTS, RT)
    dispatch_args = (
        experts.to(dev), [hidden.to(dev), experts.to(dev)], workspace, 1, MAX_TOKENS, RT, 0, TOP_K, NUM_EXPERTS,
        INVALID_ID, 1,
    )  # fmt: skip
    if op_name == "dispatch":
        check_opcheck(torch.ops.a2a.dispatch.default, dispatch_args)
    workspace[:, WorkspaceLayout.from_metainfo(metainfo).payload_offset :].fill_(POISON_BYTE)
    recv, combine_offset = a2a.torch_ops.dispatch(
        dispatch_args[0], dispatch_args[1], workspace, metainfo, RT, 0, 1, TOP_K, NUM_EXPERTS,
        invalid_token_expert_id=INVALID_ID, expert_id_payload_index=1,
    )  # fmt: skip
    world.synchronize()
    valid = expected.valid_rows(0)
    assert torch.equal(as_bytes(recv[0].cpu()[valid]), as_bytes(expected.recv_payloads[0][0][valid]))
    want_ids = reference.sanitize(expected.recv_payloads[0][1], expected.recv_counts[0], INVALID_ID)
    assert torch.equal(recv[1].cpu(), want_ids)

    if op_name == "combine":
        payload = torch.randn(1, RT, HIDDEN, generator=generator)
        payload[~valid] = float("nan")
        args = (payload.to(dev), 4, workspace, 1, MAX_TOKENS, RT, 0, TOP_K, combine_offset, False)
        check_opcheck(torch.ops.a2a.combine.default, args)
        out = torch.ops.a2a.combine(*args)
        world.synchronize()
        want = reference.combine([payload], expected.routing, [4])[0]
        assert torch.equal(out.cpu(), want)
    elif op_name == "sanitize_expert_ids":
        ids = torch.randint(0, NUM_EXPERTS, (1, RT, TOP_K), generator=generator, dtype=torch.int32)
        args = (ids.to(dev), workspace, 1, MAX_TOKENS, 0, -7)  # a tensor of its own, not the receive plane
        check_opcheck(torch.ops.a2a.sanitize_expert_ids.default, args)
        torch.ops.a2a.sanitize_expert_ids(*args)
        world.synchronize()
        assert torch.equal(args[0].cpu(), reference.sanitize(ids, expected.recv_counts[0], -7))


def check_opcheck(op, args) -> None:
    results = torch.library.opcheck(op, args)  # raises on the first failing check
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_rounds_through_the_ops_match_the_reference(device, compiled):
    """Three rounds on one workspace, one with other token counts (a zero-token rank in each);
    under torch.compile (fullgraph, inductor) on the CPU and, on a GPU machine, on CUDA."""
    run = OpsRound.create(device, (6, 0, 4), compiled)
    for seed in (0, 1):
        expected = run.fill(seed)
        run.check(expected, *run.run())
    run = OpsRound.create(device, (2, 5, 0), compiled, workspace=run.workspace)
    expected = run.fill(2)
    run.check(expected, *run.run())


@requires_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_round_of_ops_replays_from_a_cuda_graph_with_new_inputs(compiled):
    """A whole round of custom ops (eager: combine from the workspace plane; compiled: staged)
    captured once and replayed with new inputs: nothing from the host between replays."""
    run = OpsRound.create("cuda", (RT, 0, 3), compiled)
    run.fill(0)
    run.run()  # warm-up: every kernel variant loaded (and every graph compiled) before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    capture_stream = torch.cuda.Stream()
    with torch.cuda.stream(capture_stream):
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=capture_stream):
            recv, offsets, outs = run.run()
    torch.cuda.synchronize()
    for seed in range(1, 5):
        expected = run.fill(seed)
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        run.check(expected, recv, offsets, outs)


def test_dispatch_checks_the_expert_id_payload_before_sending(device):
    world = world_for(1, device)
    workspace, metainfo = new_workspace(world, ep_size=1)
    experts = torch.zeros(2, TOP_K, dtype=torch.int32, device=world.device)
    hidden = torch.zeros(2, HIDDEN, dtype=torch.bfloat16, device=world.device)
    before = workspace.clone()
    cases = [
        (dict(invalid_token_expert_id=-1), "expert_id_payload_index is required"),
        (dict(invalid_token_expert_id=-1, expert_id_payload_index=2), r"expert_id_payload_index must be in \[0, 1\]"),
        (dict(invalid_token_expert_id=-1, expert_id_payload_index=0), r"input_payloads\[0\] .* must be int32"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            a2a.torch_ops.dispatch(
                experts, [hidden, experts], workspace, metainfo, RT, 0, 1, TOP_K, NUM_EXPERTS, **kwargs
            )
    world.synchronize()
    assert torch.equal(workspace, before), "a refused dispatch wrote to the workspace"


def test_compiled_wrappers_say_what_they_need(device):
    """Both refusals happen while tracing (fullgraph), before anything runs."""
    world = world_for(1, device)
    workspace, metainfo = new_workspace(world, ep_size=1)
    layout = WorkspaceLayout.from_metainfo(metainfo)
    experts = torch.zeros(1, TOP_K, dtype=torch.int32, device=world.device)

    def dispatch_with_metainfo_tensor(experts, workspace, metainfo):
        return a2a.torch_ops.dispatch(experts, [experts], workspace, metainfo, RT, 0, 1, TOP_K, NUM_EXPERTS)

    with pytest.raises(Exception, match="pass the WorkspaceLayout"):
        torch.compile(dispatch_with_metainfo_tensor, backend="inductor", fullgraph=True)(experts, workspace, metainfo)

    combine_offset = layout.round_layout(RT, [TOP_K * 4]).combine_offset
    plane = a2a.moe_a2a_wrap_payload_tensor_in_workspace(
        workspace, [1, RT], combine_offset, combine_offset + RT * HIDDEN * 2, torch.bfloat16
    )

    def combine_from_the_plane(plane, workspace):
        return a2a.torch_ops.combine(plane, 1, workspace, layout, RT, 0, 1, TOP_K, combine_offset, True)

    with pytest.raises(Exception, match="payload_in_workspace=True is not supported inside torch.compile"):
        torch.compile(combine_from_the_plane, backend="inductor", fullgraph=True)(plane, workspace)


@requires_interpreter
def test_aot_eager_runs_dispatch_on_a_copy_of_the_workspace():
    """Why the compiled tests use inductor: aot_eager keeps functionalization's copy of every
    mutated input, so each rank's dispatch runs on a private copy of the workspace and no peer ever
    sees its rows or its signal. On the CPU the round then fails fast (on CUDA it would stall until
    the device timeout, so this runs on the CPU only).
    If this starts failing, torch re-inplaces under aot_eager too: update a2a.torch_ops' docstring."""
    world = a2a.SimulatedWorld(2, "cpu")  # its own world: this one is left with waits that never end
    workspace, metainfo = new_workspace(world, ep_size=2)
    layout = WorkspaceLayout.from_metainfo(metainfo)

    def dispatch_ids(experts, workspace, ep_rank):
        a2a.torch_ops.dispatch(experts, [experts], workspace, layout, RT, ep_rank, 2, 1, 2)

    compiled = torch.compile(dispatch_ids, backend="aot_eager", fullgraph=True)
    experts = torch.tensor([[0], [1]], dtype=torch.int32)
    for rank in range(2):
        with world.stream(rank).activate():
            compiled(experts, workspace, rank)
    with pytest.raises(A2ATimeoutError):
        world.synchronize()
