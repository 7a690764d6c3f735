"""Typed views of one rank's regions of a workspace, and the addresses of its flags.

Views onto other ranks' segments are strided tensors `[ep_size, ...]` whose row stride is the
workspace's segment stride, so a kernel reaches segment t as `base + t * stride` in int64.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from a2a import envs, validation
from a2a.errors import A2ATimeoutError
from a2a.layout import ROUND_STATE_LEN, RoundState, TimeoutPhase, WorkspaceLayout, num_route_blocks
from a2a.runtime.scheduler import PhaseSignals


@dataclass(frozen=True, eq=False)
class RankWorkspace:
    """`workspace` [ep_size, size_per_rank] uint8 seen from rank `ep_rank` with `layout`."""

    workspace: torch.Tensor
    layout: WorkspaceLayout
    ep_rank: int

    @property
    def ep_size(self) -> int:
        return self.layout.ep_size

    @property
    def size_per_rank(self) -> int:
        return self.workspace.shape[1]

    @property
    def segment_stride(self) -> int:
        """Bytes between two segments (may exceed size_per_rank)."""
        return self.workspace.stride(0)

    def own(self, offset: int, numel: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Own segment bytes [offset, offset + numel * itemsize) as a 1-D `dtype` tensor."""
        nbytes = numel * dtype.itemsize
        return self.workspace[self.ep_rank, offset : offset + nbytes].view(dtype)

    def own_address(self, offset: int) -> int:
        """Address of byte `offset` of this rank's segment."""
        return self.workspace.data_ptr() + self.ep_rank * self.segment_stride + offset

    def every_rank(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of every segment as `[ep_size, nbytes / itemsize]` of `dtype`."""
        return self.workspace[:, offset : offset + nbytes].view(dtype)

    @cached_property
    def send_counters(self) -> torch.Tensor:
        return self.own(self.layout.send_counters_offset, self.ep_size)

    @cached_property
    def recv_counters(self) -> torch.Tensor:
        return self.own(self.layout.recv_counters_offset, self.ep_size)

    @cached_property
    def recv_counters_every_rank(self) -> torch.Tensor:
        return self.every_rank(self.layout.recv_counters_offset, 4 * self.ep_size, torch.int32)

    @cached_property
    def round_state(self) -> torch.Tensor:
        return self.own(self.layout.round_state_offset, ROUND_STATE_LEN)

    @cached_property
    def block_counts(self) -> torch.Tensor:
        blocks = num_route_blocks(self.layout.max_num_tokens)
        return self.own(self.layout.block_counts_offset, blocks * self.ep_size)

    @cached_property
    def block_invalid(self) -> torch.Tensor:
        return self.own(self.layout.block_invalid_offset, num_route_blocks(self.layout.max_num_tokens))

    def flags_every_rank(self, flags_offset: int) -> torch.Tensor:
        """A phase's flag array in every segment, `[ep_size, ep_size]` int32 (row t: segment t)."""
        return self.every_rank(flags_offset, 4 * self.ep_size, torch.int32)

    def phase_signals(self, phase_code: int, active_rank_mask: int) -> PhaseSignals:
        """The flag words of a phase (TimeoutPhase code) among the active ranks (bit r: rank r)."""
        flags_offset = (self.layout.dispatch_flags_offset if phase_code == TimeoutPhase.DISPATCH
                        else self.layout.combine_flags_offset)  # fmt: skip
        base = self.workspace.data_ptr()
        stride = self.segment_stride
        own = base + self.ep_rank * stride
        state = own + self.layout.round_state_offset
        peers = tuple(r for r in range(self.ep_size) if active_rank_mask >> r & 1)
        return PhaseSignals(
            what=TimeoutPhase.NAMES[phase_code],
            ep_rank=self.ep_rank,
            peer_ranks=peers,
            signal_addresses=tuple(base + t * stride + flags_offset + 4 * self.ep_rank for t in peers),
            wait_addresses=tuple(own + flags_offset + 4 * s for s in peers),
            flag_value_address=state + 4 * RoundState.FLAG_VALUE,
            phase_code=phase_code,
            timeout_record_address=state + 4 * RoundState.TIMEOUT_STATUS,
        )

    @cached_property
    def flag_value(self) -> torch.Tensor:
        return self.round_state[RoundState.FLAG_VALUE : RoundState.FLAG_VALUE + 1]

    @cached_property
    def timeout_status(self) -> torch.Tensor:
        first = RoundState.TIMEOUT_STATUS
        return self.round_state[first : first + RoundState.TIMEOUT_STATUS_LEN]

    @cached_property
    def host_timeout_status(self):
        """Host-mapped copy of `timeout_status` (CUDA only; None on the CPU, where the host waits)."""
        if self.workspace.device.type != "cuda":
            return None
        from a2a.runtime.host_mapped import HostMappedWords

        return HostMappedWords(RoundState.TIMEOUT_STATUS_LEN, self.workspace.device)

    @cached_property
    def plans(self) -> dict:
        """Launch plans of this rank's call signatures (a2a.dispatch / combine / sanitize), newest last."""
        return {}

    def find_plan(self, key: object) -> object | None:
        """The plan of `key`, or None (also for a key that cannot be hashed: the caller's full
        checks then report the argument that made it so)."""
        try:
            return self.plans.get(key)
        except TypeError:
            return None

    def remember_plan(self, key: object, plan: object) -> None:
        try:
            hash(key)
        except TypeError:
            return
        plans = self.plans
        plans.pop(key, None)
        if len(plans) >= MAX_PLANS_PER_RANK:
            del plans[next(iter(plans))]
        plans[key] = plan

    def raise_if_timed_out(self) -> None:
        """Raise `A2ATimeoutError` if a wait of this rank timed out (no synchronisation: on CUDA this
        reads the host-mapped record). Once a timeout is recorded, every later call raises."""
        status = self.host_timeout_status
        if status is not None:
            if status.words[0] == 0:
                return
            phase, low, high, _ = status.read()
        else:
            phase, low, high, _ = self.timeout_status.tolist()
            if phase == 0:
                return
        mask = (low & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)
        missing = [r for r in range(self.ep_size) if mask >> r & 1]
        raise A2ATimeoutError(TimeoutPhase.NAMES.get(phase, f"phase {phase}"), self.ep_rank, missing,
                              envs.signal_timeout_s())  # fmt: skip


# id(workspace tensor) -> (weak reference, {(layout, ep_rank): RankWorkspace, and for
# resolve_rank_workspace (metainfo id, version, ep_rank): (metainfo, RankWorkspace)}). A RankWorkspace
# keeps only a view of the workspace, so dropping the tensor drops its entry and frees the memory.
_rank_workspaces: dict[int, tuple[weakref.ref, dict]] = {}
MAX_PLANS_PER_RANK = 64


def resolve_rank_workspace(workspace: object, metainfo: object, ep_rank: object) -> RankWorkspace:
    """The checked `RankWorkspace` of the functional API's (workspace, metainfo, ep_rank).

    The first call with a given workspace, metainfo tensor and rank checks them all; later calls
    find the result by identity (and metainfo's version counter, so an in-place edit is noticed).
    """
    entry = _rank_workspaces.get(id(workspace))
    try:
        key = ("metainfo", id(metainfo), metainfo._version, type(ep_rank), ep_rank)  # type: ignore[attr-defined]
    except AttributeError:
        key = None
    if entry is not None and entry[0]() is workspace and key is not None:
        found = entry[1].get(key)
        if found is not None:
            return found[1]
    layout = WorkspaceLayout.from_metainfo(metainfo)  # type: ignore[arg-type]
    validation.check_geometry(layout.ep_size, ep_rank)  # type: ignore[arg-type]
    checked = validation.check_workspace(workspace, layout.ep_size)
    validation.check_fits("the aux region", layout.aux_size, checked.shape[1])
    rank_workspace = rank_workspace_of(checked, layout, ep_rank)  # type: ignore[arg-type]
    if key is not None:
        per_workspace = _rank_workspaces[id(checked)][1]
        # A caller that builds a new metainfo tensor for every call must not grow this without bound.
        resolved = [k for k in per_workspace if isinstance(k, tuple) and k and k[0] == "metainfo"]
        if len(resolved) >= MAX_PLANS_PER_RANK:
            del per_workspace[resolved[0]]
        per_workspace[key] = (metainfo, rank_workspace)
    return rank_workspace


def rank_workspace_of(workspace: torch.Tensor, layout: WorkspaceLayout, ep_rank: int) -> RankWorkspace:
    """Cached `RankWorkspace` (its views and flag addresses are built once per workspace and rank)."""
    entry = _rank_workspaces.get(id(workspace))
    if entry is None or entry[0]() is not workspace:
        entry = (weakref.ref(workspace), {})
        _rank_workspaces[id(workspace)] = entry
        weakref.finalize(workspace, _rank_workspaces.pop, id(workspace), None)
    per_workspace = entry[1]
    rank_workspace = per_workspace.get((layout, ep_rank))
    if rank_workspace is None:
        rank_workspace = per_workspace[(layout, ep_rank)] = RankWorkspace(workspace[:], layout, ep_rank)
    return rank_workspace


def segment_view(
    workspace: torch.Tensor, rank: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """Bytes of segment `rank` from `offset` on, viewed as a contiguous `shape` tensor of `dtype`."""
    numel = 1
    for size in shape:
        numel *= size
    return workspace[rank, offset : offset + numel * dtype.itemsize].view(dtype).view(shape)
