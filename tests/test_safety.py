"""Never silently wrong: each call pattern below once returned wrong numbers without an error (issue
"Never silently wrong"); now every rank gets correct results or raises an error naming the cause.

Simulated worlds on the test device (CPU: interpreter + host waits; CUDA: waits in the kernels),
and real processes for the faults that need real time (a rank late past the timeout).
"""

from __future__ import annotations

import time

import pytest
import torch

import a2a
from a2a import reference
from a2a.layout import RoundState
from a2a.runtime.protocol import FAULT_RECORD_WORDS, FLAG_POISON, FaultKind, FaultRecord, Phase
from tests.conftest import requires_cuda, requires_interpreter_in_children
from tests.support.process_launcher import run_ranks
from tests.support.process_rounds import (
    HIDDEN,
    INVALID_ID,
    MAX_NUM_TOKENS,
    NUM_EXPERTS,
    TOP_K,
    RoundInputs,
    process_rank,
    run_round,
)

TIMEOUT_S = 1.0


def make_ranks(world: a2a.SimulatedWorld, max_num_tokens: int = MAX_NUM_TOKENS, hidden: int = HIDDEN,
               **kwargs) -> list[a2a.MoeAlltoAll]:  # fmt: skip
    return [a2a.MoeAlltoAll(a2a.Mapping(world.ep_size, r), max_num_tokens, TOP_K, NUM_EXPERTS, hidden_size=hidden,
                            world=world, **kwargs) for r in range(world.ep_size)]  # fmt: skip


def release(moes: list[a2a.MoeAlltoAll]) -> None:
    for moe in moes:
        moe._reset_workspace()


# --- Ranks that disagree on the round are detected --------------------------------------------


def dispatch_all(world, moes, inputs: RoundInputs, rts: list[int], payloads=None) -> list:
    recv = []
    for rank, moe in enumerate(moes):
        ps = payloads[rank] if payloads is not None else inputs.payloads(rank, world.device)
        recv.append(moe.dispatch(inputs.experts[rank].to(world.device), ps, rts[rank]))
    return recv


@pytest.mark.parametrize("ep_size", [2, 3])
def test_ranks_with_different_rt_raise_naming_the_field_and_rank(device, ep_size):
    world = a2a.SimulatedWorld(ep_size, device)
    moes = make_ranks(world)
    inputs = RoundInputs.draw([3] * ep_size, 4, seed=1)
    rts = [4] * ep_size
    rts[-1] = 6  # the last rank thinks the round has 6 rows per source
    dispatch_all(world, moes, inputs, rts)
    world.synchronize()
    for rank, moe in enumerate(moes):
        with pytest.raises(a2a.A2AMismatchError, match="runtime_max_tokens_per_rank") as info:
            moe.synchronize()
        others = [ep_size - 1] if rank != ep_size - 1 else list(range(ep_size - 1))
        assert info.value.ranks == tuple(others) and info.value.what == "dispatch", (rank, str(info.value))
        # The next call raises too, before anything runs.
        with pytest.raises(a2a.A2AMismatchError):
            moe.combine(torch.zeros(ep_size, rts[rank], HIDDEN, dtype=torch.bfloat16, device=world.device), rts[rank])
    release(moes)


def agreeing_round(world, moes, inputs: RoundInputs, payloads, hidden: int, dtype: torch.dtype) -> None:
    """A round every rank agrees on, with these payloads and this combine payload: compiles and
    loads its kernel variants. (In a one-process GPU simulation a variant loaded for the first
    time while a peer's kernel spins in a wait blocks until that wait ends: CUDA serialises module
    loads with running kernels of the context; separate processes do not share that.)"""
    for rank, moe in enumerate(moes):
        moe.dispatch(inputs.experts[rank].to(world.device), payloads[rank], 4)
    for moe in moes:
        moe.combine(torch.ones(len(moes), 4, hidden, dtype=dtype, device=world.device), 4)
    world.synchronize()
    for moe in moes:
        moe.synchronize()


def test_ranks_with_different_payload_widths_raise(device):
    world = a2a.SimulatedWorld(2, device)
    moes = make_ranks(world)
    inputs = RoundInputs.draw([3, 2], 4, seed=2)
    payloads = [inputs.payloads(r, world.device) for r in range(2)]
    narrow = [[p[:, : HIDDEN // 2].contiguous() if i == 0 else p for i, p in enumerate(ps)] for ps in payloads]
    for variant in (payloads, narrow):
        agreeing_round(world, moes, inputs, variant, HIDDEN, torch.bfloat16)
    payloads[1] = narrow[1]  # rank 1 sends 12 columns, rank 0 24
    dispatch_all(world, moes, inputs, [4, 4], payloads)
    world.synchronize()
    for moe in moes:
        with pytest.raises(a2a.A2AMismatchError, match=r"input_payloads\[0\] bytes per token") as info:
            moe.synchronize()
        assert "48 here, 24 on rank 1" in str(info.value) or "24 here, 48 on rank 0" in str(info.value)
    release(moes)


# Where the combine compares the signatures (a2a.ops.configs.GATHER_COMPARE_MAX_TOKENS): in the
# gather of every round here, in the barrier (CPU: the host's wait) of every one, or each rank by
# its own rows (3 rows: the barrier, 2 or 0: the gather).
COMPARE_PLACEMENTS = {"gather": 128, "barrier": 0, "each rank its own": 2}


@pytest.mark.parametrize("compared_in", list(COMPARE_PLACEMENTS))
@pytest.mark.parametrize("disagreement,counts", [("width", [3, 2]), ("dtype", [3, 2]), ("width", [0, 3])])
def test_ranks_with_different_combine_payloads_raise(device, monkeypatch, disagreement, counts, compared_in):
    """Every rank raises naming the field, a rank without tokens too (its gather's last program
    compares the signatures though it gathers no row, or its barrier does), and no rank hands back
    a number, wherever each rank compares."""
    monkeypatch.setattr(a2a.ops.configs, "GATHER_COMPARE_MAX_TOKENS", COMPARE_PLACEMENTS[compared_in])
    world = a2a.SimulatedWorld(2, device)
    moes = make_ranks(world, hidden=2 * HIDDEN)
    inputs = RoundInputs.draw(counts, 4, seed=3)
    shapes = {"width": [(HIDDEN, torch.bfloat16), (HIDDEN // 2, torch.bfloat16)],
              "dtype": [(HIDDEN, torch.bfloat16), (HIDDEN, torch.float16)]}[disagreement]  # fmt: skip
    payloads = [inputs.payloads(r, world.device) for r in range(2)]
    for hidden, dtype in shapes:
        agreeing_round(world, moes, inputs, payloads, hidden, dtype)
    dispatch_all(world, moes, inputs, [4, 4])
    world.synchronize()
    outputs = [moe.combine(torch.ones(2, 4, h, dtype=dtype, device=world.device), 4)
               for moe, (h, dtype) in zip(moes, shapes)]  # fmt: skip
    world.synchronize()
    field = "combine payload bytes per token" if disagreement == "width" else "combine payload dtype"
    for moe, output in zip(moes, outputs):
        with pytest.raises(a2a.A2AMismatchError, match=field) as info:
            moe.synchronize()
        assert info.value.what == "combine"
        assert torch.isnan(output.float()).all(), "a rank whose round failed hands back NaN, never plausible rows"
    release(moes)


def _disagreeing_rank(rank: int, world_size: int, device: str) -> dict:
    world, moe = process_rank(rank, world_size, device)
    inputs = RoundInputs.draw([3, 3], 4, seed=5)
    try:
        moe.dispatch(inputs.experts[rank].to(world.device), inputs.payloads(rank, world.device), 4 + 2 * rank)
        moe.synchronize()
        return {"raised": None}
    except a2a.A2AFaultError as error:
        return {"raised": type(error).__name__, "fields": list(getattr(error, "fields", ())), "ranks": list(error.ranks)}
    finally:
        del moe
        world.close()


@requires_interpreter_in_children
def test_processes_with_different_rt_raise_on_every_rank(tmp_path):
    results = run_ranks(_disagreeing_rank, 2, tmp_path, "cpu", env={"TRITON_INTERPRET": "1"}, timeout_s=60)
    assert results == [
        {"raised": "A2AMismatchError", "fields": ["runtime_max_tokens_per_rank"], "ranks": [1]},
        {"raised": "A2AMismatchError", "fields": ["runtime_max_tokens_per_rank"], "ranks": [0]},
    ]


# --- A timeout leaves no rank with stale data ----------------------------------------------------


def _late_rank(rank: int, world_size: int, device: str, delay_s: float) -> dict:
    """Rank 1 arrives `delay_s` late (past the timeout) to the second round; returns what each rank saw."""
    world, moe = process_rank(rank, world_size, device)
    inputs = RoundInputs.draw([4, 4], 4, seed=11)
    try:
        # A first round compiles and loads everything (seconds on a cold cache, not the same on
        # every rank); then the ranks meet, so that rank 1's delay is what makes it late.
        run_round(world, moe, inputs, in_workspace=True)
        world.barrier()
        if rank == 1:
            time.sleep(delay_s)
        run_round(world, moe, inputs, in_workspace=True)  # checks itself against the reference
        moe.synchronize()
        return {"result": "correct"}
    except a2a.A2AFaultError as error:
        return {"result": type(error).__name__, "ranks": list(error.ranks)}
    finally:
        del moe
        world.close()


def _check_late(results: list[dict]) -> None:
    assert results[0] == {"result": "A2ATimeoutError", "ranks": [1]}, results
    # The late rank stops at rank 0's poison instead of returning rows rank 0 never produced.
    assert results[1] == {"result": "A2APeerFailedError", "ranks": [0]}, results


@requires_interpreter_in_children
def test_processes_cpu_late_rank_past_the_timeout_raises_on_both(tmp_path):
    env = {"TRITON_INTERPRET": "1", "A2A_SIGNAL_TIMEOUT_S": str(TIMEOUT_S)}
    _check_late(run_ranks(_late_rank, 2, tmp_path, "cpu", 3.0, env=env, timeout_s=90))


@requires_cuda
def test_processes_one_gpu_late_rank_past_the_timeout_raises_on_both(tmp_path):
    env = {"CUDA_MODULE_LOADING": "EAGER", "A2A_SIGNAL_TIMEOUT_S": str(TIMEOUT_S)}
    _check_late(run_ranks(_late_rank, 2, tmp_path, "cuda:0", 3.0, env=env, timeout_s=120))


@requires_cuda
def test_simulated_gpu_rank_late_past_the_timeout(monkeypatch):
    """Rank 1's calls come 2.5 s after rank 0's (timeout 1 s): rank 0 times out, rank 1 sees the
    poison; both raise, both outputs are NaN."""
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", str(TIMEOUT_S))
    world = a2a.SimulatedWorld(2, "cuda")
    moes = make_ranks(world)
    inputs = RoundInputs.draw([4, 4], 4, seed=12)
    outputs, kinds = [], []
    for rank, moe in enumerate(moes):
        if rank == 1:
            time.sleep(2.5)
        try:  # the fault may surface at a call already (the host saw it), else at synchronize
            moe.dispatch(inputs.experts[rank].to("cuda"), inputs.payloads(rank, torch.device("cuda")), 4)
            outputs.append(moe.combine(torch.ones(2, 4, HIDDEN, dtype=torch.bfloat16, device="cuda"), 4))
            moe.synchronize()
        except a2a.A2AFaultError as error:
            kinds.append(type(error).__name__)
            continue
        kinds.append("no error")
    world.synchronize()
    for output in outputs:
        assert torch.isnan(output.float()).all(), "an output of a failed round holds numbers"
    assert kinds == ["A2ATimeoutError", "A2APeerFailedError"]
    release(moes)


# --- After a recorded fault a rank stores nothing into its peers ------------------------------


def inject_fault(moe: a2a.MoeAlltoAll) -> None:
    """Record a timeout in `moe`'s rank as its kernel would, without the poison (so only the
    faulted rank's own guards are under test)."""
    record = moe._rank_workspace.fault_record
    words = torch.zeros(FAULT_RECORD_WORDS, dtype=torch.int32)
    words[FaultRecord.KIND] = FaultKind.TIMEOUT
    words[FaultRecord.PHASE] = Phase.DISPATCH
    record.copy_(words.to(record.device))
    host = moe._rank_workspace.state.host_record
    if host is not None:
        host.words[FaultRecord.KIND] = FaultKind.TIMEOUT
        host.words[FaultRecord.PHASE] = Phase.DISPATCH


def peer_segments(moe: a2a.MoeAlltoAll) -> torch.Tensor:
    others = [r for r in range(moe.ep_size) if r != moe.ep_rank]
    return moe.workspace[others].cpu().clone()


def test_a_faulted_rank_makes_no_remote_store_even_if_the_host_misses_it(device, monkeypatch):
    """The device guard alone: rank 0 has recorded a fault, its host check is bypassed (as in a
    CUDA-graph replay, where the host is not involved); its dispatch and combine write nothing into
    any peer, poison nothing new, and its combine output is NaN."""
    world = a2a.SimulatedWorld(2, device)
    moes = make_ranks(world)
    inputs = RoundInputs.draw([4, 3], 4, seed=13)
    for rank, moe in enumerate(moes):  # one healthy round first
        moe.dispatch(inputs.experts[rank].to(world.device), inputs.payloads(rank, world.device), 4)
    [moe.combine(torch.ones(2, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 4) for moe in moes]
    world.synchronize()
    inject_fault(moes[0])
    before = peer_segments(moes[0])
    monkeypatch.setattr(type(moes[0]._rank_workspace), "raise_if_faulted", lambda self: None)
    moes[0].dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), 4)
    output = moes[0].combine(torch.ones(2, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 4)
    moes[0].world.stream(0).synchronize()
    assert torch.equal(peer_segments(moes[0]), before), "a faulted rank wrote into a peer's segment"
    assert torch.isnan(output.float()).all()
    monkeypatch.undo()
    with pytest.raises(a2a.A2ATimeoutError):
        moes[0].synchronize()
    release(moes)


@requires_cuda
def test_a_faulted_rank_stays_silent_under_cuda_graph_replay():
    """Graphs of a whole round, one per rank, captured healthy; then rank 0 records a fault and
    poisons its flags (as its wait would): replays of every graph move no row between segments,
    every rank records a fault and every output is NaN."""
    world = a2a.SimulatedWorld(3, "cuda")
    moes = make_ranks(world)
    inputs = RoundInputs.draw([4, 2, 3], 4, seed=14)
    experts = [inputs.experts[r].to("cuda") for r in range(3)]
    payloads = [inputs.payloads(r, "cuda") for r in range(3)]
    planes, outputs = [None] * 3, [None] * 3

    def dispatch_of(rank: int) -> None:
        moes[rank].dispatch(experts[rank], payloads[rank], 4)

    def combine_of(rank: int) -> None:
        planes[rank] = moes[rank].get_combine_payload_tensor_in_workspace(4, HIDDEN, torch.bfloat16)
        planes[rank].fill_(1.0)
        outputs[rank] = moes[rank].combine(planes[rank], 4, payload_in_workspace=True)

    # Warm up phase by phase (plans built, kernels loaded): in a one-process GPU simulation a
    # kernel loaded while a peer's wait spins blocks until that wait ends.
    for phase in (dispatch_of, combine_of):
        for rank in range(3):
            phase(rank)
    world.synchronize()
    graphs = []
    for rank in range(3):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=world.stream(rank).stream):
            dispatch_of(rank)
            combine_of(rank)
        graphs.append(graph)
    torch.cuda.synchronize()
    for rank, graph in enumerate(graphs):  # a healthy replay
        with world.stream(rank).activate():
            graph.replay()
    world.synchronize()
    for rank in range(3):
        assert not torch.isnan(outputs[rank].float()).any(), rank
    inject_fault(moes[0])
    flags = moes[0].layout.dispatch_flags_offset
    stride = moes[0].layout.flag_array_stride
    workspace = moes[0].workspace
    for peer in (1, 2):
        for array in range(3):
            word = workspace[peer, flags + 4 * (stride * array) : flags + 4 * (stride * array + 1)].view(torch.int32)
            word.fill_(FLAG_POISON)
    torch.cuda.synchronize()
    payload_offset = moes[0].layout.payload_offset
    before = workspace[:, payload_offset:].cpu().clone()
    for rank, graph in enumerate(graphs):
        with world.stream(rank).activate():
            graph.replay()
    world.synchronize()
    after = workspace[:, payload_offset:].cpu()
    # Receive planes only (each rank's combine plane is rewritten locally by its own fill).
    recv_end = moes[0].layout.round_layout(4, [HIDDEN * 2, TOP_K * 4, TOP_K * 4]).combine_offset - payload_offset
    for segment in range(3):
        assert torch.equal(after[segment, :recv_end], before[segment, :recv_end]), f"rows moved into segment {segment}"
    for rank in range(3):
        assert torch.isnan(outputs[rank].float()).all(), rank
        with pytest.raises(a2a.A2AFaultError):
            moes[rank].synchronize()
    release(moes)


# --- No side effect before an exception -------------------------------------------------------


def test_a_bad_sanitize_argument_raises_before_anything_runs_and_a_retry_works(device):
    world = a2a.SimulatedWorld(2, device)
    moes = make_ranks(world)
    inputs = RoundInputs.draw([4, 3], 4, seed=21)
    with pytest.raises(TypeError, match="expert_ids must be int32"):
        # payload 0 is the bf16 hidden state, not the expert ids
        moes[0].dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), 4,
                         invalid_token_expert_id=INVALID_ID, expert_id_payload_index=0)  # fmt: skip
    assert moes[0]._rank_workspace.state.live is None
    # The corrected retry is an ordinary round on every rank.
    recv = [moe.dispatch(inputs.experts[r].to(world.device), inputs.payloads(r, world.device), 4,
                         invalid_token_expert_id=INVALID_ID, expert_id_payload_index=1) for r, moe in enumerate(moes)]  # fmt: skip
    world.synchronize()
    for r in range(2):
        assert torch.equal(recv[r][1].cpu(), inputs.expected_ids(r))
    outputs = [moe.combine(torch.ones(2, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 4) for moe in moes]
    world.synchronize()
    for moe in moes:
        moe.synchronize()
    assert all(not torch.isnan(o.float()).any() for o in outputs)
    release(moes)


# --- Combine is checked against its own dispatch ----------------------------------------------


def functional_world(device: str, ep_size: int = 1):
    world = a2a.SimulatedWorld(ep_size, device)
    size = a2a.moe_a2a_get_workspace_size_per_rank(ep_size, MAX_NUM_TOKENS, [HIDDEN * 2, TOP_K * 4, TOP_K * 4],
                                                   HIDDEN * 2)  # fmt: skip
    workspace = torch.zeros(ep_size, size, dtype=torch.uint8, device=world.device)
    metainfo = None
    for rank in range(ep_size):
        metainfo = a2a.moe_a2a_initialize(workspace, rank, ep_size, MAX_NUM_TOKENS)
    return world, workspace, metainfo


def functional_dispatch(world, workspace, metainfo, inputs: RoundInputs, rt: int, rank: int = 0, ep_size: int = 1):
    """Rank `rank`'s functional dispatch of `inputs` on its stream; returns (views, combine offset, None)."""
    with world.stream(rank).activate():
        return a2a.moe_a2a_dispatch(inputs.experts[rank].to(world.device), inputs.payloads(rank, world.device),
                                    workspace, metainfo, rt, rank, ep_size, TOP_K, NUM_EXPERTS)  # fmt: skip


@pytest.mark.parametrize("wrong", ["local_num_tokens", "runtime_max_tokens_per_rank", "combine_payload_offset"])
def test_functional_combine_refuses_another_geometry_than_its_dispatch(device, wrong):
    world, workspace, metainfo = functional_world(device)
    inputs = RoundInputs.draw([3], 4, seed=22)
    with world.stream(0).activate():
        _, offset, _ = a2a.moe_a2a_dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device),
                                         workspace, metainfo, 4, 0, 1, TOP_K, NUM_EXPERTS)  # fmt: skip
        args = dict(local_num_tokens=3, runtime_max_tokens_per_rank=4, combine_payload_offset=offset)
        args[wrong] += 16 if wrong == "combine_payload_offset" else 1
        payload = torch.ones(1, args["runtime_max_tokens_per_rank"], HIDDEN, dtype=torch.bfloat16, device=world.device)
        with pytest.raises(ValueError, match=rf"{wrong} must be the dispatch's"):
            a2a.moe_a2a_combine(payload, args["local_num_tokens"], workspace, metainfo,
                                args["runtime_max_tokens_per_rank"], 0, 1, TOP_K, args["combine_payload_offset"])  # fmt: skip
        # The refused call changed nothing: the right combine still works.
        out = a2a.moe_a2a_combine(torch.ones(1, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 3, workspace,
                                  metainfo, 4, 0, 1, TOP_K, offset)  # fmt: skip
    world.synchronize()
    assert not torch.isnan(out.float()).any()


def test_combine_on_a_copy_the_host_never_saw_is_checked_on_the_device(device):
    """A copy of the workspace (as torch.library or functionalization may make) has no host
    record; the gather compares the combine with the dispatch recorded in the workspace itself."""
    world, workspace, metainfo = functional_world(device)
    inputs = RoundInputs.draw([3], 4, seed=23)
    _, offset, _ = functional_dispatch(world, workspace, metainfo, inputs, 4)
    world.synchronize()
    copy = workspace.clone()  # holds the dispatch's record (rows 3, rt 4) in its round state
    with world.stream(0).activate():
        out = a2a.moe_a2a_combine(torch.ones(1, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 4, copy,
                                  metainfo, 4, 0, 1, TOP_K, offset)  # 4 tokens, the dispatch had 3  # fmt: skip
    world.synchronize()
    assert torch.isnan(out.float()).all()
    with pytest.raises(a2a.A2AMismatchError, match=r"does not match its own dispatch on local_num_tokens \(4 in the "
                                                   r"combine, 3 in the dispatch\)"):  # fmt: skip
        a2a.moe_a2a_dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), copy, metainfo, 4,
                             0, 1, TOP_K, NUM_EXPERTS)  # fmt: skip


# --- One live round per workspace -------------------------------------------------------------


def test_interleaving_two_instances_on_one_workspace_raises_naming_the_other(device):
    world = a2a.SimulatedWorld(2, device)
    first, second = make_ranks(world), make_ranks(world)  # same geometry: one shared workspace
    assert first[0].workspace.data_ptr() == second[0].workspace.data_ptr()
    inputs = RoundInputs.draw([3, 4], 4, seed=24)
    for r in range(2):
        first[r].dispatch(inputs.experts[r].to(world.device), inputs.payloads(r, world.device), 4)
    with pytest.raises(a2a.PhaseError, match=r"dispatched by MoeAlltoAll\(ep_rank=0.*not combined yet"):
        second[0].dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), 4)
    # The functional API is refused the same way.
    with world.stream(0).activate(), pytest.raises(a2a.PhaseError, match="already has a live round"):
        a2a.moe_a2a_dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), first[0].workspace,
                             first[0].metainfo, 4, 0, 2, TOP_K, NUM_EXPERTS)  # fmt: skip
    # The first instance's round is intact; then the second one runs its own.
    outputs = [first[r].combine(torch.ones(2, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 4) for r in range(2)]
    for r in range(2):
        second[r].dispatch(inputs.experts[r].to(world.device), inputs.payloads(r, world.device), 4)
    outputs += [second[r].combine(torch.ones(2, 4, HIDDEN, dtype=torch.bfloat16, device=world.device), 4) for r in range(2)]
    world.synchronize()
    for moe in first + second:
        moe.synchronize()
    for output in outputs:
        assert not torch.isnan(output.float()).any()
    release(first)


# --- Smaller rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("args, kwargs", [((2, 2), {}), ((2, -1), {}), ((0, 0), {}),
                                          ((4, 1), dict(tp_size=4, moe_ep_size=3))])  # fmt: skip
def test_mapping_rejects_ranks_outside_the_world(args, kwargs):
    with pytest.raises((ValueError, TypeError)):
        a2a.Mapping(*args, **kwargs)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_timeout_that_is_not_positive_is_rejected(device, monkeypatch, value):
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", value)
    world = a2a.SimulatedWorld(1, device)
    moe = make_ranks(world)[0]
    inputs = RoundInputs.draw([2], 2, seed=25)
    with pytest.raises(ValueError, match="A2A_SIGNAL_TIMEOUT_S must be a number of seconds > 0"):
        moe.dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), 2)
    moe._reset_workspace()


def test_a_fault_is_found_through_any_wrapper_of_the_workspace(device, monkeypatch):
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", str(TIMEOUT_S))
    world, workspace, metainfo = functional_world(device, ep_size=2)
    inputs = RoundInputs.draw([2, 2], 2, seed=26)
    functional_dispatch(world, workspace, metainfo, inputs, 2, ep_size=2)  # rank 1 never dispatches
    if world.device.type == "cpu":  # the cooperative scheduler finds the deadlock
        with pytest.raises(a2a.A2ATimeoutError):
            world.synchronize()
    else:  # the kernel waits out the timeout and records it
        world.synchronize()
    for wrapper in (workspace[:], workspace.view(2, -1), workspace.as_strided(workspace.shape, workspace.stride())):
        with world.stream(0).activate(), pytest.raises(a2a.A2ATimeoutError, match=r"rank\(s\) \[1\]"):
            a2a.moe_a2a_dispatch(inputs.experts[0].to(world.device), inputs.payloads(0, world.device), wrapper,
                                 metainfo, 2, 0, 2, TOP_K, NUM_EXPERTS)  # fmt: skip


def test_sanitize_takes_expert_id_planes_of_any_width(device):
    world, workspace, metainfo = functional_world(device)
    inputs = RoundInputs.draw([3], 4, seed=27)
    functional_dispatch(world, workspace, metainfo, inputs, 4)
    with world.stream(0).activate():
        wide = torch.arange(4 * 9000, dtype=torch.int32).view(1, 4, 9000).to(world.device)
        a2a.moe_a2a_sanitize_expert_ids(wide, workspace, metainfo, 0, -5)
    world.synchronize()
    counts = inputs.expected.recv_counts[0]
    assert torch.equal(wide.cpu(), reference.sanitize(torch.arange(4 * 9000, dtype=torch.int32).view(1, 4, 9000),
                                                      counts, -5))  # fmt: skip


@requires_cuda
def test_a_single_rank_without_a_world_orders_its_results_into_the_callers_stream():
    moe = a2a.MoeAlltoAll(a2a.Mapping(1, 0), MAX_NUM_TOKENS, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN)
    inputs = RoundInputs.draw([5], 5, seed=28)
    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        torch.cuda._sleep(20_000_000)  # the caller's stream is busy: a side stream would run ahead of it
        moe.dispatch(inputs.experts[0].cuda(), inputs.payloads(0, torch.device("cuda")), 5)
        poisoned = torch.full((5, HIDDEN), float("nan"), dtype=torch.bfloat16, device="cuda")
        out = moe.combine(torch.ones(1, 5, HIDDEN, dtype=torch.bfloat16, device="cuda"), 5, output=poisoned)
        seen = out.clone()  # read right after the call, on the caller's stream, as FlashInfer allows
    caller.synchronize()
    assert not torch.isnan(seen.float()).any()
    assert torch.equal(seen.cpu(), out.cpu())
    moe._reset_workspace()


def test_round_state_words_for_combine_checks_follow_the_dispatch(device):
    """The dispatch records its rows and rt where the gather checks them."""
    world, workspace, metainfo = functional_world(device)
    inputs = RoundInputs.draw([3], 4, seed=29)
    functional_dispatch(world, workspace, metainfo, inputs, 4)
    world.synchronize()
    layout = a2a.WorkspaceLayout.from_metainfo(metainfo)
    state = workspace[0, layout.round_state_offset :].view(torch.int32).cpu()
    assert int(state[RoundState.DISPATCH_ROWS]) == 3 and int(state[RoundState.DISPATCH_RT]) == 4
