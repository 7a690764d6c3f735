"""The one drawer of round inputs, for the tests and for bench/: expert ids by routing style, payload
rows, hidden states and routing weights, the activation payload sets of the benchmark, expert
outputs. Every function draws one rank's tensor from the caller's seeded generator, on the
generator's device (`device` must match it), so a harness that draws the same sequence gets the
same bits everywhere (the process tests compare processes with a simulated world bitwise).
"""

from __future__ import annotations

import torch

from a2a.expert_partition import ExpertPartition

# How a rank picks its tokens' experts.
#   random: uniform over every expert (repeats within a token possible)
#   distinct: the top-k of uniform scores (k different experts; needs top_k <= num_experts)
#   one_rank: every pick among the experts of the next rank
#   skewed: 80 % of the picks among the first two experts (hot ranks, heavy repeats)
#   with_invalid: random, with 30 % of the picks replaced by ids outside [0, num_experts)
ROUTINGS = ("random", "distinct", "one_rank", "skewed", "with_invalid")


def expert_ids(n: int, top_k: int, num_experts: int, generator: torch.Generator, *, routing: str = "random",
               rank: int = 0, ep_size: int = 1, device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """`[n, top_k]` int32 global expert ids of rank `rank`."""
    like = dict(generator=generator, device=device)
    if routing == "distinct" and top_k <= num_experts:
        ids = torch.rand(n, num_experts, **like).topk(top_k, dim=1).indices
    elif routing == "one_rank":
        owned = ExpertPartition(num_experts, ep_size).experts_of((rank + 1) % ep_size)
        ids = torch.randint(owned.start, owned.stop, (n, top_k), **like)
    elif routing == "skewed":
        hot = torch.randint(0, min(2, num_experts), (n, top_k), **like)
        cold = torch.randint(0, num_experts, (n, top_k), **like)
        ids = torch.where(torch.rand(n, top_k, **like) < 0.2, cold, hot)
    elif routing in ROUTINGS:
        ids = torch.randint(0, num_experts, (n, top_k), **like)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if routing == "with_invalid":
        bad = torch.rand(n, top_k, **like) < 0.3
        bad_values = torch.tensor([-1, -7, num_experts, num_experts + 5, 2**31 - 1], device=ids.device)
        choice = bad_values[torch.randint(0, len(bad_values), (n, top_k), **like)]
        ids = torch.where(bad, choice, ids)
    return ids.to(torch.int32).contiguous()


def payload_bytes(n: int, dtype: torch.dtype, width: int, generator: torch.Generator,
                  device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """`[n, width]` of `dtype` made of random bytes (NaN patterns included: compare as bytes)."""
    raw = torch.randint(0, 256, (n, width * dtype.itemsize), dtype=torch.uint8, generator=generator, device=device)
    return raw.view(dtype).contiguous()


def hidden_states(n: int, hidden: int, generator: torch.Generator, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """`[n, hidden]` standard-normal activations in `dtype`."""
    return torch.randn(n, hidden, generator=generator, device=device).to(dtype)


def routing_weights(n: int, top_k: int, generator: torch.Generator,
                    device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """`[n, top_k]` fp32 weights in [0, 1)."""
    return torch.rand(n, top_k, generator=generator, device=device)


def activation_payloads(name: str, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        generator: torch.Generator) -> list[torch.Tensor]:  # fmt: skip
    """The benchmark's payload sets. bf16: hidden + ids + weights; fp8: e4m3 hidden + fp32 per-128
    scales + ids + weights; nvfp4: packed uint8 (2 values a byte) + e4m3 per-16 scales + ids + weights."""
    n, width = hidden.shape
    if name == "bf16":
        return [hidden, ids, weights]
    if name == "fp8":
        scales = torch.rand(n, width // 128, generator=generator, device=hidden.device)
        return [hidden.to(torch.float8_e4m3fn), scales, ids, weights]
    if name == "nvfp4":
        packed = payload_bytes(n, torch.uint8, width // 2, generator, hidden.device)
        scales = torch.rand(n, width // 16, generator=generator, device=hidden.device).to(torch.float8_e4m3fn)
        return [packed, scales, ids, weights]
    raise ValueError(f"payload set must be bf16, fp8 or nvfp4, got {name!r}")


def expert_outputs(ep_size: int, runtime_max_tokens: int, hidden: int, generator: torch.Generator,
                   dtype: torch.dtype = torch.bfloat16, stale: torch.Tensor | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """One rank's `[ep_size, rt, hidden]` expert outputs in `dtype`; rows where `stale` (a bool
    `[ep_size, rt]`) is set are NaN, so a combine that reads one shows it."""
    values = torch.randn(ep_size, runtime_max_tokens, hidden, generator=generator, device=device)
    if stale is not None:
        values[stale] = float("nan")
    return values.to(dtype)
