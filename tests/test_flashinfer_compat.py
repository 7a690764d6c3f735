"""FlashInfer 0.7.2.post1's `flashinfer.comm` MoE all-to-all surface, called as its users call it.

Every call below uses FlashInfer's documented positional order and keyword names (read from its
signatures and docstrings), and checks its documented results: return arity and shapes, the
active-rank mask tensor, EPLB statistics (row r = rank r's local counts), the workspace size
rule, and the quantized-output arguments a2a refuses rather than ignores. The README's
compatibility section claims what this module covers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import a2a
from a2a import reference
from tests.support.rounds import as_bytes

EP, TOP_K, NUM_EXPERTS, HIDDEN, RT, EPLB = 3, 2, 6, 16, 5, 7


def draw(counts, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    experts = [torch.randint(0, NUM_EXPERTS, (n, TOP_K), generator=generator, dtype=torch.int32).to(device)
               for n in counts]  # fmt: skip
    hiddens = [torch.randn(n, HIDDEN, generator=generator).to(torch.bfloat16).to(device) for n in counts]
    return experts, hiddens


def functional_world(device, eplb=EPLB):
    world = a2a.SimulatedWorld(EP, device)
    size = a2a.moe_a2a_get_workspace_size_per_rank(EP, RT, 2 * HIDDEN + 4 * TOP_K, 2 * HIDDEN, eplb, backend="trtllm")
    workspace = torch.empty(EP, size, dtype=torch.uint8, device=world.device)
    metainfo = [a2a.moe_a2a_initialize(workspace, r, EP, RT, eplb, backend="trtllm") for r in range(EP)]
    return world, workspace, metainfo


def dispatch_hiddens(world, workspace, metainfo, experts, hiddens):
    """Every rank's functional dispatch of its hidden states alone; returns the combine offsets."""
    offsets = []
    for r in range(EP):
        with world.stream(r).activate():
            offsets.append(a2a.moe_a2a_dispatch(experts[r], [hiddens[r]], workspace, metainfo[r], RT, r, EP, TOP_K,
                                                NUM_EXPERTS)[1])  # fmt: skip
    world.synchronize()
    return offsets


def test_workspace_size_follows_flashinfer_formula():
    pad = lambda x: (x + 127) // 128 * 128  # noqa: E731
    for ep, tokens, dispatch, combine, eplb in [(8, 10, 0, 0, 0), (8, 4096, 14400, 14336, 0), (4, 3, 37, 6, 5)]:
        aux = a2a.moe_a2a_get_aux_data_size(ep, tokens, eplb)
        size = a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, dispatch, combine, eplb)
        assert size == pad(aux) + pad(ep * tokens * dispatch) + pad(ep * tokens * combine)
    assert a2a.moe_a2a_get_workspace_size_per_rank(8, 10, 0, 0) == a2a.moe_a2a_get_aux_data_size(8, 10)
    assert a2a.moe_a2a_get_aux_data_size(4, 3, 5) > a2a.moe_a2a_get_aux_data_size(4, 3)  # the EPLB region


def test_active_rank_mask_tensor():
    mask = a2a.moe_a2a_active_rank_mask([0, 1, 3], 4)
    assert mask.dtype == torch.uint64 and mask.device.type == "cpu" and mask.shape == (a2a.MOE_A2A_RANK_MASK_WORDS,)
    assert int(mask.view(torch.int64).item()) == 0b1011
    assert int(a2a.moe_a2a_active_rank_mask(torch.tensor([2]), 4).view(torch.int64).item()) == 0b100
    with pytest.raises(ValueError):
        a2a.moe_a2a_active_rank_mask([4], 4)


def test_functional_round_in_flashinfer_forms(device):
    """dispatch -> sanitize -> combine, positional and keyword forms as in FlashInfer 0.7.2."""
    world, workspace, metainfo = functional_world(device)
    counts = [4, 0, 5]
    experts, hiddens = draw(counts)
    stats = [torch.arange(EPLB, dtype=torch.int32, device=world.device) * (r + 1) for r in range(EP)]
    mask = a2a.moe_a2a_active_rank_mask(range(EP), EP)
    results = []
    for r in range(EP):
        with world.stream(r).activate():
            results.append(a2a.moe_a2a_dispatch(
                experts[r].to(world.device), [hiddens[r].to(world.device), experts[r].to(world.device)], workspace,
                metainfo[r], RT, r, EP, TOP_K, NUM_EXPERTS, None, stats[r], True, mask,
                backend="trtllm", recv_view_cache={}))  # fmt: skip
    world.synchronize()
    expected = reference.dispatch(experts, [[h, e] for h, e in zip(hiddens, experts)], NUM_EXPERTS, RT)
    payloads = []
    for r, result in enumerate(results):
        assert len(result) == 3
        recv, offset, gathered = result
        assert [tuple(v.shape) for v in recv] == [(EP, RT, HIDDEN), (EP, RT, TOP_K)]
        assert isinstance(offset, int)
        assert gathered.dtype == torch.int32 and gathered.shape == (EP, EPLB)
        assert torch.equal(gathered.cpu(), torch.stack([s.cpu() for s in stats]))
        valid = expected.valid_rows(r)
        assert torch.equal(as_bytes(recv[0].cpu()[valid]), as_bytes(expected.recv_payloads[r][0][valid]))
        with world.stream(r).activate():
            a2a.moe_a2a_sanitize_expert_ids(recv[1], workspace, metainfo[r], r, -1, None, backend="trtllm")
        payloads.append(recv[0].clone())
    world.synchronize()
    for r in range(EP):
        assert torch.equal(results[r][0][1].cpu(), reference.sanitize(expected.recv_payloads[r][1], expected.recv_counts[r], -1))
    outputs = []
    for r in range(EP):
        with world.stream(r).activate():
            outputs.append(a2a.moe_a2a_combine(
                payloads[r], counts[r], workspace, metainfo[r], RT, r, EP, TOP_K, results[r][1], False, None, None,
                1.0, a2a.SfLayout.layout_linear, None, use_low_precision=False, enable_pdl=None, enable_rank_mask=True,
                active_rank_mask=mask, backend="trtllm"))  # fmt: skip
    world.synchronize()
    want = reference.combine([p.cpu() for p in payloads], expected.routing, counts)
    for r in range(EP):
        assert outputs[r].shape == (counts[r], HIDDEN) and outputs[r].dtype == torch.bfloat16
        assert torch.equal(as_bytes(outputs[r].cpu()), as_bytes(want[r])), f"rank {r}"


def test_combine_output_dtype_and_low_precision(device):
    world, workspace, metainfo = functional_world(device, eplb=0)
    counts = [3, 2, 4]
    experts, hiddens = draw(counts, seed=3)
    results = []
    for r in range(EP):
        with world.stream(r).activate():
            results.append(a2a.moe_a2a_dispatch(experts[r].to(world.device), [hiddens[r].to(world.device)], workspace,
                                                metainfo[r], RT, r, EP, TOP_K, NUM_EXPERTS))  # fmt: skip
    world.synchronize()
    assert all(result[2] is None for result in results)  # no EPLB stats asked
    expected = reference.dispatch(experts, [[h] for h in hiddens], NUM_EXPERTS, RT)
    payloads = [results[r][0][0].clone() for r in range(EP)]
    outputs = []
    for r in range(EP):
        with world.stream(r).activate():
            outputs.append(a2a.moe_a2a_combine(payloads[r], counts[r], workspace, metainfo[r], RT, r, EP, TOP_K,
                                               results[r][1], False, torch.float32, use_low_precision=True))  # fmt: skip
    world.synchronize()
    want = reference.combine([p.cpu().float() for p in payloads], expected.routing, counts)
    for r in range(EP):
        assert outputs[r].dtype == torch.float32
        # fp8 e4m3 per row: at most 1/16 of the row's largest magnitude per term, top_k terms.
        bound = TOP_K * max(p.abs().max().item() for p in payloads) / 16
        assert (outputs[r].cpu() - want[r]).abs().max().item() <= bound


@pytest.mark.parametrize("kwargs, error", [
    (dict(output_dtype=torch.float8_e4m3fn), NotImplementedError),
    (dict(output_dtype=torch.uint8), NotImplementedError),
    (dict(output_scales=torch.ones(1)), NotImplementedError),
    (dict(sf_layout=a2a.SfLayout.layout_128x4), NotImplementedError),
    (dict(active_rank_mask=a2a.moe_a2a_active_rank_mask([0, 1, 2], 3)), ValueError),  # without enable_rank_mask
    (dict(backend="nccl"), ValueError),
    (dict(enable_pdl="yes"), TypeError),
])
def test_combine_refuses_what_it_does_not_implement(kwargs, error, device):
    """Refused before anything runs: the corrected call then works."""
    world, workspace, metainfo = functional_world(device, eplb=0)
    experts, hiddens = draw([2, 2, 2], seed=5, device=world.device)
    offsets = dispatch_hiddens(world, workspace, metainfo, experts, hiddens)
    payload = torch.ones(EP, RT, HIDDEN, dtype=torch.bfloat16, device=world.device)
    with world.stream(0).activate(), pytest.raises(error):
        a2a.moe_a2a_combine(payload, 2, workspace, metainfo[0], RT, 0, EP, TOP_K, offsets[0], **kwargs)
    for r in range(EP):
        with world.stream(r).activate():
            a2a.moe_a2a_combine(payload, 2, workspace, metainfo[r], RT, r, EP, TOP_K, offsets[r])
    world.synchronize()


def test_dispatch_mask_rules(device):
    world, workspace, metainfo = functional_world(device, eplb=0)
    experts, hiddens = draw([2, 2, 2], device=world.device)
    call = lambda *extra, **kw: a2a.moe_a2a_dispatch(experts[0], [hiddens[0]], workspace, metainfo[0], RT, 0, EP,  # noqa: E731
                                                     TOP_K, NUM_EXPERTS, *extra, **kw)
    with world.stream(0).activate():
        with pytest.raises(ValueError, match="enable_rank_mask=True"):
            call(None, None, False, a2a.moe_a2a_active_rank_mask([0, 1, 2], EP))
        with pytest.raises(ValueError, match="CPU uint64"):
            call(None, None, True, torch.tensor([7], dtype=torch.int32))
        with pytest.raises(ValueError, match="must include this rank"):
            call(None, None, True, a2a.moe_a2a_active_rank_mask([1, 2], EP))
        with pytest.raises(ValueError, match="eplb_stats_num_experts > 0"):
            call(None, torch.zeros(3, dtype=torch.int32))


def test_ranks_that_disagree_on_eplb_stats_raise(device):
    """Rank 1 passes no statistics: every rank finds the disagreement at the dispatch barrier and
    its next call raises, naming the field."""
    world, workspace, metainfo = functional_world(device)
    experts, hiddens = draw([1, 1, 1], device=world.device)
    offsets = []
    for r in range(EP):
        stats = torch.ones(EPLB, dtype=torch.int32, device=world.device) if r != 1 else None
        with world.stream(r).activate():
            offsets.append(a2a.moe_a2a_dispatch(experts[r], [hiddens[r]], workspace, metainfo[r], RT, r, EP, TOP_K,
                                                NUM_EXPERTS, None, stats)[1])  # fmt: skip
    world.synchronize()
    for r in range(EP):
        with world.stream(r).activate(), pytest.raises(a2a.A2AMismatchError, match="eplb_local_stats given"):
            a2a.moe_a2a_combine(torch.ones(EP, RT, HIDDEN, dtype=torch.bfloat16, device=world.device), 1, workspace,
                                metainfo[r], RT, r, EP, TOP_K, offsets[r])  # fmt: skip


def test_workspaces_of_different_eplb_lengths_raise(device):
    """Rank 1 initialized its workspace for 3 statistics, its peers for 7 (so its payload planes
    start elsewhere): the ranks find it at the dispatch barrier, though no rank passes statistics."""
    world = a2a.SimulatedWorld(EP, device)
    size = a2a.moe_a2a_get_workspace_size_per_rank(EP, RT, 2 * HIDDEN, 2 * HIDDEN, EPLB)
    workspace = torch.empty(EP, size, dtype=torch.uint8, device=world.device)
    metainfo = [a2a.moe_a2a_initialize(workspace, r, EP, RT, 3 if r == 1 else EPLB) for r in range(EP)]
    experts, hiddens = draw([1, 1, 1], device=world.device)
    offsets = dispatch_hiddens(world, workspace, metainfo, experts, hiddens)
    for r in range(EP):
        with world.stream(r).activate(), pytest.raises(a2a.A2AMismatchError, match="eplb_stats_num_experts"):
            a2a.moe_a2a_combine(torch.ones(EP, RT, HIDDEN, dtype=torch.bfloat16, device=world.device), 1, workspace,
                                metainfo[r], RT, r, EP, TOP_K, offsets[r])  # fmt: skip


class FlashInferStyleMapping:
    """What FlashInfer's Mapping exposes to MoeAlltoAll (its docstring: moe_ep_rank, moe_ep_size)."""

    def __init__(self, world_size, rank):
        self.world_size, self.rank, self.tp_size, self.moe_ep_size = world_size, rank, world_size, world_size

    @property
    def moe_ep_rank(self):
        return self.rank % self.tp_size % self.moe_ep_size


def flashinfer_mapping_class():
    """FlashInfer's own Mapping class, or None: from an installed flashinfer, else from the package
    of ../shared/fi-baseline unpacked at $FI_PKG_DIR (default /tmp/fi; its mapping module imports
    only torch, so it loads without the rest of flashinfer)."""
    try:
        from flashinfer.comm.mapping import Mapping  # type: ignore[import-not-found]

        return Mapping
    except ImportError:
        pass
    path = Path(os.environ.get("FI_PKG_DIR", "/tmp/fi")) / "flashinfer" / "comm" / "mapping.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_flashinfer_comm_mapping", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Mapping


def test_flashinfer_own_mapping_object(device):
    """MoeAlltoAll takes FlashInfer's Mapping itself (expert parallelism over the tp ranks of a
    pipeline stage, so the ep rank is not the global rank): each rank's ep rank and size come from
    its moe_ep_rank / moe_ep_size, and a round is
    exact (identity experts: every token comes back once per distinct rank its top-k reached)."""
    mapping_class = flashinfer_mapping_class()
    if mapping_class is None:
        pytest.skip("FlashInfer's Mapping is not installed here (flashinfer-python, or ../shared/fi-baseline "
                    "unpacked at $FI_PKG_DIR)")  # fmt: skip
    world = a2a.SimulatedWorld(EP, device)
    # The second pipeline stage of 2 x EP ranks: global rank EP + r is expert-parallel rank r.
    mappings = [mapping_class(world_size=2 * EP, rank=EP + r, tp_size=EP, pp_size=2, moe_ep_size=EP)
                for r in range(EP)]  # fmt: skip
    moes = [a2a.MoeAlltoAll(m, RT, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN, world=world) for m in mappings]
    assert [(moe.ep_rank, moe.ep_size) for moe in moes] == [(r, EP) for r in range(EP)]
    experts, hiddens = draw([4, 0, 5], seed=3, device=world.device)
    recv = [moe.dispatch(experts[r], [hiddens[r]], RT) for r, moe in enumerate(moes)]
    outputs = [moe.combine(recv[r][0].clone(), RT) for r, moe in enumerate(moes)]
    world.synchronize()
    expected = reference.dispatch([e.cpu() for e in experts], [[h.cpu()] for h in hiddens], NUM_EXPERTS, RT)
    for r, out in enumerate(outputs):
        reached = (expected.routing[r].topk_target_ranks >= 0).sum(dim=1)
        want = (hiddens[r].cpu().float() * reached[:, None].float()).to(torch.bfloat16)
        assert torch.equal(as_bytes(out.cpu()), as_bytes(want)), f"rank {r}"


class OneRankComm:
    """A FlashInfer CommBackend of one process (Get_rank, Get_size, allgather, bcast, barrier, Split)."""

    def Get_rank(self):  # noqa: N802 - FlashInfer's names
        return 0

    def Get_size(self):  # noqa: N802
        return 1

    def allgather(self, data):
        return (data,)

    def bcast(self, data, root):
        return data

    def barrier(self):
        pass

    def Split(self, color, key):  # noqa: N802
        return self


def test_class_forms_with_mnnvl_config_and_comm_backend():
    """MoeAlltoAll as FlashInfer code builds it: positional arguments, an MnnvlConfig holding a
    CommBackend communicator (one process here; the same object type across processes)."""
    moe = a2a.MoeAlltoAll(FlashInferStyleMapping(1, 0), 4, TOP_K, NUM_EXPERTS, None, HIDDEN,
                          a2a.MnnvlConfig(comm_backend=OneRankComm()), EPLB, True, backend="trtllm")  # fmt: skip
    assert isinstance(moe.world, a2a.ProcessWorld)
    experts, hiddens = draw([3])
    stats = torch.arange(EPLB, dtype=torch.int32, device=moe.workspace.device)
    mask = a2a.moe_a2a_active_rank_mask([0], 1)
    recv = moe.dispatch(experts[0].to(moe.workspace.device), [hiddens[0].to(moe.workspace.device),
                        experts[0].to(moe.workspace.device)], 4, -1, 1, stats, mask)  # fmt: skip
    assert isinstance(recv, list) and len(recv) == 2
    assert torch.equal(moe.eplb_gathered_stats.cpu(), stats.cpu()[None])
    out = moe.combine(recv[0].clone(), 4, False, None, None, 1.0, a2a.SfLayout.layout_linear, None,
                      use_low_precision=False, active_rank_mask=mask)  # fmt: skip
    moe.synchronize()
    assert out.shape == (3, HIDDEN)
    size = a2a.MoeAlltoAll.get_moe_workspace_size_per_rank(2, TOP_K, 4, HIDDEN, 0, EPLB)
    assert size == a2a.moe_a2a_get_workspace_size_per_rank(2, 4, 2 * HIDDEN + 8 * TOP_K, 2 * HIDDEN, EPLB)
    if moe.workspace.is_cuda:  # CUDA symmetric memory: released and mapped again at the same address
        address = moe.workspace.data_ptr()
        moe.checkpoint_prepare()
        moe.checkpoint_prepare()  # repeated: nothing more
        with pytest.raises(a2a.PhaseError, match="checkpoint_restore first"):
            moe.dispatch(experts[0].to(moe.workspace.device), [hiddens[0].to(moe.workspace.device)], 4)
        moe.checkpoint_restore(OneRankComm())
        assert moe.workspace.data_ptr() == address
    else:  # host shared memory cannot be: refused before anything happens
        with pytest.raises(NotImplementedError, match="checkpoint_prepare: host shared memory"):
            moe.checkpoint_prepare()
    recv = moe.dispatch(experts[0].to(moe.workspace.device), [hiddens[0].to(moe.workspace.device)], 4)
    out = moe.combine(recv[0].clone(), 4)
    moe.synchronize()
    assert torch.equal(out.cpu(), hiddens[0])  # one rank: every token's rows come back once
    moe.world.close()


def test_checkpoint_on_a_simulated_world(device):
    """checkpoint_prepare between rounds pauses every instance (a dispatch raises, naming the way
    out), refuses during a round, and checkpoint_restore gives a fresh workspace whose rounds are
    exact."""
    world = a2a.SimulatedWorld(EP, device)
    moes = [a2a.MoeAlltoAll(a2a.Mapping(EP, r), RT, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN, world=world)
            for r in range(EP)]  # fmt: skip
    experts, hiddens = draw([2, 3, 0], seed=4, device=world.device)

    def round_() -> list[torch.Tensor]:
        recv = [moe.dispatch(experts[r], [hiddens[r]], RT) for r, moe in enumerate(moes)]
        outputs = [moe.combine(recv[r][0].clone(), RT) for r, moe in enumerate(moes)]
        world.synchronize()
        return [o.cpu() for o in outputs]

    first = round_()
    recv = moes[0].dispatch(experts[0], [hiddens[0]], RT)
    with pytest.raises(a2a.PhaseError, match="between rounds"):
        moes[0].checkpoint_prepare()
    for r in range(1, EP):
        moes[r].dispatch(experts[r], [hiddens[r]], RT)
    zeros = torch.zeros(EP, RT, HIDDEN, dtype=torch.bfloat16, device=world.device)
    for r, moe in enumerate(moes):
        moe.combine(recv[0].clone() if r == 0 else zeros, RT)
    world.synchronize()
    for moe in moes:
        moe.checkpoint_prepare()
    with pytest.raises(a2a.PhaseError, match="checkpoint_restore first"):
        moes[1].dispatch(experts[1], [hiddens[1]], RT)
    for moe in moes:
        moe.checkpoint_restore()
    assert all(torch.equal(a, b) for a, b in zip(round_(), first))
    for moe in moes:
        moe._reset_workspace()


def test_get_workspace_cache(device):
    """MoeAlltoAll.get_workspace as FlashInfer documents it: one dict per arguments, holding the
    workspace and its metainfo; a functional round runs on it."""
    world = a2a.SimulatedWorld(EP, device)
    size = a2a.moe_a2a_get_workspace_size_per_rank(EP, RT, 2 * HIDDEN, 2 * HIDDEN)
    entries = [a2a.MoeAlltoAll.get_workspace(size, r, EP, RT, a2a.Mapping(EP, r), 0, backend="trtllm", world=world)
               for r in range(EP)]  # fmt: skip
    assert all(e["workspace"] is entries[0]["workspace"] for e in entries)
    assert a2a.MoeAlltoAll.get_workspace(size, 1, EP, RT, a2a.Mapping(EP, 1), world=world) is entries[1]
    assert entries[2]["ep_rank"] == 2 and entries[2]["workspace"].shape == (EP, size)
    experts, hiddens = draw([2, 3, 1], seed=4)
    results = []
    for r, entry in enumerate(entries):
        with world.stream(r).activate():
            results.append(a2a.moe_a2a_dispatch(experts[r].to(world.device), [hiddens[r].to(world.device)],
                                                entry["workspace"], entry["metainfo"], RT, r, EP, TOP_K, NUM_EXPERTS))
    world.synchronize()
    expected = reference.dispatch(experts, [[h] for h in hiddens], NUM_EXPERTS, RT)
    for r, (recv, _, _) in enumerate(results):
        valid = expected.valid_rows(r)
        assert torch.equal(as_bytes(recv[0].cpu()[valid]), as_bytes(expected.recv_payloads[r][0][valid]))
        with world.stream(r).activate():
            a2a.moe_a2a_combine(recv[0].clone(), [2, 3, 1][r], entries[r]["workspace"], entries[r]["metainfo"], RT, r,
                                EP, TOP_K, results[r][1])  # fmt: skip
    world.synchronize()


@pytest.mark.parametrize("args, kwargs, ep_rank, ep_size", [
    ((8, 5), dict(), 5, 8),  # a2a's short form
    ((8, 5, 8), dict(tp_size=8, moe_ep_size=8), 5, 8),
    ((16, 9), dict(tp_size=8, pp_size=2, moe_ep_size=4), 1, 4),
    ((4, 3), dict(tp_size=4, moe_tp_size=2), 1, 2),
])
def test_mapping_follows_flashinfer(args, kwargs, ep_rank, ep_size):
    mapping = a2a.Mapping(*args, **kwargs)
    assert (mapping.moe_ep_rank, mapping.moe_ep_size) == (ep_rank, ep_size)
    assert mapping.tp_rank == mapping.rank % mapping.tp_size


def test_mapping_rejects_what_flashinfer_rejects():
    with pytest.raises(ValueError, match="tp_size \\* pp_size \\* cp_size"):
        a2a.Mapping(8, 0, tp_size=4)
