"""Low-precision combine: fp8 e4m3 expert outputs with one fp32 scale per row, dequantized and summed
in fp32 on the receiving rank; in the workspace and staged; against the reference."""

from __future__ import annotations

import pytest
import torch

import a2a
from a2a import reference
from a2a.quantization import quantize_fp8_per_token

EP, TOP_K, EXPERTS, HIDDEN, RT = 3, 4, 9, 64, 7
COUNTS = [7, 0, 4]
BF16_ULP = 2**-7  # relative: one bf16 rounding step (the kernel may fuse multiply and add)


def _quantize_planes(outputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each rank's [EP, RT, H] outputs as fp8 rows + [EP, RT, 1] fp32 scales."""
    quantized = []
    for out in outputs:
        q = quantize_fp8_per_token(out.reshape(-1, HIDDEN))
        quantized.append((q.values.view(EP, RT, HIDDEN), q.scales.view(EP, RT, 1)))
    return quantized


@pytest.mark.parametrize("in_workspace", [True, False], ids=["in_workspace", "staged"])
def test_fp8_combine_matches_the_reference(device, in_workspace):
    world = a2a.SimulatedWorld(EP, device)
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(EP, r), RT, TOP_K, EXPERTS, hidden_size=HIDDEN, world=world) for r in range(EP)]
    generator = torch.Generator().manual_seed(5)
    experts = [torch.rand(n, EXPERTS, generator=generator).topk(TOP_K, dim=1).indices.to(torch.int32) for n in COUNTS]
    outputs = [torch.randn(EP, RT, HIDDEN, generator=generator) * (r + 1) for r in range(EP)]
    quantized = _quantize_planes(outputs)
    for moe, ids in zip(ranks, experts):
        moe.dispatch(ids.to(device), [ids.to(device)], RT)
    world.synchronize()
    combined = []
    for r, moe in enumerate(ranks):
        values, scales = quantized[r]
        if in_workspace:
            plane = moe.get_combine_payload_tensor_in_workspace(RT, HIDDEN, torch.float8_e4m3fn)
            plane_scales = moe.get_combine_scales_tensor_in_workspace(RT, HIDDEN)
            with world.stream(r).activate():
                plane.copy_(values.to(device))
                plane_scales.copy_(scales.to(device))
            values, scales = plane, plane_scales
        else:
            values, scales = values.to(device), scales.to(device)
        poisoned = torch.full((COUNTS[r], HIDDEN), float("nan"), dtype=torch.bfloat16, device=device)
        combined.append(moe.combine(values, RT, payload_in_workspace=in_workspace, payload_scales=scales, output=poisoned))
    world.synchronize()
    expected = reference.dispatch(experts, [[e] for e in experts], EXPERTS, RT)
    want = reference.combine([v for v, _ in quantized], expected.routing, COUNTS, [s for _, s in quantized], torch.bfloat16)
    exact = reference.combine(outputs, expected.routing, COUNTS, out_dtype=torch.float32)
    for r in range(EP):
        got = combined[r].cpu().float()
        assert got.dtype == torch.float32 and not got.isnan().any(), r
        torch.testing.assert_close(got, want[r].float(), rtol=BF16_ULP, atol=1e-6)
        # fp8 e4m3 keeps 3 mantissa bits: each row within 2^-4 of its magnitude, before the sum.
        bound = 2**-4 * reference.combine([o.abs() for o in outputs], expected.routing, COUNTS, out_dtype=torch.float32)[r]
        assert ((got - exact[r]).abs() <= bound + BF16_ULP * exact[r].abs() + 1e-6).all(), r
    for moe in ranks:
        moe._reset_workspace()


def test_fp8_combine_checks_its_scales(device):
    world = a2a.SimulatedWorld(1, device)
    moe = a2a.MoeAlltoAll(a2a.Mapping(1, 0), RT, TOP_K, EXPERTS, hidden_size=HIDDEN, world=world)
    moe.dispatch(torch.zeros(1, TOP_K, dtype=torch.int32, device=device), [torch.zeros(1, 4, device=device)], RT)
    values = torch.zeros(1, RT, HIDDEN, dtype=torch.float8_e4m3fn, device=device)
    with pytest.raises(ValueError, match="payload_scales is required"):
        moe.combine(values, RT)
    with pytest.raises(ValueError, match=r"payload_scales must have shape \[1, 7, 1\]"):
        moe.combine(values, RT, payload_scales=torch.ones(1, RT, 2, device=device))
    with pytest.raises(ValueError, match="payload_scales is only for a float8_e4m3fn payload"):
        moe.combine(values.to(torch.bfloat16), RT, payload_scales=torch.ones(1, RT, 1, device=device))
    plane = moe.get_combine_payload_tensor_in_workspace(RT, HIDDEN, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="payload_scales is not this rank's combine scales"):
        moe.combine(plane, RT, payload_in_workspace=True, payload_scales=torch.ones(1, RT, 1, device=device))
    moe.combine(plane, RT, payload_in_workspace=True, payload_scales=moe.get_combine_scales_tensor_in_workspace(RT, HIDDEN))
    world.synchronize()
    moe._reset_workspace()
