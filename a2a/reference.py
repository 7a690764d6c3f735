"""Pure-torch, global-view reference of dispatch, sanitize and combine: the oracle of tests and benches.

Every function takes the inputs of all ranks at once (lists indexed by rank) and returns what each
rank must hold afterwards. Semantics (the contract the kernels are checked against):

- Routing: expert `e` goes to its owner rank (`ExpertPartition`); ids outside `[0, num_experts)`
  are skipped. Per token, only the first `k` that hits a rank sends; later hits of the same rank get
  target -1 and send index -1.
- Slots are deterministic: a token's slot at target `t` is the number of earlier local tokens that
  also send to `t`, so each receive plane holds a source's tokens in source order.
- Sanitize: receive row `(s, j)` with `j >= recv_counters[s]` gets `invalid_expert_id` in every k.
- Combine: per local token, sum over k (in order) of the row that target `t_k` holds at
  `[ep_rank][slot_k]` in its combine plane, accumulated in fp32 and cast to the payload dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from a2a.expert_partition import ExpertPartition


@dataclass(frozen=True)
class RankRouting:
    """One rank's routing decision. Shapes: [num_tokens, top_k] int32 and [ep_size] int32."""

    topk_target_ranks: torch.Tensor
    topk_send_indices: torch.Tensor
    send_counts: torch.Tensor
    num_invalid: int


@dataclass(frozen=True)
class DispatchReference:
    """What every rank holds after dispatch (all lists indexed by rank).

    `recv_payloads[r][p]` is `[ep_size, rt, W_p]`; only rows `(s, j < recv_counts[r][s])` are defined
    (the rest are zero here). `recv_counts[r][s]` = tokens rank `s` sent to rank `r`.
    """

    routing: list[RankRouting]
    recv_counts: torch.Tensor  # [ep_size (receiver), ep_size (source)] int32
    recv_payloads: list[list[torch.Tensor]]

    def valid_rows(self, rank: int) -> torch.Tensor:
        """[ep_size, rt] bool mask of the defined receive rows of `rank`."""
        rt = self.recv_payloads[rank][0].shape[1]
        return torch.arange(rt)[None, :] < self.recv_counts[rank][:, None]


def route_rank(
    token_selected_experts: torch.Tensor, num_experts: int, ep_size: int, active_ranks: Sequence[int] | None = None
) -> RankRouting:
    """Targets, deterministic slots and per-target counts of one rank's tokens. Experts owned by a
    rank outside `active_ranks` (default: all) are not sent to, like repeats (not counted invalid)."""
    experts = token_selected_experts.cpu()
    num_tokens, top_k = experts.shape
    owner = ExpertPartition(num_experts, ep_size).owner(experts)  # [n, k], -1 if invalid
    num_invalid = int((owner < 0).sum())
    if active_ranks is not None:
        inactive = torch.tensor([r not in active_ranks for r in range(ep_size)])
        owner = torch.where((owner >= 0) & inactive[owner.clamp(min=0).long()], torch.full_like(owner, -1), owner)
    targets = owner.clone()
    for k in range(top_k):
        for j in range(k):
            repeat = (owner[:, k] >= 0) & (owner[:, j] == owner[:, k])
            targets[:, k] = torch.where(repeat, torch.full_like(targets[:, k], -1), targets[:, k])
    sends = torch.zeros(num_tokens, ep_size, dtype=torch.int64)
    rows = torch.arange(num_tokens)
    for k in range(top_k):
        ok = targets[:, k] >= 0
        sends[rows[ok], targets[ok, k].long()] = 1
    earlier = torch.cumsum(sends, dim=0) - sends  # tokens before i that send to t
    indices = torch.full_like(targets, -1)
    for k in range(top_k):
        ok = targets[:, k] >= 0
        indices[ok, k] = earlier[rows[ok], targets[ok, k].long()].to(torch.int32)
    return RankRouting(targets, indices, sends.sum(dim=0).to(torch.int32), num_invalid)


def dispatch(
    token_selected_experts: Sequence[torch.Tensor],
    input_payloads: Sequence[Sequence[torch.Tensor]],
    num_experts: int,
    runtime_max_tokens: int,
    active_ranks: Sequence[int] | None = None,
) -> DispatchReference:
    """Global-view dispatch of every rank's payloads (inputs may live on any device). With
    `active_ranks`, the other ranks take no part: give them zero tokens."""
    ep_size = len(token_selected_experts)
    routing = [route_rank(experts, num_experts, ep_size, active_ranks) for experts in token_selected_experts]
    recv_counts = torch.stack([r.send_counts for r in routing], dim=1)  # [receiver, source]
    widths = [p.shape[1] for p in input_payloads[0]]
    dtypes = [p.dtype for p in input_payloads[0]]
    recv = [
        [torch.zeros(ep_size, runtime_max_tokens, w, dtype=d) for w, d in zip(widths, dtypes)]
        for _ in range(ep_size)
    ]
    for source, route in enumerate(routing):
        payloads = [p.cpu() for p in input_payloads[source]]
        for k in range(route.topk_target_ranks.shape[1]):
            targets = route.topk_target_ranks[:, k]
            for target in range(ep_size):
                tokens = torch.nonzero(targets == target).flatten()
                slots = route.topk_send_indices[tokens, k].long()
                for p, payload in enumerate(payloads):
                    recv[target][p][source, slots] = payload[tokens]
    return DispatchReference(routing, recv_counts, recv)


def sanitize(expert_ids: torch.Tensor, recv_counts: torch.Tensor, invalid_expert_id: int) -> torch.Tensor:
    """Copy of `expert_ids` [ep_size, rt, top_k] with rows past each source's count invalidated."""
    out = expert_ids.cpu().clone()
    rt = out.shape[1]
    stale = torch.arange(rt)[None, :] >= recv_counts.cpu()[:, None]
    out[stale] = invalid_expert_id
    return out


def combine(
    expert_outputs: Sequence[torch.Tensor],
    routing: Sequence[RankRouting],
    num_tokens: Sequence[int],
    scales: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Per rank `[num_tokens, H]`: fp32 sum over k (in order) of the gathered expert-output rows.

    `expert_outputs[t]` is rank t's `[ep_size, rt, H]` combine payload; with `scales` (rank t's
    `[ep_size, rt, 1]` fp32) each row is multiplied by its scale first (quantized combine). The
    result has `out_dtype` (default: the payload dtype).
    """
    ep_size = len(expert_outputs)
    hidden = expert_outputs[0].shape[2]
    planes = [plane.cpu().to(torch.float32) for plane in expert_outputs]
    if scales is not None:
        planes = [plane * scale.cpu() for plane, scale in zip(planes, scales)]
    outputs = []
    for rank, route in enumerate(routing):
        acc = torch.zeros(num_tokens[rank], hidden, dtype=torch.float32)
        for k in range(route.topk_target_ranks.shape[1]):
            targets = route.topk_target_ranks[:, k]
            term = torch.zeros_like(acc)
            for target in range(ep_size):
                tokens = torch.nonzero(targets == target).flatten()
                slots = route.topk_send_indices[tokens, k].long()
                term[tokens] = planes[target][rank, slots]
            acc += term  # adding exact zeros where k sends nowhere keeps the fixed k order
        outputs.append(acc.to(out_dtype or expert_outputs[0].dtype))
    return outputs
