"""Typed views of one rank's regions of a workspace, and the addresses of its flags.

Views onto other ranks' segments are strided tensors `[ep_size, ...]` whose row stride is the
workspace's segment stride, so a kernel reaches segment t as `base + t * stride` in int64.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from a2a.layout import ROUND_STATE_LEN, WorkspaceLayout, num_route_blocks


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

    def flag_addresses(self, flags_offset: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(where this rank signals: its word in every segment, where it waits: every word of its own)."""
        base = self.workspace.data_ptr()
        stride = self.segment_stride
        signal = tuple(base + t * stride + flags_offset + 4 * self.ep_rank for t in range(self.ep_size))
        own = base + self.ep_rank * stride + flags_offset
        wait = tuple(own + 4 * s for s in range(self.ep_size))
        return signal, wait

    @cached_property
    def dispatch_flags(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.flag_addresses(self.layout.dispatch_flags_offset)

    @cached_property
    def combine_flags(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.flag_addresses(self.layout.combine_flags_offset)


# id(workspace tensor) -> (weak reference, {(layout, ep_rank): RankWorkspace}). A RankWorkspace keeps
# only a view of the workspace, so dropping the tensor drops its entry and frees the memory.
_rank_workspaces: dict[int, tuple[weakref.ref, dict]] = {}


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
