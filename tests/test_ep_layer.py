"""`a2a.EpAlltoAll`: rank-major receive buffers in every dispatch format, combine, the call order."""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a import reference
from tests.support.rounds import as_bytes

TOP_K, NUM_EXPERTS, HIDDEN, MAX_TOKENS = 2, 6, 128, 5  # 128: fp8 per-block's block


def make_group(device, ep_size, **params):
    world = a2a.SimulatedWorld(ep_size, device)
    ep_params = a2a.EpParams(NUM_EXPERTS, TOP_K, MAX_TOKENS, HIDDEN, **params)
    return world, [a2a.EpAlltoAll(ep_params, a2a.Mapping(ep_size, r), world=world) for r in range(ep_size)]


def draw(counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, NUM_EXPERTS, (n, TOP_K), generator=generator, dtype=torch.int64) for n in counts]
    hidden = [torch.randn(n, HIDDEN, generator=generator).to(torch.bfloat16) for n in counts]
    weights = [torch.rand(n, TOP_K, generator=generator) for n in counts]
    return ids, hidden, weights


@pytest.mark.parametrize("dispatch_format", [None, *a2a.QuantFormat])
def test_rank_major_buffers_and_combine(device, dispatch_format):
    """Every format (rank 1 sends nothing: its fp8 scales payload is [0, 1] with strides (1, 0)):
    received rows equal the reference's (quantized on the sender), stale rows carry
    invalid_expert_id, and combine of the received hidden states (dequantized) equals the
    reference's combine of the same planes."""
    counts, rt = [3, 0, 5], 5
    world, group = make_group(device, len(counts), dispatch_format=dispatch_format, invalid_expert_id=-7)
    ids, hidden, weights = draw(counts, seed=len(str(dispatch_format)))
    dev = world.device
    received = [ep.dispatch(hidden[r].to(dev), ids[r].to(dev), weights[r].to(dev), runtime_max_tokens_per_rank=rt)
                for r, ep in enumerate(group)]  # fmt: skip
    world.synchronize()
    ids32 = [i.to(torch.int32) for i in ids]
    if dispatch_format is None:
        sent = [[h, i, w] for h, i, w in zip(hidden, ids32, weights)]
    else:
        # Quantized on the senders' device, as the senders did (CUDA and the CPU may round a scale apart).
        sent = [[*(p.cpu() for p in a2a.quantization.quantize(h.to(dev), dispatch_format).payloads()), i, w]
                for h, i, w in zip(hidden, ids32, weights)]  # fmt: skip
    expected = reference.dispatch(ids32, sent, NUM_EXPERTS, rt)
    outputs, buffers = [], []
    for r, (ep, got) in enumerate(zip(group, received)):
        assert got.tokens_per_rank == rt and got.topk_ids.shape == (len(counts) * rt, TOP_K)
        valid = expected.valid_rows(r).reshape(-1)
        planes = [got.hidden_states, got.hidden_states_scale, got.hidden_states_global_scale]
        planes = [p for p in planes if p is not None] + [got.topk_ids, got.topk_weights]
        for plane, want in zip(planes, expected.recv_payloads[r]):
            assert torch.equal(as_bytes(plane.cpu()[valid]), as_bytes(want.reshape(-1, want.shape[-1])[valid]))
        assert bool((got.topk_ids.cpu()[~valid] == -7).all())
        rows = got.quantized().dequantize() if dispatch_format else got.hidden_states.float()
        buffer = ep.get_combine_input_buffer()
        with world.stream(r).activate():
            buffer.copy_(rows.to(torch.bfloat16))
        outputs.append(ep.combine(buffer))
        buffers.append(buffer.view(len(counts), rt, HIDDEN))  # the combine plane: no later round rewrites it
    world.synchronize()
    want = reference.combine([b.cpu() for b in buffers], expected.routing, counts)
    for r in range(len(counts)):
        assert outputs[r].shape == (counts[r], HIDDEN)
        assert torch.equal(as_bytes(outputs[r].cpu()), as_bytes(want[r])), f"rank {r}"


def test_staged_combine_and_low_precision(device):
    counts, rt = [2, 4], 4
    world, group = make_group(device, 2, low_precision_combine=True)
    ids, hidden, weights = draw(counts, seed=9)
    received = [ep.dispatch(hidden[r].to(world.device), ids[r].to(world.device), runtime_max_tokens_per_rank=rt)
                for r, ep in enumerate(group)]  # fmt: skip
    world.synchronize()
    assert received[0].topk_weights is None
    outputs = [ep.combine(got.hidden_states.view(2, rt, HIDDEN).clone()) for ep, got in zip(group, received)]
    world.synchronize()
    expected = reference.dispatch([i.to(torch.int32) for i in ids], [[h] for h in hidden], NUM_EXPERTS, rt)
    want = reference.combine([g.hidden_states.view(2, rt, HIDDEN).float().cpu() for g in received], expected.routing,
                             counts)  # fmt: skip
    for r in range(2):
        bound = TOP_K * max(h.abs().max().item() for h in hidden) / 16  # fp8 e4m3 per row
        assert (outputs[r].float().cpu() - want[r]).abs().max().item() <= bound


def test_call_order_and_arguments(device):
    world, group = make_group(device, 1)
    ids, hidden, weights = draw([2])
    ids, hidden, weights = ([t.to(world.device) for t in ts] for ts in (ids, hidden, weights))
    ep = group[0]
    with pytest.raises(RuntimeError, match="before dispatch"):
        ep.combine(torch.zeros(MAX_TOKENS, HIDDEN, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="runtime_max_tokens_per_rank"):
        ep.dispatch(hidden[0], ids[0], runtime_max_tokens_per_rank=MAX_TOKENS + 1)
    with pytest.raises(ValueError, match="dispatch_format"):
        ep.dispatch(hidden[0], ids[0], hidden_states_scale=torch.ones(2, 1, device=world.device))
    got = ep.dispatch(hidden[0], ids[0], weights[0])
    with pytest.raises(RuntimeError, match="twice"):
        ep.dispatch(hidden[0], ids[0], weights[0])
    out = ep.combine(got.hidden_states.view(1, MAX_TOKENS, HIDDEN).clone())
    assert out.shape == (2, HIDDEN)
    with pytest.raises(ValueError, match="EpParams.dtype"):
        a2a.EpParams(NUM_EXPERTS, TOP_K, MAX_TOKENS, HIDDEN, dtype=torch.int8)
