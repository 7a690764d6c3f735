"""`MoeAlltoAll`: the stateful class engines use, named and shaped as FlashInfer's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from dataclasses import dataclass

import torch

from a2a.ops import validation
from a2a.ops.combine import check_matches_dispatch, combine_plan, output_of_dtype, quantized_payload
from a2a.ops.dispatch import dispatch_plan
from a2a.errors import PhaseError
from a2a.functional import moe_a2a_get_workspace_size_per_rank, moe_a2a_initialize
from a2a.layout import RoundState, WorkspaceLayout, combine_scales_offset, metainfo_index_pairs
from a2a.runtime.process_world import process_world_for
from a2a.runtime.simulated import SimulatedWorld
from a2a.runtime.world import World
from a2a.ops.sanitize import sanitize_plan
from a2a.quantization import SfLayout
from a2a.ops.context import RankContext, context_of
from a2a.workspace import reset_rank_state, segment_view


@dataclass
class _RoundState:
    phase: str = "idle"  # idle -> dispatched -> idle; "deleted" after _reset_workspace
    local_num_tokens: int | None = None
    runtime_max_tokens: int | None = None
    combine_payload_offset: int | None = None
    active_rank_mask: int | None = None  # the dispatch's (None: every rank)


class MoeAlltoAll:
    """Expert-parallel dispatch / combine for one rank, over a workspace shared with its peers.

    `world` supplies the workspace and this rank's stream: an `a2a.ProcessWorld` (one process per
    rank; symmetric memory over CUDA VMM or host shared memory), a torch.distributed process group,
    an mpi4py communicator or a FlashInfer-style CommBackend (wrapped in a `ProcessWorld` on this
    process's CUDA device, else the CPU), an `a2a.SimulatedWorld` (N ranks in one process) or None
    for a single rank. FlashInfer's `mnnvl_config=MnnvlConfig(comm_backend=comm)` is the same as
    `world=comm`. Instances
    with the same (workspace size, max_num_tokens)
    in one world share one workspace (e.g. one instance per layer); their rounds must not interleave.
    """

    _METAINFO_INDEX = {name.removeprefix("MOE_A2A_"): index for name, index in metainfo_index_pairs()}

    def __init__(
        self,
        mapping,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        workspace_size_per_rank: int | None = None,
        hidden_size: int | None = None,
        mnnvl_config: object = None,
        eplb_stats_num_experts: int = 0,
        enable_rank_mask: bool = False,
        *,
        backend: str = "trtllm",
        world: World | object | None = None,
    ):
        self.ep_size = int(mapping.moe_ep_size)
        self.ep_rank = int(mapping.moe_ep_rank)
        validation.check_geometry(self.ep_size, self.ep_rank)
        for name, value in (("top_k", top_k), ("num_experts", num_experts), ("max_num_tokens", max_num_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        validation.check_geometry(self.ep_size, self.ep_rank, top_k, num_experts)
        validation.check_backend(backend)
        if not isinstance(enable_rank_mask, bool):
            raise TypeError(f"enable_rank_mask must be a bool, got {type(enable_rank_mask).__name__}")
        if mnnvl_config is not None:
            if not hasattr(mnnvl_config, "comm_backend"):
                raise TypeError(f"mnnvl_config must have a comm_backend (an MnnvlConfig), got {type(mnnvl_config).__name__}")
            if world is not None:
                raise ValueError("pass either world= or mnnvl_config=, not both")
            world = mnnvl_config.comm_backend
        if workspace_size_per_rank is None:
            if hidden_size is None:
                raise ValueError("hidden_size is required when workspace_size_per_rank is not given")
            workspace_size_per_rank = self.get_moe_workspace_size_per_rank(
                self.ep_size, top_k, max_num_tokens, hidden_size, 0, eplb_stats_num_experts
            )
        if world is not None and not isinstance(world, World):
            # A torch.distributed process group, an mpi4py communicator or a Bootstrap: one process
            # per rank, one ProcessWorld per group, so instances share workspaces.
            world = process_world_for(world, _default_device())
        if world is None:
            if self.ep_size != 1:
                raise ValueError(
                    f"ep_size={self.ep_size} needs a world (a2a.ProcessWorld or a2a.SimulatedWorld) to reach the peers"
                )
            world = SimulatedWorld(1, _default_device())
        if world.ep_size != self.ep_size:
            raise ValueError(f"world has {world.ep_size} ranks but mapping.moe_ep_size is {self.ep_size}")
        self.world = world
        self.max_num_tokens = max_num_tokens
        self.top_k = top_k
        self.num_experts = num_experts
        self.workspace_size_per_rank = workspace_size_per_rank
        self.layout = WorkspaceLayout.compute(self.ep_size, max_num_tokens, eplb_stats_num_experts)
        validation.check_fits("the aux region", self.layout.aux_size, workspace_size_per_rank)
        self.enable_rank_mask = enable_rank_mask
        self._workspace_key = ("moe_alltoall", workspace_size_per_rank, max_num_tokens, eplb_stats_num_experts)
        self.workspace = world.workspace(self._workspace_key, workspace_size_per_rank)
        self._context = context_of(self.workspace, self.layout, self.ep_rank)  # held: no lookup per call
        self.metainfo = self.layout.to_metainfo()
        self.active_rank_mask: int | None = None  # None: every rank takes part (see set_active_ranks)
        self._eplb_gathered_stats: torch.Tensor | None = None
        self._state = _RoundState()

    def set_active_ranks(self, ranks: Sequence[int] | None) -> None:
        """Later rounds run among `ranks` only (None: all): experts of other ranks are not sent to,
        their top-k entries become -1, combine sums the rest, and they are neither signalled nor
        waited for (e.g. a failed rank). Every active rank must set the same list, including itself;
        inactive ranks must not run rounds. Takes effect at the next dispatch."""
        if self._state.phase != "idle":
            raise PhaseError(f"set_active_ranks called in phase {self._state.phase!r}: call it between rounds")
        if ranks is None:
            self.active_rank_mask = None
            return
        mask = 0
        for rank in ranks:
            validation.require_int("active rank", rank, 0, self.ep_size - 1)
            mask |= 1 << rank
        self.active_rank_mask = validation.check_active_rank_mask(mask, self.ep_size, self.ep_rank)

    @staticmethod
    def get_moe_workspace_size_per_rank(
        ep_size: int, top_k: int, max_num_tokens: int, hidden_size: int, extra_payload_bytes_per_token: int = 0,
        eplb_stats_num_experts: int = 0,
    ) -> int:
        """Size for 16-bit hidden states + int32 ids + fp32 weights dispatched, 16-bit combine."""
        dispatch = 2 * hidden_size + 4 * top_k + 4 * top_k + extra_payload_bytes_per_token
        return moe_a2a_get_workspace_size_per_rank(ep_size, max_num_tokens, dispatch, 2 * hidden_size,
                                                   eplb_stats_num_experts)  # fmt: skip

    _WORKSPACE_CACHE: dict[tuple, dict] = {}

    @classmethod
    def get_workspace(cls, workspace_size_per_rank: int, ep_rank: int, ep_size: int, max_num_tokens: int,
                      mapping: object, eplb_stats_num_experts: int = 0, *, backend: str = "trtllm",
                      world: object = None) -> dict:  # fmt: skip
        """FlashInfer's workspace cache: a dict with `workspace` (`[ep_size, size]` uint8, this
        rank's row zeroed), `metainfo` and the arguments, made once per arguments (collective: every
        rank calls it). `world` as for `MoeAlltoAll` (default: the default torch.distributed group
        for ep_size > 1, a one-rank world otherwise); FlashInfer takes it from `mapping`."""
        validation.check_backend(backend)
        if world is None:
            world = process_world_for(None, _default_device()) if ep_size > 1 else SimulatedWorld(1, _default_device())
        elif not isinstance(world, World):
            world = process_world_for(world, _default_device())
        key = (workspace_size_per_rank, ep_rank, ep_size, max_num_tokens, eplb_stats_num_experts, backend, id(world))
        entry = cls._WORKSPACE_CACHE.get(key)
        if entry is None or entry["world"] is not world:
            if world.ep_size != ep_size:
                raise ValueError(f"world has {world.ep_size} ranks, ep_size is {ep_size}")
            workspace = world.workspace(("get_workspace", workspace_size_per_rank, max_num_tokens,
                                         eplb_stats_num_experts), workspace_size_per_rank)  # fmt: skip
            with world.stream(ep_rank).activate():
                metainfo = moe_a2a_initialize(workspace, ep_rank, ep_size, max_num_tokens, eplb_stats_num_experts)
            world.barrier()  # no peer dispatches into this rank's row before it is zeroed
            entry = cls._WORKSPACE_CACHE[key] = dict(
                workspace_size_per_rank=workspace_size_per_rank, max_num_tokens=max_num_tokens, ep_rank=ep_rank,
                ep_size=ep_size, eplb_stats_num_experts=eplb_stats_num_experts, workspace=workspace,
                metainfo=metainfo, world=world)  # fmt: skip
        return entry

    @property
    def eplb_gathered_stats(self) -> torch.Tensor | None:
        """`[ep_size, eplb_stats_num_experts]` int32 view of every rank's statistics from the last
        dispatch given `eplb_local_stats` (None before one). The same memory every round: read or
        copy it before this rank's combine."""
        return self._eplb_gathered_stats

    def checkpoint_prepare(self) -> None:
        """FlashInfer's checkpoint_prepare: release the memory this rank shares with its peers so the
        process can be checkpointed, keeping the workspace's addresses (captured CUDA graphs stay
        valid). Collective, between rounds (`PhaseError` during one); repeated calls do nothing.
        It acts on the world: every instance on it refuses to dispatch until `checkpoint_restore`.
        A simulated world shares nothing with other processes: nothing is released. Host shared
        memory (a CPU ProcessWorld) raises NotImplementedError."""
        if self._state.phase != "idle":
            raise PhaseError(f"checkpoint_prepare called in phase {self._state.phase!r}: call it between rounds")
        self.world.checkpoint_prepare()

    def checkpoint_restore(self, comm_backend: object = None) -> None:
        """FlashInfer's checkpoint_restore: after checkpoint_prepare, map fresh, zeroed memory at the
        same addresses over `comm_backend` (the rebuilt communicator: a CommBackend, ProcessGroup,
        mpi4py Comm or Bootstrap of the same rank and size; None: the world's own). Collective;
        does nothing unless the world is checkpointed. Every instance on the world then starts
        from a fresh workspace (its next dispatch forgets the rounds before)."""
        if not self.world.checkpointed:
            return
        group = comm_backend if comm_backend is not None else getattr(self.world, "bootstrap", None)
        self.world.checkpoint_restore(group)

    def _check_not_checkpointed(self) -> None:
        """Refuse a round while the world is checkpointed; after a restore that gave fresh, zeroed
        segments, forget this workspace's earlier rounds (once per workspace, whichever instance
        comes first)."""
        if self.world.checkpointed:
            raise PhaseError("dispatch after checkpoint_prepare: the workspace is released; call "
                             "checkpoint_restore first")  # fmt: skip
        generation = self.world.checkpoint_generation
        state = self._context.state
        if state.checkpoint_generation != generation:
            reset_rank_state(self.workspace, self.ep_rank)
            state.checkpoint_generation = generation

    def _ready_to_launch(self) -> None:
        """In SimulatedWorld.run_ranks: wait until every rank has planned this call (see there)."""
        self.world.ready_to_launch(self.ep_rank)

    @contextmanager
    def _on_rank_stream(self, *caller_tensors: object) -> Iterator[None]:
        """Run on the rank's stream, after the caller's current work. The caller's tensors used
        there (None and lists of tensors allowed) are recorded on that stream, so the caching
        allocator does not hand their memory to a new tensor of the caller's stream (which could
        overwrite it) before the rank's kernels have read or written it."""
        if not self.world.switches_streams:  # the caller's stream is the rank stream
            yield
            return
        self.world.wait_for_caller(self.ep_rank)
        with self.world.stream(self.ep_rank).activate():
            stream = torch.cuda.current_stream() if self.world.device.type == "cuda" else None
            for item in caller_tensors:
                for tensor in item if isinstance(item, (list, tuple)) else (item,):
                    if stream is not None and isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                        tensor.record_stream(stream)
            yield

    def dispatch(
        self,
        token_selected_experts: torch.Tensor,
        input_payloads: Sequence[torch.Tensor],
        runtime_max_tokens_per_rank: int,
        invalid_token_expert_id: int | None = None,
        expert_id_payload_index: int | None = None,
        eplb_local_stats: torch.Tensor | None = None,
        active_rank_mask: torch.Tensor | None = None,
        *,
        token_count: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Dispatch this rank's tokens; returns `[ep_size, rt, W_p]` receive views (see moe_a2a_dispatch).

        `eplb_local_stats`: see moe_a2a_dispatch; the gathered statistics are `eplb_gathered_stats`.
        `active_rank_mask` (FlashInfer's form, an instance made with `enable_rank_mask=True`): this
        round's mask as a `moe_a2a_active_rank_mask` tensor, else the one of `set_active_ranks`.

        With `invalid_token_expert_id`, the receive plane `input_payloads[expert_id_payload_index]`
        (an int32 `[num_tokens, top_k]` expert-id payload) is sanitized: stale rows get that id.
        With `token_count` (int32 `[1]` on the device) only that many leading rows are tokens; the
        combine output keeps all `num_tokens` rows, zero past the count (one CUDA graph, any count).
        """
        self._check_not_checkpointed()  # first: a restore forgets the faults of the rounds before it
        rank_workspace = self._rank_workspace
        rank_workspace.raise_if_faulted()  # a lost round outranks a phase error
        if self._state.phase != "idle":
            raise PhaseError(f"dispatch called in phase {self._state.phase!r}: dispatch called twice without combine")
        rank_workspace.check_no_live_round("MoeAlltoAll.dispatch", id(self))
        # Everything is checked before anything is launched: a call that raises has changed nothing.
        mask = self._round_mask(active_rank_mask)
        plan, num_tokens = dispatch_plan(rank_workspace, token_selected_experts, input_payloads, token_count,
                                         runtime_max_tokens_per_rank, self.ep_size, self.top_k, self.num_experts,
                                         mask, eplb_local_stats)  # fmt: skip
        sanitize = None
        if invalid_token_expert_id is not None:
            if expert_id_payload_index is None:
                raise ValueError("expert_id_payload_index is required when invalid_token_expert_id is given")
            validation.require_int("expert_id_payload_index", expert_id_payload_index, 0, len(input_payloads) - 1)
            sanitize = sanitize_plan(rank_workspace, plan.recv[expert_id_payload_index], invalid_token_expert_id)
        self._ready_to_launch()
        with self._on_rank_stream(token_selected_experts, input_payloads, token_count, eplb_local_stats):
            plan.launch(token_selected_experts, input_payloads, token_count, num_tokens, eplb_local_stats)
            if sanitize is not None:
                sanitize()
        rank_workspace.begin_round(self._owner_name, id(self), num_tokens, runtime_max_tokens_per_rank,
                                   plan.combine_offset, plan.active_rank_mask)  # fmt: skip
        self._state = _RoundState("dispatched", num_tokens, runtime_max_tokens_per_rank, plan.combine_offset,
                                  plan.active_rank_mask)  # fmt: skip
        if plan.gathered_stats is not None:
            self._eplb_gathered_stats = plan.gathered_stats
        return plan.recv

    def _round_mask(self, active_rank_mask: object) -> int | None:
        """This round's mask: FlashInfer's per-call tensor (needs enable_rank_mask), else set_active_ranks'."""
        if active_rank_mask is None:
            return self.active_rank_mask
        if not self.enable_rank_mask:
            raise ValueError("active_rank_mask needs an instance made with enable_rank_mask=True (as in FlashInfer)")
        return validation.rank_mask_argument(active_rank_mask, True, self.ep_size)

    @cached_property
    def _owner_name(self) -> str:  # built once: an f-string with the id costs ~0.5 us a dispatch
        return f"MoeAlltoAll(ep_rank={self.ep_rank}, top_k={self.top_k}, num_experts={self.num_experts}) at {id(self):#x}"

    def _check_dispatched(self, what: str, runtime_max_tokens_per_rank: int) -> None:
        self._rank_workspace.raise_if_faulted()  # a lost round outranks a phase error
        if self._state.phase != "dispatched":
            raise PhaseError(f"{what} called in phase {self._state.phase!r}: it needs a successful dispatch first")
        self._rank_workspace.live_round_for(f"MoeAlltoAll.{what}", id(self))
        missing = self.world.peers_not_arrived(self.ep_rank)
        if missing:
            raise PhaseError(
                f"{what} on rank {self.ep_rank}: its dispatch has not completed, rank(s) {missing} have not dispatched "
                "yet, so its receive views hold no rows yet. Driving a simulated world on the CPU from one thread, "
                "call every rank's dispatch before any rank uses its views, or run each rank's program with "
                "SimulatedWorld.run_ranks"
            )
        if runtime_max_tokens_per_rank != self._state.runtime_max_tokens:
            raise ValueError(
                f"runtime_max_tokens_per_rank ({runtime_max_tokens_per_rank}) must equal the dispatch's "
                f"({self._state.runtime_max_tokens})"
            )

    def combine(
        self,
        payload: torch.Tensor,
        runtime_max_tokens_per_rank: int,
        payload_in_workspace: bool = False,
        output_dtype: torch.dtype | None = None,
        output_scales: torch.Tensor | None = None,
        output_scalar_scale: float = 1.0,
        sf_layout: int = SfLayout.layout_linear,
        output: torch.Tensor | None = None,
        *,
        use_low_precision: bool = False,
        active_rank_mask: torch.Tensor | None = None,
        payload_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Combine this round's expert outputs `[ep_size, rt, H]`; returns `[num_local_tokens, H]`.

        A float8_e4m3fn payload needs `payload_scales` `[ep_size, rt, 1]` fp32 (see moe_a2a_combine);
        in the workspace they go to `get_combine_scales_tensor_in_workspace`. FlashInfer's
        arguments (`output_dtype`, `output_scales`, `output_scalar_scale`, `sf_layout`,
        `use_low_precision`) as in moe_a2a_combine; `active_rank_mask` must be the dispatch's."""
        validation.check_combine_output_format(output_dtype, output_scales, sf_layout)
        if not isinstance(use_low_precision, bool):
            raise TypeError(f"use_low_precision must be a bool, got {type(use_low_precision).__name__}")
        self._check_dispatched("combine", runtime_max_tokens_per_rank)
        if active_rank_mask is not None and self._round_mask(active_rank_mask) != self._state.active_rank_mask:
            raise ValueError("active_rank_mask must be the one of this round's dispatch")
        rank_workspace = self._rank_workspace
        state = self._state
        check_matches_dispatch(rank_workspace.live_round_for("MoeAlltoAll.combine", id(self)), state.local_num_tokens,
                               runtime_max_tokens_per_rank, state.combine_payload_offset)  # fmt: skip
        if use_low_precision:
            with self._on_rank_stream(payload):  # after the caller's expert outputs, like the combine itself
                payload, payload_scales = quantized_payload(payload, payload_scales)
            payload_in_workspace = False
        output = output_of_dtype(output, output_dtype, state.local_num_tokens, payload)
        plan = combine_plan(rank_workspace, payload, payload_scales, state.local_num_tokens, runtime_max_tokens_per_rank,
                            self.ep_size, self.top_k, state.combine_payload_offset, payload_in_workspace, output,
                            state.active_rank_mask)  # fmt: skip
        self._ready_to_launch()
        with self._on_rank_stream(payload, payload_scales, output):
            if output is None:
                output = torch.empty((state.local_num_tokens, plan.hidden), dtype=plan.output_dtype, device=plan.device)
            plan.launch(payload, payload_scales, state.local_num_tokens, output)
        rank_workspace.end_round()
        self._state = _RoundState()
        return output

    def get_combine_payload_tensor_in_workspace(
        self, runtime_max_tokens_per_rank: int, hidden_size: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """This rank's combine plane `[ep_size, rt, hidden_size]`: write expert outputs here, then
        `combine(..., payload_in_workspace=True)` skips the staging copy."""
        self._check_dispatched("get_combine_payload_tensor_in_workspace", runtime_max_tokens_per_rank)
        validation.require_int("hidden_size", hidden_size, 1)
        shape = (self.ep_size, runtime_max_tokens_per_rank, hidden_size)
        offset = self._state.combine_payload_offset
        validation.check_fits(
            "the combine plane", offset + self.ep_size * runtime_max_tokens_per_rank * hidden_size * dtype.itemsize,
            self.workspace.shape[1],
        )  # fmt: skip
        return segment_view(self.workspace, self.ep_rank, offset, dtype, shape)

    def get_combine_scales_tensor_in_workspace(self, runtime_max_tokens_per_rank: int, hidden_size: int) -> torch.Tensor:
        """This rank's fp32 `[ep_size, rt, 1]` row scales for a float8_e4m3fn combine plane
        (`get_combine_payload_tensor_in_workspace(rt, hidden_size, torch.float8_e4m3fn)`), placed
        right after that plane."""
        self._check_dispatched("get_combine_scales_tensor_in_workspace", runtime_max_tokens_per_rank)
        validation.require_int("hidden_size", hidden_size, 1)
        rt = runtime_max_tokens_per_rank
        offset = combine_scales_offset(self._state.combine_payload_offset, self.ep_size, rt, hidden_size)
        validation.check_fits("the combine scales", offset + 4 * self.ep_size * rt, self.workspace.shape[1])
        return segment_view(self.workspace, self.ep_rank, offset, torch.float32, (self.ep_size, rt, 1))

    def num_invalid_expert_ids(self) -> int:
        """(token, k) pairs skipped in this rank's last dispatch for an id outside [0, num_experts).

        Reads device memory: synchronises this rank's stream.
        """
        self.synchronize()
        state = self._rank_workspace.round_state
        return int(state[RoundState.INVALID_COUNT].item())

    def synchronize(self) -> None:
        """Block until this rank's stream has run everything submitted so far, then raise the fault
        one of its waits recorded, if any (`A2AFaultError`: `A2ATimeoutError` naming the ranks whose
        signal never came, `A2APeerFailedError`, `A2AMismatchError`).

        After a fault every later call of this rank raises too, and its outputs since the fault are
        NaN; drop the instances (and the world) on every rank and build new ones.
        """
        self.world.stream(self.ep_rank).synchronize()
        self._rank_workspace.raise_if_faulted()

    @property
    def _rank_workspace(self) -> RankContext:
        return self._context

    def _reset_workspace(self) -> None:
        """Test helper: drop this geometry's shared workspace and retire the instance."""
        self.world.release_workspace(self._workspace_key)
        self._state = _RoundState("deleted")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
