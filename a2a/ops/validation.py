"""Argument checks at the public boundary: each raises naming the argument, the rule and the value."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from a2a.layout import MAX_PAYLOADS, MAX_RANKS, MAX_TOP_K


def require_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` must be an int in [low, high] (high inclusive, None = unbounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def require_tensor(
    name: str,
    value: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if value.is_conj() or value.is_neg():  # a2a moves the memory, which does not hold such a view's values
        raise ValueError(f"{name} is a lazy conjugate or negative view (its memory does not hold its values): "
                         "pass tensor.resolve_conj().resolve_neg()")  # fmt: skip
    if dtypes is not None:
        allowed = tuple(dtypes)
        if value.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name} must be {names}, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} (the workspace's device), got {value.device}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a2a never copies it silently), got strides {value.stride()}")
    return value


def row_major(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous `tensor` with the row-major strides of its shape, nothing copied: torch calls a
    tensor contiguous whatever the strides of its size-1 dimensions (and of any dimension when it
    has no elements), while `.view(dtype)` to another element size needs row-major ones."""
    shape, stride = tensor.shape, tensor.stride()
    if len(shape) == 2 and stride[1] == 1 and stride[0] == max(shape[1], 1):
        return tensor  # the usual payload, at no more than two tuple reads a call (the CPU path's views)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    strides.reverse()
    return tensor if stride == tuple(strides) else tensor.as_strided(shape, strides)


def as_units(tensor: torch.Tensor, unit: torch.dtype) -> torch.Tensor:
    """A contiguous tensor's bytes viewed as copy units of `unit` (row_major first), nothing copied."""
    return row_major(tensor).view(torch.uint8).view(unit)


def require_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)} ({meaning}), got {list(tensor.shape)}")


def check_geometry(ep_size: int, ep_rank: int, top_k: int | None = None, num_experts: int | None = None) -> None:
    require_int("ep_size", ep_size, 1, MAX_RANKS)
    require_int("ep_rank", ep_rank, 0, ep_size - 1)
    if top_k is not None:
        require_int("top_k", top_k, 1, MAX_TOP_K)
    if num_experts is not None:
        require_int("num_experts", num_experts, ep_size)


def check_workspace(workspace: object, ep_size: int) -> torch.Tensor:
    workspace = require_tensor("workspace", workspace, dtypes=[torch.uint8], ndim=2, contiguous=False)
    if workspace.shape[0] != ep_size:
        raise ValueError(f"workspace first dim must equal ep_size={ep_size}, got {workspace.shape[0]}")
    if workspace.stride(1) != 1:
        raise ValueError(f"workspace rows must be contiguous (stride(1) == 1), got strides {workspace.stride()}")
    if workspace.shape[0] > 1 and workspace.stride(0) % 16:
        raise ValueError(f"workspace segments must be a multiple of 16 bytes apart (stride(0) % 16 == 0), got "
                         f"stride {workspace.stride(0)}: size it with moe_a2a_get_workspace_size_per_rank")
    if workspace.data_ptr() % 16:
        raise ValueError(f"workspace must start on a 16-byte boundary, got address {workspace.data_ptr():#x}")
    return workspace


def check_runtime_max_tokens(runtime_max_tokens: int, max_num_tokens: int, num_tokens: int | None = None) -> None:
    require_int("runtime_max_tokens_per_rank", runtime_max_tokens, 1, max_num_tokens)
    if num_tokens is not None and num_tokens > runtime_max_tokens:
        raise ValueError(
            f"local token count ({num_tokens}) must be <= runtime_max_tokens_per_rank ({runtime_max_tokens})"
        )


def check_payloads(input_payloads: object, num_tokens: int, device: torch.device) -> list[torch.Tensor]:
    if not isinstance(input_payloads, (list, tuple)):
        raise TypeError(f"input_payloads must be a list of tensors, got {type(input_payloads).__name__}")
    if not 1 <= len(input_payloads) <= MAX_PAYLOADS:
        raise ValueError(f"input_payloads must hold 1 to {MAX_PAYLOADS} tensors, got {len(input_payloads)}")
    payloads = []
    for index, payload in enumerate(input_payloads):
        name = f"input_payloads[{index}]"
        payload = require_tensor(name, payload, ndim=2, device=device)
        if payload.shape[0] != num_tokens:
            raise ValueError(
                f"{name} first dim must equal the local token count {num_tokens}, got {payload.shape[0]}"
            )
        if payload.shape[1] == 0:
            raise ValueError(f"{name} must have at least one element per token, got shape {list(payload.shape)}")
        payloads.append(payload)
    return payloads


def check_fits(what: str, needed: int, size_per_rank: int) -> None:
    if needed > size_per_rank:
        raise ValueError(
            f"workspace size per rank insufficient for {what}: need {needed} bytes, have {size_per_rank}"
        )


def check_active_rank_mask(mask: object, ep_size: int, ep_rank: int) -> int:
    """`mask` (bit r set: rank r takes part) as an int; None means every rank."""
    full = (1 << ep_size) - 1
    if mask is None:
        return full
    if isinstance(mask, bool) or not isinstance(mask, int):
        raise TypeError(f"active_rank_mask must be an int bitmask (bit r: rank r is active), got {type(mask).__name__}")
    if mask < 0 or mask & ~full:
        raise ValueError(f"active_rank_mask must only set bits 0..{ep_size - 1} (ep_size={ep_size}), got {mask:#x}")
    if not mask >> ep_rank & 1:
        raise ValueError(f"active_rank_mask must include this rank ({ep_rank}): an inactive rank takes no part, got {mask:#x}")
    return mask


# FlashInfer 0.7's arguments that select an implementation rather than a result.
BACKENDS = ("trtllm", "cake")


def check_backend(backend: object) -> None:
    """FlashInfer's `backend`: a2a has one implementation for every backend name FlashInfer knows."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (a2a runs the same kernels for each), got {backend!r}")


def check_enable_pdl(enable_pdl: object) -> None:
    """FlashInfer's `enable_pdl`: None (auto: on where the GPU has it) or a bool (a2a.ops.launch.use_pdl)."""
    if enable_pdl is not None and not isinstance(enable_pdl, bool):
        raise TypeError(f"enable_pdl must be None or a bool, got {type(enable_pdl).__name__}")


def rank_mask_argument(active_rank_mask: object, enable_rank_mask: object, ep_size: int) -> int | None:
    """The active-rank mask as an int (None: every rank) from FlashInfer's pair of arguments.

    FlashInfer's form: `enable_rank_mask=True` with `active_rank_mask` a CPU uint64 tensor of one
    word (`moe_a2a_active_rank_mask`) or None (every rank); with `enable_rank_mask=False` no mask
    may be given. a2a's own form: `active_rank_mask` an int bitmask, `enable_rank_mask` left False."""
    if not isinstance(enable_rank_mask, bool):
        raise TypeError(f"enable_rank_mask must be a bool, got {type(enable_rank_mask).__name__}")
    if active_rank_mask is None:
        return ((1 << ep_size) - 1) if enable_rank_mask else None
    if isinstance(active_rank_mask, torch.Tensor):
        if not enable_rank_mask:
            raise ValueError("active_rank_mask given as a tensor needs enable_rank_mask=True (as in FlashInfer)")
        if active_rank_mask.device.type != "cpu" or active_rank_mask.dtype not in (torch.uint64, torch.int64) \
                or active_rank_mask.shape != (1,):
            raise ValueError("active_rank_mask must be a CPU uint64 tensor of shape [1] (moe_a2a_active_rank_mask), "
                             f"got {active_rank_mask.device.type} {active_rank_mask.dtype} {list(active_rank_mask.shape)}")
        return int(active_rank_mask.view(torch.int64).item()) & ((1 << 64) - 1)
    return active_rank_mask  # type: ignore[return-value]  # an int (a2a's form), checked by check_active_rank_mask


COMBINE_OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_combine_output_format(output_dtype: object, output_scales: object, sf_layout: object) -> None:
    """FlashInfer's combine output format: a2a writes unquantized outputs only; a quantized one
    (fp8 / packed fp4 dtype, scale factors, a swizzled scale layout) raises rather than being ignored."""
    if output_dtype is not None and output_dtype not in COMBINE_OUTPUT_DTYPES:
        if isinstance(output_dtype, torch.dtype) and (output_dtype.is_floating_point or output_dtype == torch.uint8):
            raise NotImplementedError(f"output_dtype={output_dtype}: quantized combine outputs (fp8, packed fp4) are not "
                                      "implemented; combine to bf16 and quantize the result")  # fmt: skip
        raise ValueError(f"output_dtype must be one of {COMBINE_OUTPUT_DTYPES}, got {output_dtype!r}")
    if output_scales is not None:
        raise NotImplementedError("output_scales: quantized combine outputs (and their scale factors) are not implemented")
    if sf_layout is not None and (isinstance(sf_layout, bool) or not isinstance(sf_layout, int) or int(sf_layout) != 2):
        raise NotImplementedError(f"sf_layout={sf_layout!r}: scale-factor layouts of quantized combine outputs are not "
                                  "implemented (only the linear layout, which unquantized outputs ignore)")  # fmt: skip
