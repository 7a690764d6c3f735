"""A toy MoE for the demo and the tests: expert e scales a row by (e + 1) / num_experts + 0.5.

Exact in fp32, so a round through a2a (`toy_moe_rank` on each rank's receive planes, then
combine) can be compared with the same MoE on one device (`toy_moe_dense`).
"""

from __future__ import annotations

import torch


def toy_expert_scale(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return (expert_ids.to(torch.float32) + 1.0) / num_experts + 0.5


def toy_moe_rank(
    recv_hidden: torch.Tensor,
    recv_expert_ids: torch.Tensor,
    recv_weights: torch.Tensor,
    owned_experts: range,
    num_experts: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """One rank's toy MoE over its receive planes: `sum_k w_k * scale(e_k) * x` over its own experts.

    recv_hidden `[ep, rt, H]`, recv_expert_ids `[ep, rt, top_k]` int32 (global ids, stale rows
    invalid), recv_weights `[ep, rt, top_k]`; returns `[ep, rt, H]` in `out_dtype`, fp32 math.
    """
    ids = recv_expert_ids.to(torch.int64)
    own = (ids >= owned_experts.start) & (ids < owned_experts.stop)
    factor = torch.where(own, recv_weights.to(torch.float32) * toy_expert_scale(ids, num_experts), 0.0)
    out = recv_hidden.to(torch.float32) * factor.sum(dim=-1, keepdim=True)
    return out.to(out_dtype)


def toy_moe_dense(
    hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """The same toy MoE on one device, no communication: `[n, H]` fp32."""
    ids = expert_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_experts)
    factor = torch.where(valid, weights.to(torch.float32) * toy_expert_scale(ids, num_experts), 0.0)
    return hidden.to(torch.float32) * factor.sum(dim=-1, keepdim=True)

