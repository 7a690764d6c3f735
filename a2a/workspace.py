"""Typed views of one rank's regions of a workspace, its protocol words, and its round state.

Views onto other ranks' segments are strided tensors `[ep_size, ...]` whose row stride is the
workspace's segment stride, so a kernel reaches segment t as `base + t * stride` in int64.

What the host knows about a rank's rounds (the live round, the host-mapped copy of its fault
record) lives in a `RankState` shared by every tensor over the same storage: a second tensor
object over the same workspace (a view, a re-wrap) sees the same live round and the same fault,
and it lives exactly as long as the memory (a new allocation starts with a fresh one).
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from a2a.errors import A2AFaultError, PhaseError, fault_error
from a2a.layout import ROUND_STATE_LEN, RoundState, WorkspaceLayout, num_route_blocks
from a2a.runtime.protocol import FAULT_RECORD_WORDS, SIGNATURE_WORDS, FlagArray, Phase
from a2a.runtime.streams import FlagWait


@dataclass
class LiveRound:
    """A dispatched round of one rank that has not been combined yet."""

    owner: str  # who dispatched it, named in errors ("moe_a2a_dispatch", or a MoeAlltoAll)
    owner_id: int  # id() of the MoeAlltoAll, 0 for the functional API
    num_tokens: int  # rows of the dispatch's token tensors
    runtime_max_tokens: int
    combine_offset: int


@dataclass(eq=False)
class RankState:
    """The host's knowledge of one rank's rounds on one piece of workspace memory."""

    host_record: object | None  # HostMappedWords on CUDA (the kernels write it), None on the CPU
    live: LiveRound | None = None
    rounds_seen: int = 0  # dispatches the host saw on this memory (0: a copy it knows nothing of)
    sat_out: int = 0  # ranks left out of an earlier round on this memory (bit r: rank r)
    checkpoint_generation: int = 0  # the world's restores this knowledge has caught up with


# storage -> {(byte offset of the rank's segment in it, segment stride, size): RankState}. Storage
# objects are unique per allocation while it lives (torch keeps their Python object), so the
# entry goes with the memory, and every tensor over it finds the same state.
_rank_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rank_state_for(workspace: torch.Tensor, ep_rank: int) -> RankState:
    storage = workspace.untyped_storage()
    key = (workspace.data_ptr() - storage.data_ptr() + ep_rank * workspace.stride(0), workspace.stride(0),
           workspace.shape[1])  # fmt: skip
    states = _rank_states.setdefault(storage, {})
    state = states.get(key)
    if state is None:
        host_record = None
        if workspace.device.type == "cuda":
            from a2a.runtime.host_mapped import HostMappedWords

            host_record = HostMappedWords(FAULT_RECORD_WORDS, workspace.device)
        state = states[key] = RankState(host_record)
    return state


def reset_rank_state(workspace: torch.Tensor, ep_rank: int) -> None:
    """Forget the host's knowledge of this rank's rounds (its segment was just zeroed)."""
    state = _rank_state_for(workspace, ep_rank)
    state.live = None
    state.rounds_seen = 0
    state.sat_out = 0
    if state.host_record is not None:
        ctypes.memset(ctypes.addressof(state.host_record.words), 0, 4 * FAULT_RECORD_WORDS)


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

    @property
    def stride_rank(self) -> int:
        """int32 elements between two segments (what the kernels take)."""
        return self.segment_stride // 4

    def own(self, offset: int, numel: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Own segment bytes [offset, offset + numel * itemsize) as a 1-D `dtype` tensor."""
        nbytes = numel * dtype.itemsize
        return self.workspace[self.ep_rank, offset : offset + nbytes].view(dtype)

    def own_address(self, offset: int) -> int:
        """Address of byte `offset` of this rank's segment."""
        return self.workspace.data_ptr() + self.ep_rank * self.segment_stride + offset

    def address(self, rank: int, offset: int) -> int:
        """Address of byte `offset` of segment `rank`."""
        return self.workspace.data_ptr() + rank * self.segment_stride + offset

    def every_rank(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of every segment as `[ep_size, nbytes / itemsize]` of `dtype`."""
        return self.workspace[:, offset : offset + nbytes].view(dtype)

    @cached_property
    def state(self) -> RankState:
        return _rank_state_for(self.workspace, self.ep_rank)

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

    def round_word(self, index: int) -> torch.Tensor:
        """Word `index` (a RoundState index) of the own round state as a `[1]` int32 view."""
        return self.round_words(index, 1)

    def round_words(self, index: int, count: int) -> torch.Tensor:
        """Words `index .. index + count` of the own round state as an int32 view."""
        return self.round_state[index : index + count]

    @cached_property
    def fault_record(self) -> torch.Tensor:
        first = RoundState.FAULT_RECORD
        return self.round_state[first : first + FAULT_RECORD_WORDS]

    @cached_property
    def block_counts(self) -> torch.Tensor:
        blocks = num_route_blocks(self.layout.max_num_tokens)
        return self.own(self.layout.block_counts_offset, blocks * self.ep_size)

    @cached_property
    def block_invalid(self) -> torch.Tensor:
        return self.own(self.layout.block_invalid_offset, num_route_blocks(self.layout.max_num_tokens))

    @cached_property
    def flag_block_every_rank(self) -> torch.Tensor:
        """The three flag arrays of every segment, `[ep_size, 3 * flag_array_stride]` int32."""
        return self.every_rank(self.layout.dispatch_flags_offset, 4 * 3 * self.layout.flag_array_stride, torch.int32)

    def signatures_every_rank(self, phase: Phase) -> torch.Tensor:
        """A phase's signature rows of every segment, `[ep_size, ep_size * SIGNATURE_WORDS]` int32."""
        return self.every_rank(self.layout.signatures_offset_of(_signature_row(phase)),
                               4 * self.ep_size * SIGNATURE_WORDS, torch.int32)  # fmt: skip

    @property
    def host_record_address(self) -> int:
        """Device address of the host-mapped fault record (0 on the CPU)."""
        record = self.state.host_record
        return 0 if record is None else record.device_address

    def flag_wait(self, phase: Phase, active_rank_mask: int, timeout_ms: int,
                  compare_signatures: bool = True) -> FlagWait:  # fmt: skip
        """The host wait (CPU path) of `phase` among the active ranks (bit r: rank r); it compares
        the peers' signatures unless `compare_signatures` is False (a combine whose gather does)."""
        layout = self.layout
        row = FlagArray.GATHER if phase is Phase.ORDERING else FlagArray(_signature_row(phase))
        flags_offset = layout.dispatch_flags_offset + 4 * layout.flag_array_stride * row
        active = tuple(r for r in range(self.ep_size) if active_rank_mask >> r & 1)
        # The ordering wait is for the ranks of the previous round (their mask is read when it runs).
        peers = tuple(range(self.ep_size)) if phase is Phase.ORDERING else active
        value_index = RoundState.GATHER_COUNT if phase is Phase.ORDERING else RoundState.FLAG_VALUE
        state = layout.round_state_offset
        def own_word(rank: int, array: FlagArray) -> int:
            return self.address(rank, layout.dispatch_flags_offset + 4 * (layout.flag_array_stride * array + self.ep_rank))

        others = [t for t in active if t != self.ep_rank]
        poison = tuple(own_word(t, array) for t in others for array in FlagArray)
        signatures: tuple[int, ...] = ()
        own_signature = 0
        if phase is not Phase.ORDERING and compare_signatures:
            rows = layout.signatures_offset_of(_signature_row(phase))
            signatures = tuple(self.own_address(rows + 4 * SIGNATURE_WORDS * s) for s in peers)
            own_signature = self.own_address(rows + 4 * SIGNATURE_WORDS * self.ep_rank)
        return FlagWait(
            phase=phase, waiting_rank=self.ep_rank, peer_ranks=peers,
            flag_addresses=tuple(self.own_address(flags_offset + 4 * s) for s in peers),
            value_address=self.own_address(state + 4 * value_index),
            record_address=self.own_address(state + 4 * RoundState.FAULT_RECORD), poison_addresses=poison,
            signal_addresses=tuple(own_word(t, row) for t in others),
            peer_mask_address=self.own_address(state + 4 * RoundState.GATHERED_MASK) if phase is Phase.ORDERING else 0,
            signature_addresses=signatures, own_signature_address=own_signature, signature_words=SIGNATURE_WORDS,
            timeout_ms=timeout_ms,
        )  # fmt: skip

    def fault(self) -> A2AFaultError | None:
        """The fault this rank recorded, if any (no synchronisation: on CUDA the host-mapped copy,
        which the kernels write when they record and whenever they find the rank faulted)."""
        record = self.state.host_record
        if record is not None:
            if record.words[0] == 0:
                return None
            return fault_error(record.read(), self.ep_rank)
        address = self.own_address(self.layout.round_state_offset + 4 * RoundState.FAULT_RECORD)
        if ctypes.c_int32.from_address(address).value == 0:
            return None
        return fault_error(list((ctypes.c_int32 * FAULT_RECORD_WORDS).from_address(address)), self.ep_rank)

    def raise_if_faulted(self) -> None:
        """Raise the recorded fault (`A2AFaultError`), if any. Once recorded, every later call raises."""
        error = self.fault()
        if error is not None:
            raise error

    def check_returning_ranks(self, active_rank_mask: int) -> None:
        """A rank that sat out a round on this workspace cannot take part again: its epoch and
        gather counters are behind its peers' (every wait would time out), and it may still be
        reading when they write. Recreate the workspace on every rank to bring it back."""
        returning = active_rank_mask & self.state.sat_out
        if returning:
            ranks = [r for r in range(self.ep_size) if returning >> r & 1]
            raise ValueError(
                f"active_rank_mask brings back rank(s) {ranks}, which sat out an earlier round on this workspace: "
                "their signal counters are out of step with this rank's. A rank left out stays out for the "
                "workspace's life; build a new world / workspace on every rank to take it back"
            )

    # The round this rank has dispatched and not yet combined (one per workspace and rank).
    def begin_round(self, owner: str, owner_id: int, num_tokens: int, runtime_max_tokens: int, combine_offset: int,
                    active_rank_mask: int) -> None:  # fmt: skip
        self.state.live = LiveRound(owner, owner_id, num_tokens, runtime_max_tokens, combine_offset)
        self.state.rounds_seen += 1
        self.state.sat_out |= ((1 << self.ep_size) - 1) & ~active_rank_mask

    def check_no_live_round(self, what: str, owner_id: int) -> None:
        live = self.state.live
        if live is not None:
            who = "this instance" if live.owner_id == owner_id and owner_id else live.owner
            raise PhaseError(
                f"{what} on rank {self.ep_rank}: this workspace already has a live round on this rank, dispatched "
                f"by {who} (runtime_max_tokens_per_rank={live.runtime_max_tokens}) and not combined yet. One round "
                "per workspace and rank may be live: combine it first, or give the other user its own workspace"
            )

    def live_round_for(self, what: str, owner_id: int) -> LiveRound | None:
        """The live round a combine ends. None only where the host saw no dispatch on this memory
        at all (a copy made by torch.library / functionalization): the kernels then check the
        combine against the dispatch recorded in the workspace."""
        live = self.state.live
        if live is None:
            if owner_id == 0 and self.state.rounds_seen == 0:
                return None
            raise PhaseError(f"{what} on rank {self.ep_rank}: no live round on this workspace (its last round was "
                             "already combined, or none was dispatched): dispatch first")  # fmt: skip
        if owner_id and live.owner_id != owner_id:
            raise PhaseError(f"{what} on rank {self.ep_rank}: the live round on this workspace was dispatched by "
                             f"{live.owner}, not by this instance")  # fmt: skip
        return live

    def end_round(self) -> None:
        self.state.live = None


def _signature_row(phase: Phase) -> int:
    """Row of a phase in the signatures region (0: dispatch, 1: combine)."""
    return 0 if phase is Phase.DISPATCH else 1


def segment_view(
    workspace: torch.Tensor, rank: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """Bytes of segment `rank` from `offset` on, viewed as a contiguous `shape` tensor of `dtype`."""
    numel = 1
    for size in shape:
        numel *= size
    return workspace[rank, offset : offset + numel * dtype.itemsize].view(dtype).view(shape)
