"""One rank's context for the launchers: its workspace views, its launch plans, found by identity.

`RankContext` is a `RankWorkspace` (typed views, flag addresses, the host's round state and fault
record: a2a.workspace) plus the rank's launch plans: one per call signature, built and checked
once (a2a.ops.dispatch / combine / sanitize), at most MAX_PLANS_PER_RANK, oldest dropped first.
`context_of` builds it once per (workspace tensor, layout, rank) and `MoeAlltoAll` holds it;
`resolve_context` is the functional API's way in from (workspace, metainfo, ep_rank), checked on
the first call and found by identity afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import cached_property

import torch

from a2a import envs
from a2a.layout import WorkspaceLayout
from a2a.ops import validation
from a2a.workspace import RankWorkspace


def tensor_key(tensor: object, *, rows: bool = True) -> tuple | None:
    """What a plan depends on of a tensor argument (None for None): dtype, shape, contiguity,
    device, address alignment mod 16. With `rows` False the row count is left out (the token count
    is a launch argument, never part of a kernel variant): the key holds the number of dimensions
    and the last one, which is the whole row shape of every tensor a plan accepts there (2-D, or
    the 1-D token count, whose one dimension stays in the key)."""
    if tensor is None:
        return None
    shape = tensor.shape  # type: ignore[attr-defined]
    if not rows:  # one torch.Size read, then tuple work: 0.67 vs 0.90 us with dim() and shape[-1]
        shape = (len(shape), shape[-1] if shape else None)
    dtype = tensor.dtype  # type: ignore[attr-defined]
    # The device itself, not get_device(): that is -1 for a CPU and a meta tensor alike. The lazy
    # conjugate and negative bits: such a view's memory does not hold its values (the checks refuse
    # it); only complex tensors carry the conjugate bit, so real ones skip that read.
    return (dtype, shape, tensor.is_contiguous(), tensor.device, tensor.data_ptr() & 15,  # type: ignore[attr-defined]
            (dtype.is_complex and tensor.is_conj()) or tensor.is_neg())  # type: ignore[attr-defined]


def rows_and_key(tensor: torch.Tensor) -> tuple[int, tuple]:
    """The rows of a tensor of one or more dimensions and `tensor_key(tensor, rows=False)`, from one
    read of its shape (dispatch keys its experts and payloads and checks their rows in one pass).
    The key's properties are spelled out again rather than shared through a call (0.16 us more a
    dispatch of three payloads on a 2-core CPU machine); tests/test_validation.py checks the two agree."""
    shape = tensor.shape
    dtype = tensor.dtype
    return shape[0], (dtype, (len(shape), shape[-1]), tensor.is_contiguous(), tensor.device, tensor.data_ptr() & 15,
                      (dtype.is_complex and tensor.is_conj()) or tensor.is_neg())  # fmt: skip


def plan_key(op: str, tensors: Callable[[], tuple], values: tuple) -> object:
    """The call-signature key of one op: what its validation and kernel variants depend on, the
    int arguments with their types included. Equal keys: the same checks pass and the same plan
    applies. `tensors` builds the tensor part (from `tensor_key`); arguments that are not tensors
    make a key no plan has, so the full build's checks report them. (Dispatch and combine, called
    every layer, build the same kind of key inline: a2a.ops.dispatch / combine `_plan_key`.)"""
    try:
        tensor_part = tensors()
    except (AttributeError, TypeError, RuntimeError):  # RuntimeError: data_ptr() of a sparse tensor
        return object()
    return (op, tensor_part, values, tuple(map(type, values)))


class RankContext(RankWorkspace):
    """A rank's workspace views (RankWorkspace) and its launch plans."""

    @cached_property
    def plans(self) -> dict:
        """Launch plans of this rank's call signatures (a2a.ops.dispatch / combine / sanitize), newest last."""
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


def timeout_of_plan() -> tuple[int, int]:
    """(timeout_ns, timeout_ms) of a wait planned now (A2A_SIGNAL_TIMEOUT_S)."""
    seconds = envs.signal_timeout_s()
    return min(int(seconds * 1e9), 2**62), min(max(1, int(seconds * 1e3)), 2**31 - 1)


# id(workspace tensor) -> (weak reference, {(layout, ep_rank): RankContext, and for
# resolve_context (metainfo id, version, ep_rank): (metainfo, RankContext)}). A RankContext
# keeps only a view of the workspace, so dropping the tensor drops its entry and frees the memory.
_rank_workspaces: dict[int, tuple[weakref.ref, dict]] = {}
MAX_PLANS_PER_RANK = 64


def resolve_context(workspace: object, metainfo: object, ep_rank: object) -> RankContext:
    """The checked `RankContext` of the functional API's (workspace, metainfo, ep_rank).

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
    rank_workspace = context_of(checked, layout, ep_rank)  # type: ignore[arg-type]
    if key is not None:
        per_workspace = _rank_workspaces[id(checked)][1]
        # A caller that builds a new metainfo tensor for every call must not grow this without bound.
        resolved = [k for k in per_workspace if isinstance(k, tuple) and k and k[0] == "metainfo"]
        if len(resolved) >= MAX_PLANS_PER_RANK:
            del per_workspace[resolved[0]]
        per_workspace[key] = (metainfo, rank_workspace)
    return rank_workspace


def context_of(workspace: torch.Tensor, layout: WorkspaceLayout, ep_rank: int) -> RankContext:
    """The `RankContext` of (workspace, layout, rank), built once: its views, flag addresses and plans."""
    entry = _rank_workspaces.get(id(workspace))
    if entry is None or entry[0]() is not workspace:
        entry = (weakref.ref(workspace), {})
        _rank_workspaces[id(workspace)] = entry
        weakref.finalize(workspace, _rank_workspaces.pop, id(workspace), None)
    per_workspace = entry[1]
    rank_workspace = per_workspace.get((layout, ep_rank))
    if rank_workspace is None:
        rank_workspace = per_workspace[(layout, ep_rank)] = RankContext(workspace[:], layout, ep_rank)
    return rank_workspace
