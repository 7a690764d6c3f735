"""a2a.quantization: fp8 / nvfp4 round trips within their bounds, exact cases, bad input, dispatch.

The bounds checked are the ones the module docstring promises (elementwise, and relative to each
row's or block's amax); the last test sends quantized payloads through a simulated dispatch and
combine on the CPU and compares them bit for bit with `a2a.reference`.
"""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a import reference
from a2a.quantization import (
    E2M1_VALUES,
    FP8_DTYPE,
    FP8_E4M3_MAX,
    QuantFormat,
    QuantizedActivation,
    e2m1_codes_to_float,
    quantize,
    quantize_fp8_per_block,
    quantize_fp8_per_token,
    quantize_nvfp4,
)

FP8_FORMATS = [QuantFormat.FP8_PER_TOKEN, QuantFormat.FP8_PER_BLOCK]
FP32_SLACK = 2.0**-22  # fp32 rounding of x / scale and of values * scale


def wide_range_input(num_tokens: int, hidden_size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows and blocks spanning ~1e-3 .. 1e3, an all-zero row, and a row with one outlier."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden_size, generator=generator)
    x *= 10.0 ** torch.randint(-3, 4, (num_tokens, 1), generator=generator)
    block_factors = 10.0 ** torch.randint(-2, 1, (num_tokens, hidden_size // 16), generator=generator)
    x *= block_factors.repeat_interleave(16, dim=1)
    x[0] = 0.0
    x[1, 5] = 3e4 if dtype != torch.float16 else 6e4
    return x.to(dtype)


def scales_per_element(q: QuantizedActivation) -> torch.Tensor:
    """The dequantization scale of every element, `[n, H]` fp32."""
    block = q.format.block_size or q.hidden_size
    scales = q.scales.to(torch.float32)
    if q.format is QuantFormat.NVFP4:
        scales = scales * q.global_scale
    return scales.repeat_interleave(block, dim=-1)


def block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    n, h = x.shape
    return x.abs().reshape(n, h // block, block).amax(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=lambda f: f.value)
def test_fp8_round_trip_within_bound(fmt, dtype):
    x = wide_range_input(37, 384, dtype, seed=1)
    q = quantize(x, fmt)
    assert q.values.dtype == FP8_DTYPE and q.values.shape == x.shape and q.scales.dtype == torch.float32
    x32 = x.float()
    error = (q.dequantize() - x32).abs()
    s = scales_per_element(q)
    bound = torch.maximum(x32.abs() * 2.0**-4, s * 2.0**-10) + x32.abs() * FP32_SLACK
    assert (error <= bound).all(), f"worst ratio {(error / bound).max().item():.3f}"
    block = fmt.block_size or x.shape[1]
    amax = block_amax(x32, block)
    relative = block_amax(error, block) / torch.where(amax > 0, amax, 1.0)
    assert relative.max() <= 2.0**-4 + FP32_SLACK
    assert relative.max() > 2.0**-7, "error suspiciously small: was the input quantized at all?"
    assert torch.equal(q.dequantize()[0], torch.zeros(x.shape[1])), "an all-zero row must stay zero"
    assert torch.equal(q.dequantize(torch.bfloat16), q.dequantize().to(torch.bfloat16))


def test_fp8_per_block_beats_per_token_on_mixed_blocks():
    # One block per row 1e6 louder: with per-token scales the quiet block falls below fp8's
    # smallest subnormal (2^-9 * scale) and is lost; per-block scales keep it at 2^-4 relative.
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    x[:, :128] *= 1e6
    quiet = slice(128, 256)
    per_token = (quantize_fp8_per_token(x).dequantize() - x)[:, quiet].abs().max()
    per_block = (quantize_fp8_per_block(x).dequantize() - x)[:, quiet].abs().max()
    assert per_block * 10 < per_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_round_trip_within_bound(dtype):
    x = wide_range_input(29, 256, dtype, seed=2)
    q = quantize_nvfp4(x)
    assert q.values.shape == (29, 128) and q.values.dtype == torch.uint8
    assert q.scales.shape == (29, 16) and q.scales.dtype == FP8_DTYPE
    assert q.global_scale.shape == (29, 1) and q.global_scale.dtype == torch.float32
    x32 = x.float()
    gs = q.global_scale[0, 0]
    assert torch.equal(gs, x32.abs().max() / (6 * FP8_E4M3_MAX)) and (q.global_scale == gs).all()
    error = (q.dequantize() - x32).abs()
    amax = block_amax(x32, 16)
    normal = amax >= 2.0**-6 * 6 * gs  # ideal block scale in fp8's normal range
    assert 0 < normal.sum() < normal.numel(), "the input should exercise both kinds of blocks"
    normal_elements = normal.repeat_interleave(16, dim=1)
    s = scales_per_element(q)
    bound = torch.maximum(x32.abs(), s) / 4 * (1 + FP32_SLACK)
    assert (error <= bound)[normal_elements].all(), f"worst ratio {(error / bound)[normal_elements].max().item():.3f}"
    relative = block_amax(error, 16)[normal] / amax[normal]
    assert 0.02 < relative.max() <= 0.18
    assert (block_amax(error, 16)[~normal] <= 2.0**-6 * gs).all()


def test_fp8_exactly_representable_values_round_trip_exactly():
    generator = torch.Generator().manual_seed(4)
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite()]
    pick = lambda *shape: grid[torch.randint(0, grid.numel(), shape, generator=generator)]  # noqa: E731
    # Per token: every row holds grid values and its amax 448, times a power of two.
    x = pick(6, 256)
    x[:, 7] = -FP8_E4M3_MAX
    x *= 2.0 ** torch.arange(-3, 3, dtype=torch.float32)[:, None]
    assert torch.equal(quantize_fp8_per_token(x).dequantize(), x)
    # Per block: each 128-block holds its own amax 448, times its own power of two.
    x = pick(4, 384)
    x[:, ::128] = FP8_E4M3_MAX
    x *= (2.0 ** torch.randint(-6, 6, (4, 3), generator=generator).float()).repeat_interleave(128, dim=1)
    q = quantize_fp8_per_block(x)
    assert torch.equal(q.dequantize(), x)
    assert torch.equal(q.values.float(), x / q.scales.repeat_interleave(128, dim=1))


def test_nvfp4_exactly_representable_values_round_trip_exactly():
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (6, 64), generator=generator)
    codes[:, ::16] = 7  # every block reaches +6, so its ideal block scale is exact
    # Block amax 6 * 448 * 2^j with j = 0 somewhere: global scale 1, block scales 448 * 2^j, all exact.
    powers = torch.randint(-8, 1, (6, 4), generator=generator)
    powers[0, 0] = 0
    x = e2m1_codes_to_float(codes) * FP8_E4M3_MAX * (2.0 ** powers.float()).repeat_interleave(16, dim=1)
    q = quantize_nvfp4(x)
    assert q.global_scale[0, 0].item() == 1.0
    assert torch.equal(q.dequantize(), x)
    assert torch.equal(e2m1_codes_to_float(q.values & 0xF), e2m1_codes_to_float(codes[:, 0::2]))
    assert torch.equal(e2m1_codes_to_float(q.values >> 4), e2m1_codes_to_float(codes[:, 1::2]))


def test_nvfp4_packing_layout_and_ties_to_even():
    # Global scale 1 and a 6 in the block: block scale exactly 1, so x is rounded as it is.
    midpoints = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    nearest_even = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = [6.0, -0.5, *midpoints, *[-m for m in midpoints][:6], 100.0]  # 16 elements; 100 saturates
    want = [6.0, -0.5, *nearest_even, *[-v for v in nearest_even][:6], 6.0]
    q = quantize_nvfp4(torch.tensor([row]), global_scale=1.0)
    assert q.scales.float().item() == pytest.approx(100.0 / 6, rel=2.0**-4)  # amax 100 sets the scale ...
    q = quantize_nvfp4(torch.tensor([row[:-1] + [6.0]]), global_scale=1.0)  # ... so use amax 6 instead
    assert q.scales.float().item() == 1.0
    assert torch.equal(q.dequantize(), torch.tensor([want]))
    assert q.values[0, 0].item() == (0x8 | 1) << 4 | 7  # low nibble 6.0 (code 7), high nibble -0.5
    assert torch.equal(e2m1_codes_to_float(torch.arange(8)), torch.tensor(E2M1_VALUES))


def test_payload_bytes_match_payloads():
    x = torch.randn(3, 256)
    for fmt in QuantFormat:
        q = quantize(x, fmt)
        assert len(q.payloads()) == fmt.num_payloads
        assert [p.shape[1] * p.element_size() for p in q.payloads()] == fmt.payload_bytes_per_token(256)
        assert all(p.is_contiguous() and p.dim() == 2 for p in q.payloads())


def test_empty_batch():
    for fmt in QuantFormat:
        q = quantize(torch.zeros(0, 128), fmt)
        assert q.dequantize().shape == (0, 128)


def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 256)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize_fp8_per_token([[1.0]])
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got torch.int32"):
        quantize_fp8_per_token(x.int())
    with pytest.raises(ValueError, match=r"x must be 2-D .*got shape \[4, 2, 128\]"):
        quantize_fp8_per_block(x.view(4, 2, 128))
    with pytest.raises(ValueError, match=r"hidden_size\) must be a positive multiple of 128 .*got 192"):
        quantize_fp8_per_block(x[:, :192].contiguous())
    with pytest.raises(ValueError, match=r"hidden_size\) must be a positive multiple of 16 for nvfp4, got 200"):
        quantize_nvfp4(torch.randn(2, 200))
    with pytest.raises(ValueError, match="hidden_size must be a positive multiple of 16 for nvfp4, got 24"):
        QuantFormat.NVFP4.payload_bytes_per_token(24)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="global_scale must be a positive finite number"):
            quantize_nvfp4(x, global_scale=bad)
    with pytest.raises(TypeError, match="global_scale must be None, a float or a tensor, got bool"):
        quantize_nvfp4(x, global_scale=True)
    with pytest.raises(ValueError, match="global_scale must hold one value"):
        quantize_nvfp4(x, global_scale=torch.ones(2))
    with pytest.raises(TypeError, match="format must be a QuantFormat"):
        quantize(x, "fp8")


def test_malformed_quantized_activation_raises():
    q = quantize_fp8_per_block(torch.randn(4, 256))
    with pytest.raises(TypeError, match="values must be float8_e4m3fn, got torch.uint8"):
        QuantizedActivation(QuantFormat.FP8_PER_BLOCK, q.values.view(torch.uint8), q.scales)
    with pytest.raises(ValueError, match=r"scales must have shape \[4, 2\] .*got \[4, 1\]"):
        QuantizedActivation(QuantFormat.FP8_PER_BLOCK, q.values, q.scales[:, :1])
    with pytest.raises(ValueError, match="global_scale is only used by nvfp4"):
        QuantizedActivation(QuantFormat.FP8_PER_BLOCK, q.values, q.scales, torch.ones(4, 1))
    with pytest.raises(ValueError, match="multiple of 128"):
        QuantizedActivation(QuantFormat.FP8_PER_BLOCK, q.values[:, :200], q.scales)
    n4 = quantize_nvfp4(torch.randn(4, 64))
    with pytest.raises(TypeError, match="global_scale must be a torch.Tensor, got NoneType"):
        QuantizedActivation(QuantFormat.NVFP4, n4.values, n4.scales)
    with pytest.raises(ValueError, match=r"global_scale must have shape \[4, 1\]"):
        QuantizedActivation(QuantFormat.NVFP4, n4.values, n4.scales, n4.global_scale[:2])
    with pytest.raises(ValueError, match="planes must hold 3 tensors for nvfp4, got 2"):
        QuantizedActivation.from_payloads(QuantFormat.NVFP4, n4.payloads()[:2])


def test_quantized_payloads_through_simulated_dispatch_and_combine(device):
    """fp8 per-block + nvfp4 payloads ride a 3-rank round on the test device; receive planes match
    the reference bit for bit, rebuilt activations dequantize to their source rows, and combine
    matches too."""
    ep_size, hidden, top_k, num_experts, counts, rt = 3, 256, 2, 7, [5, 0, 7], 7
    generator = torch.Generator().manual_seed(6)
    experts, payloads, fp8s, nvfp4s = [], [], [], []
    for n in counts:
        ids = torch.rand(n, num_experts, generator=generator).topk(top_k, dim=1).indices.to(torch.int32)
        x = torch.randn(n, hidden, generator=generator).to(torch.bfloat16)
        fp8, nvfp4 = quantize_fp8_per_block(x), quantize_nvfp4(x)
        experts.append(ids)
        fp8s.append(fp8)
        nvfp4s.append(nvfp4)
        payloads.append([*fp8.payloads(), ids, *nvfp4.payloads()])
    row_bytes = [p.shape[1] * p.element_size() for p in payloads[0]]
    size = a2a.moe_a2a_get_workspace_size_per_rank(ep_size, rt, row_bytes, 2 * hidden)
    world = a2a.SimulatedWorld(ep_size, device)
    ranks = [
        a2a.MoeAlltoAll(a2a.Mapping(ep_size, r), rt, top_k, num_experts, size, world=world) for r in range(ep_size)
    ]
    recv = [
        ranks[r].dispatch(experts[r].to(device), [p.to(device) for p in payloads[r]], rt, invalid_token_expert_id=-1,
                          expert_id_payload_index=2)
        for r in range(ep_size)
    ]  # fmt: skip
    world.synchronize()
    recv = [[plane.cpu() for plane in planes] for planes in recv]
    expected = reference.dispatch(experts, payloads, num_experts, rt)
    planes, outputs = [], []
    for r in range(ep_size):
        valid = expected.valid_rows(r)
        assert int(valid.sum()) > 0, "every rank should receive something with this seed"
        for p, (got, want) in enumerate(zip(recv[r], expected.recv_payloads[r])):
            assert got.dtype == want.dtype and got.shape == want.shape, (r, p)
            assert torch.equal(got[valid].view(torch.uint8), want[valid].view(torch.uint8)), f"payload {p} rank {r}"
        # Which source token each valid receive row holds, from the reference routing.
        rows, sources = [], []
        for source, route in enumerate(expected.routing):
            token, k = torch.nonzero(route.topk_target_ranks == r, as_tuple=True)
            rows.append(source * rt + route.topk_send_indices[token, k].long())
            sources.append((source, token))
        rows = torch.cat(rows)
        received_fp8 = QuantizedActivation.from_payloads(QuantFormat.FP8_PER_BLOCK, recv[r][0:2]).gather_rows(rows)
        received_nvfp4 = QuantizedActivation.from_payloads(QuantFormat.NVFP4, recv[r][3:6]).gather_rows(rows)
        want_fp8 = torch.cat([fp8s[s].dequantize()[t] for s, t in sources])
        want_nvfp4 = torch.cat([nvfp4s[s].dequantize()[t] for s, t in sources])
        assert torch.equal(received_fp8.dequantize(), want_fp8), f"fp8 rows of rank {r}"
        assert torch.equal(received_nvfp4.dequantize(), want_nvfp4), f"nvfp4 rows of rank {r}"
        # Toy experts: each received row sends back its fp8 dequantization.
        plane = ranks[r].get_combine_payload_tensor_in_workspace(rt, hidden, torch.bfloat16)
        out = torch.zeros(ep_size * rt, hidden)
        out[rows] = received_fp8.dequantize()
        plane.copy_(out.view(ep_size, rt, hidden).to(torch.bfloat16))
        planes.append(plane)
        outputs.append(plane.cpu().clone())
    world.synchronize()
    combined = [ranks[r].combine(planes[r], rt, payload_in_workspace=True) for r in range(ep_size)]
    world.synchronize()
    combined = [c.cpu() for c in combined]
    want = reference.combine(outputs, expected.routing, counts)
    for r in range(ep_size):
        assert torch.equal(combined[r].view(torch.uint8), want[r].view(torch.uint8)), f"combine of rank {r}"
        if counts[r]:  # each token came back once per distinct target rank
            targets = (expected.routing[r].topk_target_ranks >= 0).sum(dim=1, keepdim=True).float()
            torch.testing.assert_close(combined[r].float(), fp8s[r].dequantize() * targets, rtol=2**-7, atol=0)
