"""Run simulated rounds through the functional API and check every rank against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import a2a
from a2a import reference
from a2a.layout import MAX_TOP_K, ROUND_STATE_LEN, RoundState, WorkspaceLayout
from tests.support.strategies import RoundCase

POISON_BYTE = 0xA5
_worlds: dict[tuple[int, str], a2a.SimulatedWorld] = {}


def world_for(ep_size: int, device: str) -> a2a.SimulatedWorld:
    """One simulated world per (ranks, device) for the whole session (CUDA streams are reused)."""
    key = (ep_size, device)
    if key not in _worlds:
        _worlds[key] = a2a.SimulatedWorld(ep_size, device)
    return _worlds[key]


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@dataclass
class FunctionalRound:
    case: RoundCase
    world: a2a.SimulatedWorld
    workspace: torch.Tensor
    metainfo: torch.Tensor
    layout: WorkspaceLayout

    @classmethod
    def create(cls, case: RoundCase, device: str) -> FunctionalRound:
        world = world_for(case.ep_size, device)
        dispatch_bytes = [dtype.itemsize * width for dtype, width in case.payload_specs]
        size = a2a.moe_a2a_get_workspace_size_per_rank(
            case.ep_size, case.max_num_tokens, dispatch_bytes, case.hidden * case.combine_dtype.itemsize
        )
        workspace = torch.empty(case.ep_size, size, dtype=torch.uint8, device=world.device)
        metainfo = None
        for rank in range(case.ep_size):
            metainfo = a2a.moe_a2a_initialize(workspace, rank, case.ep_size, case.max_num_tokens)
        layout = WorkspaceLayout.from_metainfo(metainfo)
        return cls(case, world, workspace, metainfo, layout)

    def poison(self) -> None:
        """Fill the payload region and the per-round top-k arrays with a pattern no kernel writes."""
        self.workspace[:, self.layout.payload_offset :].fill_(POISON_BYTE)
        start = self.layout.topk_target_ranks_offset
        self.workspace[:, start : start + 2 * 4 * self.layout.max_num_tokens * MAX_TOP_K].fill_(POISON_BYTE)

    def dispatch(self, experts: list[torch.Tensor], payloads: list[list[torch.Tensor]]):
        case = self.case
        results = []
        for rank in range(case.ep_size):
            self.world.wait_for_caller(rank)
            with self.world.stream(rank).activate():
                results.append(
                    a2a.moe_a2a_dispatch(
                        experts[rank], payloads[rank], self.workspace, self.metainfo, case.runtime_max_tokens,
                        rank, case.ep_size, case.top_k, case.num_experts,
                    )  # fmt: skip
                )
        self.world.synchronize()
        return [r[0] for r in results], [r[1] for r in results]

    def combine(self, outputs: list[torch.Tensor], combine_offsets: list[int], in_workspace: bool):
        case = self.case
        payloads = []
        for rank in range(case.ep_size):  # all planes filled before any rank's combine is enqueued
            payload = outputs[rank].to(self.world.device)
            if in_workspace:
                start = rank * self.workspace.stride(0) + combine_offsets[rank]
                plane = a2a.moe_a2a_wrap_payload_tensor_in_workspace(
                    self.workspace, [case.ep_size, case.runtime_max_tokens], start,
                    start + payload.numel() * payload.element_size(), payload.dtype,
                )  # fmt: skip
                plane.copy_(payload)
                payload = plane
            payloads.append(payload)
        results = []
        for rank in range(case.ep_size):
            poisoned = torch.full(
                (case.num_tokens[rank], case.hidden), float("nan"), dtype=case.combine_dtype, device=self.world.device
            )
            self.world.wait_for_caller(rank)
            with self.world.stream(rank).activate():
                results.append(
                    a2a.moe_a2a_combine(
                        payloads[rank], case.num_tokens[rank], self.workspace, self.metainfo, case.runtime_max_tokens,
                        rank, case.ep_size, case.top_k, combine_offsets[rank], in_workspace, output=poisoned,
                    )  # fmt: skip
                )
        self.world.synchronize()
        return results

    def own_int32(self, rank: int, offset: int, count: int) -> torch.Tensor:
        return self.workspace[rank, offset : offset + 4 * count].view(torch.int32).cpu()


def check_dispatch(run: FunctionalRound, expected: reference.DispatchReference, recv: list[list[torch.Tensor]]) -> None:
    case, layout = run.case, run.layout
    for rank in range(case.ep_size):
        route = expected.routing[rank]
        n, k = case.num_tokens[rank], case.top_k
        assert torch.equal(run.own_int32(rank, layout.send_counters_offset, case.ep_size), route.send_counts), rank
        assert torch.equal(run.own_int32(rank, layout.recv_counters_offset, case.ep_size), expected.recv_counts[rank])
        targets = run.own_int32(rank, layout.topk_target_ranks_offset, n * k).view(n, k)
        indices = run.own_int32(rank, layout.topk_send_indices_offset, n * k).view(n, k)
        assert torch.equal(targets, route.topk_target_ranks), f"topk_target_ranks of rank {rank}"
        assert torch.equal(indices, route.topk_send_indices), f"topk_send_indices of rank {rank}"
        invalid = run.own_int32(rank, layout.round_state_offset, ROUND_STATE_LEN)[RoundState.INVALID_COUNT]
        assert int(invalid) == route.num_invalid
        valid = expected.valid_rows(rank)
        for p, (got, want) in enumerate(zip(recv[rank], expected.recv_payloads[rank])):
            assert got.dtype == want.dtype and got.shape == want.shape, (p, got.shape, want.shape)
            assert torch.equal(as_bytes(got.cpu()[valid]), as_bytes(want[valid])), f"payload {p} on rank {rank}"
        check_nothing_else_written(run, expected, rank)


GUARD_CHECK_MAX_BYTES = 64 << 20


def check_nothing_else_written(run: FunctionalRound, expected: reference.DispatchReference, rank: int) -> None:
    """Guard bytes: after dispatch, every poisoned byte of the segment that no valid receive row or
    top-k entry covers still holds the poison (no write outside a plane, a row, or the token range)."""
    case, layout = run.case, run.layout
    segment = run.workspace[rank]
    if segment.numel() > GUARD_CHECK_MAX_BYTES:
        return
    segment = segment.cpu()
    row_bytes = [dtype.itemsize * width for dtype, width in case.payload_specs]
    planes = layout.round_layout(case.runtime_max_tokens, row_bytes)
    written = torch.zeros(segment.numel(), dtype=torch.bool)
    valid = expected.valid_rows(rank)  # [ep, rt]
    for offset, size, row in zip(planes.recv_plane_offsets, planes.recv_plane_sizes, row_bytes):
        written[offset : offset + size] = valid[:, :, None].expand(-1, -1, row).flatten()
    entries = 4 * case.num_tokens[rank] * case.top_k
    for array in (layout.topk_target_ranks_offset, layout.topk_send_indices_offset):
        written[array : array + entries] = True
    poisoned = torch.zeros_like(written)
    poisoned[layout.payload_offset :] = True
    poisoned[layout.topk_target_ranks_offset : layout.topk_target_ranks_offset + 2 * 4 * layout.max_num_tokens * MAX_TOP_K] = True
    untouched = poisoned & ~written
    assert (segment[untouched] == POISON_BYTE).all(), f"rank {rank}: bytes written outside valid rows / entries"


def run_and_check(case: RoundCase, device: str, in_workspace: bool = False, run: FunctionalRound | None = None):
    """One poisoned round (dispatch, then combine of NaN-poisoned stale rows) against the reference.

    Combine is compared bit for bit: the kernel adds the same fp32 terms in the same k order and
    rounds once, like the reference; a stale row read or an unwritten output row shows as NaN.
    Reuses `run`'s workspace when given (several rounds in a row). Returns the receive views and
    combine outputs."""
    if run is None:
        run = FunctionalRound.create(case, device)
    run.case = case
    run.poison()
    experts, payloads = case.experts(), case.payloads()
    recv, offsets = run.dispatch([e.to(device) for e in experts], [[p.to(device) for p in ps] for ps in payloads])
    expected = reference.dispatch(experts, payloads, case.num_experts, case.runtime_max_tokens)
    check_dispatch(run, expected, recv)
    outputs = case.expert_outputs([expected.valid_rows(r) for r in range(case.ep_size)])
    combined = run.combine(outputs, offsets, in_workspace)
    want = reference.combine(outputs, expected.routing, list(case.num_tokens))
    for rank in range(case.ep_size):
        assert torch.equal(as_bytes(combined[rank].cpu()), as_bytes(want[rank])), f"combine on rank {rank}"
    return recv, combined
