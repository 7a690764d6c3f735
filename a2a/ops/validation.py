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
