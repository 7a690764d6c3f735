"""MoE rounds as one rank of a multi-process world, each rank checking itself against the reference.

Inputs are drawn from a seed for ALL ranks (`draw_round`), so every rank computes the global
reference alone and checks its own slice: receive planes exactly (valid rows, and the sanitized
expert-id plane in full), combine output bitwise against `reference.combine` of the toy experts,
and close to the dense toy MoE. Used by the spawn launcher (tests/test_multiprocess*.py) and by
the MPI script (tests/support/mpi_round.py); `simulated_rounds` runs the same rounds in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

import a2a
from a2a import reference
from a2a.expert_partition import ExpertPartition
from examples import toy_moe
from tests.support import round_inputs

HIDDEN, TOP_K, NUM_EXPERTS, MAX_NUM_TOKENS = 24, 3, 10, 9  # 10 experts: uneven ownership
INVALID_ID = -1
# (tokens per rank, runtime_max_tokens_per_rank): unequal counts, a zero-token rank, an all-empty round.
PLANS: dict[int, list[tuple[list[int], int]]] = {
    2: [([5, 0], 5), ([3, 7], 7), ([0, 0], 1), ([9, 2], 9)],
    4: [([5, 0, 9, 2], 9), ([1, 1, 1, 1], 1), ([0, 0, 0, 3], 4), ([7, 8, 0, 6], 8)],
    8: [([5, 0, 9, 2, 1, 8, 3, 3], 9), ([0, 0, 0, 0, 0, 0, 0, 4], 4), ([6, 6, 6, 6, 6, 6, 6, 6], 6)],
}


@dataclass(frozen=True)
class RoundInputs:
    """Every rank's inputs of one round (CPU tensors, indexed by rank)."""

    counts: list[int]
    runtime_max_tokens: int
    experts: list[torch.Tensor]  # [n_r, TOP_K] int32, some ids out of range
    hiddens: list[torch.Tensor]  # [n_r, HIDDEN] bf16
    weights: list[torch.Tensor]  # [n_r, TOP_K] fp32

    @classmethod
    def draw(cls, counts: list[int], runtime_max_tokens: int, seed: int) -> RoundInputs:
        generator = torch.Generator().manual_seed(seed)
        experts = [round_inputs.expert_ids(n, TOP_K, NUM_EXPERTS, generator) for n in counts]
        for rank, ids in enumerate(experts):
            if len(ids) and (seed + rank) % 2:
                ids[0, -1] = -1 if seed % 3 else NUM_EXPERTS  # skipped by routing, counted as invalid
        hiddens = [round_inputs.hidden_states(n, HIDDEN, generator) for n in counts]
        weights = [round_inputs.routing_weights(n, TOP_K, generator) for n in counts]
        return cls(counts, runtime_max_tokens, experts, hiddens, weights)

    def payloads(self, rank: int, device: torch.device) -> list[torch.Tensor]:
        return [self.hiddens[rank].to(device), self.experts[rank].to(device), self.weights[rank].to(device)]

    @cached_property
    def expected(self) -> reference.DispatchReference:
        payloads = [self.payloads(r, torch.device("cpu")) for r in range(len(self.counts))]
        return reference.dispatch(self.experts, payloads, NUM_EXPERTS, self.runtime_max_tokens)

    def expected_ids(self, rank: int) -> torch.Tensor:
        expected = self.expected
        return reference.sanitize(expected.recv_payloads[rank][1], expected.recv_counts[rank], INVALID_ID)

    @cached_property
    def expected_combined(self) -> list[torch.Tensor]:
        """Every rank's combine output when every rank runs the toy experts on its receive planes."""
        outputs = []
        for rank in range(len(self.counts)):
            hidden, _, weights = self.expected.recv_payloads[rank]
            outputs.append(toy_experts(rank, len(self.counts), [hidden, self.expected_ids(rank), weights]))
        return reference.combine(outputs, self.expected.routing, self.counts)


def toy_experts(rank: int, ep_size: int, recv: list[torch.Tensor]) -> torch.Tensor:
    """Rank `rank`'s toy MoE output `[ep_size, rt, HIDDEN]` bf16, computed on the CPU (same bits anywhere)."""
    owned = ExpertPartition(NUM_EXPERTS, ep_size).experts_of(rank)
    return toy_moe.toy_moe_rank(*[plane.cpu() for plane in recv], owned, NUM_EXPERTS, torch.bfloat16)


def check_rank(inputs: RoundInputs, rank: int, recv: list[torch.Tensor], combined: torch.Tensor) -> None:
    """Assert `rank`'s receive planes and combine output against the global reference."""
    valid = inputs.expected.valid_rows(rank)
    for p, (got, want) in enumerate(zip(recv, inputs.expected.recv_payloads[rank])):
        assert got.dtype == want.dtype and got.shape == want.shape, (rank, p, got.shape, want.shape)
        assert torch.equal(got.cpu()[valid].view(torch.uint8), want[valid].view(torch.uint8)), (
            f"payload {p} of rank {rank}"
        )
    assert torch.equal(recv[1].cpu(), inputs.expected_ids(rank)), f"sanitized expert ids of rank {rank}"
    want = inputs.expected_combined[rank]
    assert torch.equal(combined.cpu().view(torch.uint8), want.view(torch.uint8)), f"combine output of rank {rank}"
    dense = toy_moe.toy_moe_dense(inputs.hiddens[rank], inputs.experts[rank], inputs.weights[rank], NUM_EXPERTS)
    torch.testing.assert_close(combined.cpu().float(), dense, rtol=2e-2, atol=2e-2)


def run_round(world: Any, moe: a2a.MoeAlltoAll, inputs: RoundInputs, in_workspace: bool) -> dict[str, Any]:
    """dispatch (+ sanitize) -> toy experts -> combine as `moe.ep_rank`; checks it; returns copies."""
    rank, device, rt = moe.ep_rank, world.device, inputs.runtime_max_tokens
    recv = moe.dispatch(
        inputs.experts[rank].to(device), inputs.payloads(rank, device), rt,
        invalid_token_expert_id=INVALID_ID, expert_id_payload_index=1,
    )  # fmt: skip
    world.synchronize()
    recv = [plane.clone() for plane in recv]  # the views are overwritten by the next round
    assert moe.num_invalid_expert_ids() == inputs.expected.routing[rank].num_invalid
    payload = toy_experts(rank, moe.ep_size, recv).to(device)
    if in_workspace:
        plane = moe.get_combine_payload_tensor_in_workspace(rt, HIDDEN, torch.bfloat16)
        plane.copy_(payload)
        payload = plane
    poisoned = torch.full((inputs.counts[rank], HIDDEN), float("nan"), dtype=torch.bfloat16, device=device)
    combined = moe.combine(payload, rt, payload_in_workspace=in_workspace, output=poisoned)
    world.synchronize()
    check_rank(inputs, rank, recv, combined)
    return {"recv": [plane.cpu() for plane in recv], "combined": combined.cpu().clone()}


def process_rank(rank: int, world_size: int, device: str) -> tuple[Any, a2a.MoeAlltoAll]:
    """This process's `ProcessWorld` (default torch.distributed group) on `device` and its rank's
    `MoeAlltoAll` of the standard test geometry."""
    from a2a.runtime.process_world import ProcessWorld

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    world = ProcessWorld(None, device)
    moe = a2a.MoeAlltoAll(a2a.Mapping(world_size, rank), MAX_NUM_TOKENS, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN,
                          world=world)  # fmt: skip
    return world, moe


def moe_rounds_rank(rank: int, world_size: int, device: str, bootstrap: Any = None) -> list[dict[str, Any]]:
    """Every round of `PLANS[world_size]` as rank `rank` of a `ProcessWorld` (default torch.distributed
    group unless `bootstrap` is given); returns this rank's results per round."""
    from a2a.runtime.process_world import ProcessWorld

    if device == "cuda:per-rank":  # one GPU per rank process
        device = f"cuda:{rank % torch.cuda.device_count()}"
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    world = ProcessWorld(bootstrap, device)
    assert (world.rank, world.ep_size) == (rank, world_size), (world.rank, world.ep_size)
    try:
        moe = a2a.MoeAlltoAll(
            a2a.Mapping(world_size, rank), MAX_NUM_TOKENS, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN, world=world
        )
        results = [
            run_round(world, moe, RoundInputs.draw(counts, rt, seed), in_workspace=seed % 2 == 0)
            for seed, (counts, rt) in enumerate(PLANS[world_size])
        ]
        del moe
    finally:
        world.close()
    return results


def simulated_rounds(ep_size: int, device: str) -> list[list[dict[str, Any]]]:
    """The rounds of `PLANS[ep_size]` in a one-process `SimulatedWorld`; `[rank][round]` results."""
    world = a2a.SimulatedWorld(ep_size, device)
    ranks = [
        a2a.MoeAlltoAll(a2a.Mapping(ep_size, r), MAX_NUM_TOKENS, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN, world=world)
        for r in range(ep_size)
    ]
    results: list[list[dict[str, Any]]] = [[] for _ in range(ep_size)]
    for seed, (counts, rt) in enumerate(PLANS[ep_size]):
        inputs = RoundInputs.draw(counts, rt, seed)
        in_workspace = seed % 2 == 0
        recv = [
            moe.dispatch(inputs.experts[r].to(world.device), inputs.payloads(r, world.device), rt,
                         invalid_token_expert_id=INVALID_ID, expert_id_payload_index=1)
            for r, moe in enumerate(ranks)
        ]  # fmt: skip
        world.synchronize()
        recv = [[plane.clone() for plane in planes] for planes in recv]
        payloads = []
        for r, moe in enumerate(ranks):
            payload = toy_experts(r, ep_size, recv[r]).to(world.device)
            if in_workspace:
                plane = moe.get_combine_payload_tensor_in_workspace(rt, HIDDEN, torch.bfloat16)
                plane.copy_(payload)
                payload = plane
            payloads.append(payload)
        combined = [moe.combine(payloads[r], rt, payload_in_workspace=in_workspace) for r, moe in enumerate(ranks)]
        world.synchronize()
        for r in range(ep_size):
            check_rank(inputs, r, recv[r], combined[r])
            results[r].append({"recv": [plane.cpu() for plane in recv[r]], "combined": combined[r].cpu().clone()})
    for moe in ranks:
        moe._reset_workspace()
    return results
