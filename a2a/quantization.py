"""Quantized activations carried through dispatch as separate payloads (pure torch, any device).

An engine that runs its expert GEMMs in fp8 or nvfp4 quantizes the hidden states *before*
dispatch, so each token crosses the network in 1 (fp8) or about 0.56 (nvfp4) bytes per element
instead of 2. Dispatch copies raw bytes of any dtype, so the quantized values and their scales go
as separate `[num_tokens, W]` payloads and arrive as `[ep_size, rt, W]` receive planes; the
receiving rank rebuilds a `QuantizedActivation` from those planes and dequantizes (or hands them
to its GEMM). fp8 tensors go into dispatch as they are (no uint8 view needed: dispatch moves bytes;
tests/test_quantization.py checks the planes bit for bit against `a2a.reference.dispatch`).

Formats (`QuantFormat`), for `x` of shape `[num_tokens, hidden_size]`:

| format | values | scales | global_scale | element = |
|---|---|---|---|---|
| `FP8_PER_TOKEN` | `[n, H]` fp8 e4m3 | `[n, 1]` fp32 | None | `values * scale` |
| `FP8_PER_BLOCK` | `[n, H]` fp8 e4m3 | `[n, H/128]` fp32 (per 128 elements) | None | `values * scale` |
| `NVFP4` | `[n, H/2]` uint8 | `[n, H/16]` fp8 e4m3 (per 16 elements) | `[n, 1]` fp32 | `e2m1 * scale * global_scale` |

nvfp4 packing: element `2i` in the low nibble of byte `i`, element `2i + 1` in the high nibble; a
nibble is `sign << 3 | code`, code indexing `E2M1_VALUES`. Scales are kept in plain row-major
layout (GEMM libraries that want a swizzled scale layout reorder them after the receive). The
global scale is one value per quantize call (per tensor) but travels as one fp32 per token, so
rows from ranks that chose different global scales can be dequantized side by side.

Error bounds (round to nearest even everywhere; `s` = the dequantization scale of the element's
row or block, in real units; fp32 rounding of `x / s` adds at most 2^-23 relative):

- fp8 e4m3 (3 mantissa bits): `|x - x_hat| <= max(2^-4 * |x|, 2^-10 * s)`; with `s = amax / 448`
  that is at most `amax / 16` per row (per-token) or per 128-element block (per-block).
- nvfp4: e2m1 holds {0, 0.5, 1, 1.5, 2, 3, 4, 6}, so rounding costs at most half a gap:
  `|x - x_hat| <= max(|x|, s) / 4` with `s = fp8(block_scale) * global_scale`. The block scale
  `block_amax / (6 * global_scale)` is rounded to the nearest fp8. While it is a normal fp8 number
  (block amax >= 2^-6 * 6 * global_scale, i.e. >= ~3.5e-5 of the tensor amax with the default
  global scale) it is off by at most 2^-4 relative, elements with |x / s| up to 6 * (1 + 2^-4)
  saturate at +-6 within the same bound, and the error is at most `s <= 0.18 * block_amax`.
  Quieter blocks get a subnormal (or zero) block scale: there only
  `|x - x_hat| <= 2^-6 * global_scale` holds. A caller-supplied global scale below
  `amax / (6 * 448)` saturates block scales at 448 and clips: the bounds then no longer hold.

Non-finite inputs produce non-finite scales (not checked here: a check would synchronise the GPU).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
FP8_BLOCK_SIZE = 128  # elements per scale in FP8_PER_BLOCK
NVFP4_BLOCK_SIZE = 16  # elements per fp8 scale in NVFP4
E2M1_MAX = 6.0
# The eight magnitudes of fp4 e2m1 (1 sign, 2 exponent, 1 mantissa bit), indexed by the 3-bit code.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring codes; a tie rounds to the even code (IEEE round to nearest even).
# A midpoint whose lower neighbour has an even code keeps ties below it ("down"), otherwise above.
_E2M1_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)  # lower neighbours: codes 0, 2, 4, 6
_E2M1_TIES_UP = (0.75, 1.75, 3.5)  # lower neighbours: codes 1, 3, 5
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SfLayout(enum.IntEnum):
    """Layouts of the scale factors of a quantized output, FlashInfer's names and values (its own
    `SfLayout` is accepted too: IntEnums compare by value). a2a's combine writes unquantized
    outputs, which take `layout_linear` (the default)."""

    layout_128x4 = 0
    layout_8x4 = 1
    layout_linear = 2


class QuantFormat(enum.Enum):
    """How a quantized activation is encoded (see the module docstring for shapes)."""

    FP8_PER_TOKEN = "fp8_per_token"
    FP8_PER_BLOCK = "fp8_per_block128"
    NVFP4 = "nvfp4"

    @property
    def num_payloads(self) -> int:
        """Dispatch payloads per activation: values + scales (+ the per-row global scale for nvfp4)."""
        return 3 if self is QuantFormat.NVFP4 else 2

    @property
    def block_size(self) -> int:
        """Elements sharing one scale along the hidden dimension (0: the whole row)."""
        return {QuantFormat.FP8_PER_TOKEN: 0, QuantFormat.FP8_PER_BLOCK: FP8_BLOCK_SIZE}.get(self, NVFP4_BLOCK_SIZE)

    def payload_bytes_per_token(self, hidden_size: int) -> list[int]:
        """Bytes per token of each payload, in `payloads()` order (to size a workspace)."""
        _check_hidden_size("hidden_size", hidden_size, self)
        if self is QuantFormat.FP8_PER_TOKEN:
            return [hidden_size, 4]
        if self is QuantFormat.FP8_PER_BLOCK:
            return [hidden_size, 4 * (hidden_size // FP8_BLOCK_SIZE)]
        return [hidden_size // 2, hidden_size // NVFP4_BLOCK_SIZE, 4]


@dataclass(frozen=True)
class QuantizedActivation:
    """A quantized `[..., hidden_size]` activation: values, scales and (nvfp4) per-row global scales.

    Fields share their leading dims: `[num_tokens]` after quantizing, `[ep_size, rt]` when rebuilt
    from receive planes. Shapes and dtypes per `format` are in the module docstring; the
    constructor checks them. Rows of a receive plane past a source's count hold stale bytes:
    dequantize only the rows you use (`gather_rows`).
    """

    format: QuantFormat
    values: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.format, QuantFormat):
            raise TypeError(f"format must be a QuantFormat, got {type(self.format).__name__}")
        nvfp4 = self.format is QuantFormat.NVFP4
        values = _require_tensor("values", self.values, torch.uint8 if nvfp4 else FP8_DTYPE, min_dim=1)
        hidden_size = values.shape[-1] * (2 if nvfp4 else 1)
        lead = tuple(values.shape[:-1])
        scale_dtype = FP8_DTYPE if nvfp4 else torch.float32
        scales = _require_tensor("scales", self.scales, scale_dtype, min_dim=1)
        block = self.format.block_size
        num_blocks = 1 if block == 0 else hidden_size // block
        if block and hidden_size % block:
            raise ValueError(
                f"values imply hidden size {hidden_size}, which must be a multiple of {block} for {self.format.value}"
            )
        if tuple(scales.shape) != (*lead, num_blocks):
            raise ValueError(
                f"scales must have shape {[*lead, num_blocks]} for values of shape {list(values.shape)} "
                f"({self.format.value}), got {list(scales.shape)}"
            )
        if nvfp4:
            global_scale = _require_tensor("global_scale", self.global_scale, torch.float32, min_dim=1)
            if tuple(global_scale.shape) != (*lead, 1):
                raise ValueError(
                    f"global_scale must have shape {[*lead, 1]} (one per row), got {list(global_scale.shape)}"
                )
        elif self.global_scale is not None:
            raise ValueError(f"global_scale is only used by nvfp4, got one for {self.format.value}")

    @property
    def hidden_size(self) -> int:
        return self.values.shape[-1] * (2 if self.format is QuantFormat.NVFP4 else 1)

    def payloads(self) -> list[torch.Tensor]:
        """The tensors to append to dispatch's `input_payloads`, in order: values, scales
        (, global_scale). Each is 2-D and contiguous when this activation came from `quantize_*`."""
        planes = [self.values, self.scales]
        if self.global_scale is not None:
            planes.append(self.global_scale)
        return planes

    @classmethod
    def from_payloads(cls, format: QuantFormat, planes: Sequence[torch.Tensor]) -> QuantizedActivation:
        """Rebuild from the receive planes (`[ep_size, rt, W]` views) of the payloads that
        `payloads()` produced, in the same order. The views are not copied."""
        if not isinstance(format, QuantFormat):
            raise TypeError(f"format must be a QuantFormat, got {type(format).__name__}")
        if len(planes) != format.num_payloads:
            raise ValueError(f"planes must hold {format.num_payloads} tensors for {format.value}, got {len(planes)}")
        return cls(format, *planes)

    def gather_rows(self, row_indices: torch.Tensor) -> QuantizedActivation:
        """The rows `row_indices` (int64 `[m]`) of the leading dims flattened, as a `[m, ...]`
        activation: for a receive plane, row `source * rt + slot`."""
        pick = lambda t: t.reshape(-1, t.shape[-1])[row_indices]  # noqa: E731
        global_scale = None if self.global_scale is None else pick(self.global_scale)
        return QuantizedActivation(self.format, pick(self.values), pick(self.scales), global_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`[..., hidden_size]` in `dtype` (math in fp32); see the module docstring for the error."""
        lead, hidden_size = tuple(self.values.shape[:-1]), self.hidden_size
        if self.format is QuantFormat.NVFP4:
            elements = _unpack_e2m1(self.values)  # [..., H] fp32
            block_scales = self.scales.to(torch.float32) * self.global_scale
        else:
            elements = self.values.to(torch.float32)
            block_scales = self.scales
        block = self.format.block_size or hidden_size
        blocks = elements.reshape(*lead, hidden_size // block, block) * block_scales.unsqueeze(-1)
        return blocks.reshape(*lead, hidden_size).to(dtype)


def quantize(x: torch.Tensor, format: QuantFormat) -> QuantizedActivation:
    """Quantize `x` `[num_tokens, hidden_size]` (fp32 / bf16 / fp16) to `format` with default scales."""
    if format is QuantFormat.FP8_PER_TOKEN:
        return quantize_fp8_per_token(x)
    if format is QuantFormat.FP8_PER_BLOCK:
        return quantize_fp8_per_block(x)
    if format is QuantFormat.NVFP4:
        return quantize_nvfp4(x)
    raise TypeError(f"format must be a QuantFormat, got {format!r}")


def quantize_fp8_per_token(x: torch.Tensor) -> QuantizedActivation:
    """fp8 e4m3 values `[n, H]` with one fp32 scale per token `[n, 1]` (row amax / 448).

    An all-zero row gets scale 1. Error: at most `row_amax / 16` per element (module docstring)."""
    x = _check_input(x, QuantFormat.FP8_PER_TOKEN)
    values, scales = _quantize_fp8_blocks(x.to(torch.float32).unsqueeze(1))  # one block per row
    return QuantizedActivation(QuantFormat.FP8_PER_TOKEN, values.reshape(x.shape), scales.reshape(-1, 1))


def quantize_fp8_per_block(x: torch.Tensor) -> QuantizedActivation:
    """fp8 e4m3 values `[n, H]` with one fp32 scale per 128 elements `[n, H/128]` (block amax / 448).

    `H` must be a multiple of 128. Error: at most `block_amax / 16` per element."""
    x = _check_input(x, QuantFormat.FP8_PER_BLOCK)
    num_tokens, hidden_size = x.shape
    blocks = x.to(torch.float32).reshape(num_tokens, hidden_size // FP8_BLOCK_SIZE, FP8_BLOCK_SIZE)
    values, scales = _quantize_fp8_blocks(blocks)
    return QuantizedActivation(QuantFormat.FP8_PER_BLOCK, values.reshape(x.shape), scales)


def quantize_nvfp4(x: torch.Tensor, global_scale: float | torch.Tensor | None = None) -> QuantizedActivation:
    """nvfp4: e2m1 codes packed two a byte `[n, H/2]` uint8, fp8 e4m3 block scales `[n, H/16]`,
    and the per-tensor fp32 `global_scale` repeated per row `[n, 1]`.

    `global_scale` defaults to `amax(x) / (6 * 448)` (1 for an all-zero `x`), so every block scale
    fits fp8; a caller-supplied one (e.g. a calibrated per-layer constant; a positive float or a
    one-element fp32 tensor, not checked for sign to avoid a GPU sync) must not be smaller than
    that, or large elements clip. `H` must be a multiple of 16. Error: module docstring.
    """
    x = _check_input(x, QuantFormat.NVFP4)
    num_tokens, hidden_size = x.shape
    x32 = x.to(torch.float32)
    if global_scale is None:
        amax = x32.abs().amax() if x32.numel() else torch.zeros((), device=x.device)
        gs = torch.where(amax > 0, amax / (E2M1_MAX * FP8_E4M3_MAX), 1.0)
    elif isinstance(global_scale, torch.Tensor):
        gs = _require_tensor("global_scale", global_scale, torch.float32).reshape(-1)
        if gs.numel() != 1:
            raise ValueError(f"global_scale must hold one value (per tensor), got shape {list(global_scale.shape)}")
        gs = gs[0].to(x.device)
    elif isinstance(global_scale, (int, float)) and not isinstance(global_scale, bool):
        if not (math.isfinite(global_scale) and global_scale > 0):
            raise ValueError(f"global_scale must be a positive finite number, got {global_scale!r}")
        gs = torch.tensor(float(global_scale), dtype=torch.float32, device=x.device)
    else:
        raise TypeError(f"global_scale must be None, a float or a tensor, got {type(global_scale).__name__}")
    blocks = x32.reshape(num_tokens, hidden_size // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    block_amax = blocks.abs().amax(dim=-1)  # [n, H/16]
    # Ideal block scale maps the block amax to 6; round it to nearest fp8 (saturating at 448).
    ideal = (block_amax / (E2M1_MAX * gs)).clamp(max=FP8_E4M3_MAX)
    scales = ideal.to(FP8_DTYPE)  # [n, H/16]
    effective = scales.to(torch.float32) * gs  # the scale dequantization will use
    scaled = torch.where(effective[..., None] > 0, blocks / effective[..., None], 0.0)
    codes = _round_to_e2m1(scaled).reshape(num_tokens, hidden_size)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    global_rows = gs.reshape(1, 1).expand(num_tokens, 1).contiguous()
    return QuantizedActivation(QuantFormat.NVFP4, packed, scales, global_rows)


def e2m1_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """fp32 value of 4-bit e2m1 codes (`sign << 3 | magnitude code`), any integer dtype, any shape."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.to(torch.int64) & 0xF]


def _round_to_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """4-bit codes (int32) of fp32 values, rounded to the nearest e2m1 (ties to even), saturating at 6."""
    magnitude = scaled.abs()
    code = torch.zeros_like(magnitude, dtype=torch.int32)
    for midpoint in _E2M1_TIES_DOWN:
        code += (magnitude > midpoint).to(torch.int32)
    for midpoint in _E2M1_TIES_UP:
        code += (magnitude >= midpoint).to(torch.int32)
    sign = (scaled < 0).to(torch.int32) << 3
    return sign | code


def _unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """`[..., H/2]` uint8 -> `[..., H]` fp32 (low nibble first)."""
    low = e2m1_codes_to_float(packed & 0xF)
    high = e2m1_codes_to_float(packed >> 4)
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _quantize_fp8_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[..., B]` -> (fp8 `[..., B]`, fp32 scales `[...]`), scale = block amax / 448 (1 if 0)."""
    scales = blocks.abs().amax(dim=-1) / FP8_E4M3_MAX
    # Zero blocks, and amax so small that amax / 448 underflows, take scale 1 (their values are ~0).
    scales = torch.where(scales > 0, scales, 1.0)
    # Clamp: fp32 rounding of x / scale can exceed 448 by an ulp; e4m3fn has no infinity.
    values = (blocks / scales[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return values, scales


def _check_hidden_size(name: str, hidden_size: object, format: QuantFormat) -> int:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
        raise TypeError(f"{name} must be an int, got {type(hidden_size).__name__}")
    block = format.block_size
    if hidden_size <= 0 or (block and hidden_size % block):
        rule = f"a positive multiple of {block}" if block else "positive"
        raise ValueError(f"{name} must be {rule} for {format.value}, got {hidden_size}")
    return hidden_size


def _check_input(x: object, format: QuantFormat) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [num_tokens, hidden_size], got shape {list(x.shape)}")
    _check_hidden_size("x.shape[1] (hidden_size)", x.shape[1], format)
    return x


def _require_tensor(name: str, value: object, dtype: torch.dtype, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {list(value.shape)}")
    return value


__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "FP8_BLOCK_SIZE",
    "FP8_DTYPE",
    "FP8_E4M3_MAX",
    "NVFP4_BLOCK_SIZE",
    "QuantFormat",
    "QuantizedActivation",
    "e2m1_codes_to_float",
    "quantize",
    "quantize_fp8_per_block",
    "quantize_fp8_per_token",
    "quantize_nvfp4",
]
