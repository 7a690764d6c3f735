"""Dispatch launcher: validate, route, copy payloads into the targets' receive planes, signal, wait.

Two launches (routing, then the copy with the barrier in its last program), or, for a round of at
most one routing block whose grid fits on the GPU beside every peer's and top_k <= 8, one fused
launch of both (`_fused_dispatch_kernel`; A2A_FUSED_DISPATCH=0 turns it off). With PDL the
kernel after a dispatch may launch once the barrier's wait for the peers ends (it waits for the
dispatch to complete before it loads or stores)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from a2a import envs
from a2a.ops import configs, validation
from a2a.ops.barrier import barrier_args, dispatch_signature, protocol_constexprs, signature_tensor
from a2a.expert_partition import ExpertPartition
from a2a.kernels import _dispatch_copy_kernel, _fused_dispatch_kernel, _route_kernel, _share_stats_kernel
from a2a.ops.launch import KernelLaunch, pdl_capable, pdl_constexprs, use_pdl
from a2a.layout import MAX_TOP_K, ROUTE_BLOCK_TOKENS, RoundLayout, RoundState, num_route_blocks
from a2a.runtime.protocol import FlagArray, Phase, mask_halves
from a2a.runtime.scheduler import run_steps
from a2a.runtime.current_stream import current_stream
from a2a.ops.sanitize import expert_id_sanitize_launch
from a2a.ops.context import resolve_context, rows_and_key, tensor_key, timeout_of_plan
from a2a.workspace import RankWorkspace, segment_view


def moe_a2a_dispatch(
    token_selected_experts: torch.Tensor,
    input_payloads: Sequence[torch.Tensor],
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    num_experts: int,
    enable_pdl: bool | None = None,
    eplb_local_stats: torch.Tensor | None = None,
    enable_rank_mask: bool = False,
    active_rank_mask: torch.Tensor | int | None = None,
    *,
    backend: str = "trtllm",
    recv_view_cache: dict | None = None,
    token_count: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], int, torch.Tensor | None]:
    """Send every local token's payload rows to the ranks that own its experts.

    token_selected_experts: `[num_tokens, top_k]` int32 global expert ids (ids outside
    `[0, num_experts)` are skipped). input_payloads: 1..8 contiguous `[num_tokens, W_p]` tensors of
    any dtype. Runs on the current stream (or the activated rank stream) and returns, without
    waiting, one `[ep_size, runtime_max_tokens_per_rank, W_p]` view per payload into this rank's
    receive planes (row `[s][j]`: the j-th token source s sent here; rows `j >= recv_counters[s]`
    are stale), the rank-local byte offset of the combine plane for this round, and the gathered
    EPLB statistics (None without `eplb_local_stats`).

    eplb_local_stats: an int32 `[eplb_stats_num_experts]` tensor (the length given to
    `moe_a2a_initialize`) of this rank's statistics; every active rank's lands in row r of the
    returned `[ep_size, eplb_stats_num_experts]` int32 view (rows of inactive ranks are zero).
    The view is the same memory every round: read or copy it before this rank's combine (a peer's
    next dispatch may rewrite it after that). Every rank passes stats, or none does, on workspaces
    of the same eplb_stats_num_experts (both checked at the barrier).

    enable_rank_mask / active_rank_mask (FlashInfer's form): with `enable_rank_mask=True`, a CPU
    uint64 `[1]` tensor (`moe_a2a_active_rank_mask`) or None (every rank).
    enable_pdl: as in FlashInfer, None launches every kernel with programmatic dependent launch on
    GPUs of compute capability 9.0 and later (each kernel may start while the previous one on the
    stream finishes, and waits for it before any load or store), False does not; `A2A_PDL=0` turns
    it off everywhere. It changes no result. backend, recv_view_cache: accepted as in FlashInfer;
    they change no result (the receive views are cached per call signature anyway).

    token_count (a2a addition): an int32 `[1]` tensor on the workspace's device holding how many
    leading rows are real tokens this call (clamped to [0, num_tokens]); the rest are padding,
    never sent, and combine returns zero rows for them. The count is read on the device, so one
    captured CUDA graph serves every count up to the tensors' rows.

    active_rank_mask as an int (a2a's form): bit r set if rank r takes part (default: all). Experts of
    inactive ranks are not sent to (their top-k entries become -1), inactive ranks are neither
    signalled nor waited for, and their rows here count as empty. Every active rank must pass the
    same mask, including itself, in dispatch and the matching combine; inactive ranks run nothing.

    Every rank must agree on the round (runtime_max_tokens_per_rank, the payloads' bytes per token
    and dtypes, top_k, num_experts, the mask): the ranks compare signatures at the barrier, and a
    disagreement is recorded as a fault (`A2AMismatchError`). One round per workspace and rank may
    be live: a second dispatch before the combine raises `PhaseError`. When the stream reaches the
    end of this op, every active peer's rows have landed. The views stay valid until this rank's
    next combine starts. Raises the `A2AFaultError` an earlier wait of this rank recorded.
    """
    validation.check_backend(backend)
    validation.check_enable_pdl(enable_pdl)
    mask = validation.rank_mask_argument(active_rank_mask, enable_rank_mask, ep_size)
    rank_workspace = resolve_context(workspace, metainfo, ep_rank)
    rank_workspace.raise_if_faulted()
    rank_workspace.check_no_live_round("moe_a2a_dispatch", 0)
    plan, num_tokens = dispatch_plan(rank_workspace, token_selected_experts, input_payloads, token_count,
                                     runtime_max_tokens_per_rank, ep_size, top_k, num_experts, mask,
                                     eplb_local_stats, enable_pdl)  # fmt: skip
    plan.launch(token_selected_experts, input_payloads, token_count, num_tokens, eplb_local_stats)
    rank_workspace.begin_round("moe_a2a_dispatch", 0, num_tokens, runtime_max_tokens_per_rank, plan.combine_offset,
                               plan.active_rank_mask)  # fmt: skip
    return plan.recv, plan.combine_offset, plan.gathered_stats


def dispatch_plan(rank_workspace: RankWorkspace, token_selected_experts, input_payloads, token_count,
                  runtime_max_tokens_per_rank, ep_size, top_k, num_experts, active_rank_mask,
                  eplb_local_stats=None, enable_pdl=None) -> tuple[_DispatchPlan, int]:  # fmt: skip
    """The validated plan of this call and its token count (rows); launches nothing, so a call
    that fails here has changed nothing."""
    key, rows = _plan_key(token_selected_experts, input_payloads, token_count, runtime_max_tokens_per_rank, ep_size,
                          top_k, num_experts, active_rank_mask, eplb_local_stats, enable_pdl)  # fmt: skip
    plan = rank_workspace.find_plan(key)
    # The per-call checks a plan leaves open: at most rt rows, every payload with the experts' rows
    # (else `rows` is -1). A found plan has an int rt: its type is in the key.
    num_tokens = rows if plan is not None and 0 <= rows <= runtime_max_tokens_per_rank else None
    if num_tokens is None:  # a new call signature, or a count the plan's checks did not cover
        plan = _DispatchPlan.build(token_selected_experts, input_payloads, token_count, rank_workspace,
                                   runtime_max_tokens_per_rank, ep_size, top_k, num_experts, active_rank_mask,
                                   eplb_local_stats, enable_pdl)  # fmt: skip
        rank_workspace.remember_plan(key, plan)
        num_tokens = token_selected_experts.shape[0]
    rank_workspace.check_returning_ranks(plan.active_rank_mask)
    return plan, num_tokens


def _plan_key(experts: object, payloads: object, token_count: object, rt: object, ep_size: object, top_k: object,
              num_experts: object, active_rank_mask: object, eplb_local_stats: object,
              enable_pdl: object) -> tuple[object, int]:  # fmt: skip
    """Dispatch's call signature (a2a.ops.context.plan_key's kind of key, built flat) and the token
    rows: the experts' rows if every payload has as many, else -1. The rows are not part of the
    key; reading them with it saves each tensor a second shape read (0.58 us a dispatch of three
    payloads, paired, on a 2-core CPU machine). The payload keys are spread, so their number is the
    key's length less the fixed parts."""
    try:
        rows, experts_key = rows_and_key(experts)  # type: ignore[arg-type]
        payload_keys = []
        for payload in payloads:  # type: ignore[attr-defined]
            payload_rows, payload_key = rows_and_key(payload)
            payload_keys.append(payload_key)
            if payload_rows != rows:
                rows = -1
        return ("dispatch", experts_key, type(payloads), *payload_keys, tensor_key(token_count, rows=False),
                tensor_key(eplb_local_stats), rt, ep_size, top_k, num_experts, active_rank_mask, enable_pdl, type(rt),
                type(ep_size), type(top_k), type(num_experts), type(active_rank_mask), type(enable_pdl)), rows
    except (AttributeError, TypeError, RuntimeError, IndexError):  # not dense tensors of 1+ dimensions (a sparse
        return object(), -1  # one's data_ptr raises): a key no plan has, so the full checks report them


class _DispatchPlan:
    """One validated call signature of dispatch on one rank: loaded kernels, receive views, barrier.

    The token count may change from call to call (it is a launch argument and the grid, never part
    of a kernel variant)."""

    @classmethod
    def build(cls, token_selected_experts, input_payloads, token_count, rank_workspace: RankWorkspace,
              runtime_max_tokens_per_rank: int, ep_size: int, top_k: int, num_experts: int,
              active_rank_mask: int | None, eplb_local_stats: torch.Tensor | None = None,
              enable_pdl: bool | None = None) -> _DispatchPlan:  # fmt: skip
        layout = rank_workspace.layout
        workspace = rank_workspace.workspace
        validation.check_geometry(ep_size, rank_workspace.ep_rank, top_k, num_experts)
        if layout.ep_size != ep_size:
            raise ValueError(f"ep_size ({ep_size}) must equal the workspace layout's ep_size ({layout.ep_size})")
        mask = validation.check_active_rank_mask(active_rank_mask, ep_size, rank_workspace.ep_rank)
        experts = validation.require_tensor(
            "token_selected_experts", token_selected_experts, dtypes=[torch.int32], ndim=2, device=workspace.device
        )
        if experts.shape[1] != top_k:
            raise ValueError(f"token_selected_experts must be [num_tokens, top_k={top_k}], got {list(experts.shape)}")
        num_tokens = experts.shape[0]
        validation.check_runtime_max_tokens(runtime_max_tokens_per_rank, layout.max_num_tokens, num_tokens)
        payloads = validation.check_payloads(input_payloads, num_tokens, workspace.device)
        if token_count is not None:
            validation.require_tensor("token_count", token_count, dtypes=[torch.int32], ndim=1, device=workspace.device)
            validation.require_shape("token_count", token_count, (1,), "[1]: the number of real tokens")
        if eplb_local_stats is not None:
            if layout.eplb_stats_num_experts == 0:
                raise ValueError("eplb_local_stats needs a workspace initialized with eplb_stats_num_experts > 0 "
                                 "(moe_a2a_initialize / MoeAlltoAll)")
            validation.require_tensor("eplb_local_stats", eplb_local_stats, dtypes=[torch.int32], ndim=1,
                                      device=workspace.device)  # fmt: skip
            validation.require_shape("eplb_local_stats", eplb_local_stats, (layout.eplb_stats_num_experts,),
                                     "[eplb_stats_num_experts] (the length given at initialization)")  # fmt: skip
        round_layout = layout.round_layout(runtime_max_tokens_per_rank, [_row_bytes(p) for p in payloads])
        planes_end = round_layout.recv_plane_offsets[-1] + round_layout.recv_plane_sizes[-1]
        validation.check_fits("the dispatch receive planes", planes_end, workspace.shape[1])
        return cls(rank_workspace, experts, payloads, token_count, round_layout, top_k, num_experts, mask,
                   eplb_local_stats is not None, use_pdl(workspace.device, enable_pdl))  # fmt: skip

    def __init__(self, rank_workspace: RankWorkspace, experts: torch.Tensor, payloads: list[torch.Tensor],
                 token_count: torch.Tensor | None, round_layout: RoundLayout, top_k: int, num_experts: int,
                 active_rank_mask: int, shares_stats: bool = False, pdl: bool = False):  # fmt: skip
        self.device = rank_workspace.workspace.device
        self.wait_in_kernel = self.device.type == "cuda"  # the CPU path waits on the host
        self.active_rank_mask = active_rank_mask
        layout = rank_workspace.layout
        rt = round_layout.runtime_max_tokens
        self.signature = signature_tensor(
            dispatch_signature(rt, layout.max_num_tokens, top_k, num_experts, payloads, active_rank_mask,
                               layout.eplb_stats_num_experts, shares_stats), self.device
        )
        # Without a device count the pointer is unused; any int32 word of the own segment stands in.
        self.count_stand_in = rank_workspace.round_state
        count = token_count if token_count is not None else self.count_stand_in
        # A plan serves any number of token rows: one routing variant for a single block, one for more.
        routes = [_route_launch(rank_workspace, experts, count, token_count is not None, top_k, num_experts,
                                active_rank_mask, self.wait_in_kernel, single_block, pdl)
                  for single_block in (True, False)]  # fmt: skip
        copy, self.unit_dtypes, self.num_tiles = _copy_launch(rank_workspace, payloads, count, token_count is not None,
                                                              round_layout, top_k, self.signature, active_rank_mask,
                                                              self.wait_in_kernel, pdl)  # fmt: skip
        # Everything this phase (and the sanitize that usually follows it) may launch is loaded
        # before the barrier is enqueued: see a2a.ops.launch.
        self.route_single, self.route_blocks = (
            route.bind(dynamic=("expert_ids_ptr", "num_tokens_ptr", "num_rows", "num_blocks")) for route in routes
        )
        self.copy = copy.bind(dynamic=("src_ptrs", "num_tokens_ptr", "num_tokens"))
        # Routing and copy in one launch for rounds of one routing block whose grid fits on the GPU
        # beside every peer's (every program waits; see configs.fused_dispatch_max_tokens): one
        # bound variant per block size, for token counts up to fused_max_tokens (-1: never).
        self.fused_max_tokens = -1
        self.fused: dict[int, object] = {}
        k_pad = configs.next_power_of_2(top_k)
        if envs.fused_dispatch_allowed() and not shares_stats and k_pad <= configs.FUSED_DISPATCH_MAX_K_PAD:
            for block in configs.FUSED_DISPATCH_BLOCKS:
                fused = _fused_launch(copy, rank_workspace, experts, top_k, num_experts, active_rank_mask, block)
                self.fused[block] = fused.bind(dynamic=("src_ptrs", "expert_ids_ptr", "num_tokens_ptr", "num_tokens"))
            self.fused_max_tokens = _fused_max_tokens(self.fused, self.num_tiles, rank_workspace.ep_size,
                                                      self.wait_in_kernel)  # fmt: skip
        # The bound variant of each token count up to fused_max_tokens, looked up by index per call
        # (configs.fused_dispatch_block's search costs 0.6 us a call on a 2-core CPU machine's Python).
        self.fused_by_rows = tuple(self.fused[configs.fused_dispatch_block(rows)]
                                   for rows in range(self.fused_max_tokens + 1))  # fmt: skip
        # Both PDL variants where the GPU has PDL: the sanitize that follows may be called with another
        # enable_pdl (or A2A_PDL) than this dispatch, and a variant loaded mid-round can hang (ops/launch.py).
        for sanitize_pdl in {False, pdl_capable(self.device)}:
            expert_id_sanitize_launch(rank_workspace, rt, top_k, sanitize_pdl).prepare()
        ep_rank, ep_size = rank_workspace.ep_rank, rank_workspace.ep_size
        self.ep_size = ep_size
        self.recv = [
            segment_view(rank_workspace.workspace, ep_rank, offset, payload.dtype, (ep_size, rt, payload.shape[1]))
            for offset, payload in zip(round_layout.recv_plane_offsets, payloads)
        ]
        self.combine_offset = round_layout.combine_offset
        self.share_stats = self.gathered_stats = None
        if shares_stats:
            share = _share_stats_launch(rank_workspace, active_rank_mask, pdl)
            self.share_stats = share.bind(dynamic=("local_stats_ptr",))
            self.gathered_stats = segment_view(rank_workspace.workspace, ep_rank, layout.eplb_stats_offset,
                                               torch.int32, (ep_size, layout.eplb_stats_num_experts))  # fmt: skip
        if not self.wait_in_kernel:
            timeout_ms = timeout_of_plan()[1]
            self.ordering_wait = rank_workspace.flag_wait(Phase.ORDERING, active_rank_mask, timeout_ms)
            self.dispatch_wait = rank_workspace.flag_wait(Phase.DISPATCH, active_rank_mask, timeout_ms)

    def launch(self, experts: torch.Tensor, payloads: Sequence[torch.Tensor], token_count: torch.Tensor | None,
               num_tokens: int, eplb_local_stats: torch.Tensor | None = None) -> None:  # fmt: skip
        """num_tokens: the tensors' rows (with `token_count`, an upper bound of the real tokens)."""
        count = token_count if token_count is not None else self.count_stand_in
        if self.copy.fast:
            sources = tuple(payloads)  # only the addresses matter
        else:
            sources = tuple(validation.as_units(p, dtype) for p, dtype in zip(payloads, self.unit_dtypes))
        # At least one token row, so a rank without tokens still runs the barrier.
        copy_grid = (max(1, num_tokens), self.num_tiles)
        if num_tokens <= self.fused_max_tokens:  # one launch routes and copies (never with EPLB statistics)
            fused = self.fused_by_rows[num_tokens]
            if self.wait_in_kernel:
                fused(copy_grid, sources, experts, count, num_tokens)
            else:
                run_steps(current_stream(self.device), [self.ordering_wait,
                                                        lambda: fused(copy_grid, sources, experts, count, num_tokens),
                                                        self.dispatch_wait])  # fmt: skip
            return
        num_blocks = num_route_blocks(num_tokens)
        route = self.route_single if num_blocks == 1 else self.route_blocks
        if self.wait_in_kernel:  # on the current CUDA stream: routing and the copy kernel wait themselves
            route((num_blocks,), experts, count, num_tokens, num_blocks)
            if self.share_stats is not None:  # after routing's wait for the previous gathers, before the barrier
                self.share_stats((self.ep_size,), eplb_local_stats)
            self.copy(copy_grid, sources, count, num_tokens)
            return
        steps = [lambda: route((num_blocks,), experts, count, num_tokens, num_blocks),
                 lambda: self.copy(copy_grid, sources, count, num_tokens)]  # fmt: skip
        if self.share_stats is not None:
            steps.insert(1, lambda: self.share_stats((self.ep_size,), eplb_local_stats))
        run_steps(current_stream(self.device), [self.ordering_wait, *steps, self.dispatch_wait])


def _share_stats_launch(rank_workspace: RankWorkspace, active_rank_mask: int, pdl: bool = False) -> KernelLaunch:
    layout = rank_workspace.layout
    num = layout.eplb_stats_num_experts
    gathered = rank_workspace.every_rank(layout.eplb_stats_offset, 4 * rank_workspace.ep_size * num, torch.int32)
    stand_in = rank_workspace.own(layout.eplb_stats_offset, num)  # the caller's tensor at launch
    return KernelLaunch(
        _share_stats_kernel,
        (rank_workspace.ep_size,),
        (stand_in, gathered, rank_workspace.stride_rank, rank_workspace.fault_record, *mask_halves(active_rank_mask),
         rank_workspace.ep_rank),
        dict(NUM_STATS=num, BLOCK=min(1024, configs.next_power_of_2(num)), num_warps=1, **pdl_constexprs(pdl)),
    )


def _row_bytes(payload: torch.Tensor) -> int:
    return payload.shape[1] * payload.element_size()


def _route_launch(rank_workspace: RankWorkspace, experts: torch.Tensor, count: torch.Tensor, count_from_device: bool,
                  top_k: int, num_experts: int, active_rank_mask: int, wait_in_kernel: bool,
                  single_block: bool, pdl: bool = False) -> KernelLaunch:  # fmt: skip
    layout = rank_workspace.layout
    num_tokens = experts.shape[0]  # launches pass their own rows and grid (num_rows, num_blocks: unspecialised)
    partition = ExpertPartition(num_experts, layout.ep_size)
    capacity = layout.max_num_tokens * MAX_TOP_K
    targets = rank_workspace.own(layout.topk_target_ranks_offset, capacity)
    local_slots = rank_workspace.own(layout.topk_local_slots_offset, capacity)
    num_blocks = num_route_blocks(num_tokens)
    timeout_ns, timeout_ms = timeout_of_plan()
    protocol = protocol_constexprs(rank_workspace, wait_in_kernel)
    return KernelLaunch(
        _route_kernel,
        (num_blocks,),
        (experts, targets, local_slots, rank_workspace.block_counts, rank_workspace.block_invalid,
         rank_workspace.round_word(RoundState.ROUTE_ELECTION), rank_workspace.round_word(RoundState.INVALID_COUNT),
         rank_workspace.send_counters, rank_workspace.recv_counters_every_rank, rank_workspace.stride_rank,
         rank_workspace.round_word(RoundState.GATHER_COUNT), rank_workspace.round_words(RoundState.GATHERED_MASK, 2),
         rank_workspace.flag_block_every_rank,
         rank_workspace.fault_record, rank_workspace.host_record_address, timeout_ns, timeout_ms,
         count, num_tokens, num_blocks, num_experts, partition.base, partition.remainder, *mask_halves(active_rank_mask),
         rank_workspace.ep_rank),
        dict(TOP_K=top_k, K_PAD=configs.next_power_of_2(top_k), EP_SIZE=layout.ep_size, EP_PAD=protocol["EP_PAD"],
             BLOCK_TOKENS=ROUTE_BLOCK_TOKENS, SCAN_BLOCKS=configs.ROUTE_SCAN_BLOCKS, SINGLE_BLOCK=single_block,
             **configs.route_chunks(ROUTE_BLOCK_TOKENS, configs.next_power_of_2(top_k), protocol["EP_PAD"]),
             COUNT_FROM_DEVICE=count_from_device, FLAG_ARRAY_STRIDE=protocol["FLAG_ARRAY_STRIDE"],
             WAIT=protocol["WAIT"], HAS_HOST_RECORD=protocol["HAS_HOST_RECORD"], num_warps=configs.ROUTE_NUM_WARPS,
             **pdl_constexprs(pdl)),
    )  # fmt: skip


def _fused_launch(copy: KernelLaunch, rank_workspace: RankWorkspace, experts: torch.Tensor, top_k: int,
                  num_experts: int, active_rank_mask: int, block_tokens: int) -> KernelLaunch:
    """The copy launch (`_copy_launch`) with routing's arguments: `_fused_dispatch_kernel` for rounds
    of at most `block_tokens` tokens (one routing block, on registers in every program)."""
    layout = rank_workspace.layout
    partition = ExpertPartition(num_experts, layout.ep_size)
    copy_values = dict(zip(_dispatch_copy_kernel.arg_names, copy.args))
    routing = dict(
        expert_ids_ptr=experts, invalid_count_ptr=rank_workspace.round_word(RoundState.INVALID_COUNT),
        send_counters_ptr=rank_workspace.send_counters, recv_counters_ptr=rank_workspace.recv_counters_every_rank,
        gather_count_ptr=rank_workspace.round_word(RoundState.GATHER_COUNT),
        gathered_mask_ptr=rank_workspace.round_words(RoundState.GATHERED_MASK, 2),
        trouble_ptr=rank_workspace.round_words(RoundState.ORDERING_TROUBLE, 4), num_experts=num_experts,
        experts_base=partition.base, experts_remainder=partition.remainder,
    )  # fmt: skip
    values = {**copy_values, **routing}
    constexprs = {name: value for name, value in copy.constexprs.items() if name != "K_CHUNK"}
    k_pad = configs.next_power_of_2(top_k)
    chunks = configs.route_chunks(block_tokens, k_pad, constexprs["EP_PAD"], 1024 * constexprs["num_warps"])
    constexprs.update(K_PAD=k_pad, BLOCK_TOKENS=block_tokens, ROUTE_K_CHUNK=chunks["K_CHUNK"],
                      RANK_CHUNK=chunks["RANK_CHUNK"])  # fmt: skip
    parameters = [name for name in _fused_dispatch_kernel.arg_names if name not in constexprs]
    return KernelLaunch(_fused_dispatch_kernel, copy.grid, tuple(values[name] for name in parameters), constexprs)


def _fused_max_tokens(fused: dict, tiles: int, ep_size: int, wait_in_kernel: bool) -> int:
    """The most tokens a round may have to route and copy in one launch: on CUDA, with each round
    served by the smallest block that holds it, every count up to the result fits beside every peer
    (`configs.fused_dispatch_max_tokens` of that block's variant; never where the GPU's capacity is
    unknown); on the CPU (interpreted programs run one after another, nothing spins) up to
    INTERPRETED_FUSED_DISPATCH_TOKENS."""
    if not wait_in_kernel:
        return min(configs.INTERPRETED_FUSED_DISPATCH_TOKENS, configs.FUSED_DISPATCH_BLOCKS[-1])
    limit, previous = -1, 0
    for block in configs.FUSED_DISPATCH_BLOCKS:
        resident = fused[block].resident_programs()
        if resident is None:
            break
        most = min(block, configs.fused_dispatch_max_tokens(resident, tiles, ep_size))
        if most <= previous:
            break
        limit = most
        if most < block:
            break
        previous = block
    return limit


def _copy_launch(
    rank_workspace: RankWorkspace, payloads: list[torch.Tensor], count: torch.Tensor, count_from_device: bool,
    round_layout: RoundLayout, top_k: int, own_signature: torch.Tensor, active_rank_mask: int, wait_in_kernel: bool,
    pdl: bool = False,
) -> tuple[KernelLaunch, list[torch.dtype], int]:
    """The copy launch, the copy-unit dtype of each payload, and the column tiles per token."""
    layout = rank_workspace.layout
    workspace = rank_workspace.workspace
    sources, planes, strides, row_units, vec_units = [], [], [], [], []
    for payload, offset, size in zip(payloads, round_layout.recv_plane_offsets, round_layout.recv_plane_sizes):
        unit = configs.copy_unit(
            _row_bytes(payload), payload.data_ptr(), workspace.data_ptr() + offset, rank_workspace.segment_stride
        )
        sources.append(validation.as_units(payload, unit.dtype))
        plane = rank_workspace.every_rank(offset, size, unit.dtype)
        planes.append(plane)
        strides.append(plane.stride(0))
        row_units.append(unit.row_units)
        vec_units.append(unit.vec_units)
    widest = max(range(len(row_units)), key=lambda p: row_units[p])
    config = configs.dispatch_copy_config(row_units[widest], sources[widest].element_size(), top_k, layout.ep_size)
    num_tiles = -(-row_units[widest] // config.tile)
    capacity = layout.max_num_tokens * MAX_TOP_K
    targets = rank_workspace.own(layout.topk_target_ranks_offset, capacity)
    local_slots = rank_workspace.own(layout.topk_local_slots_offset, capacity)
    send_indices = rank_workspace.own(layout.topk_send_indices_offset, capacity)
    election = rank_workspace.round_word(RoundState.COPY_ELECTION)
    num_tokens = payloads[0].shape[0]
    # At least one token row, so a rank without tokens still runs the barrier.
    launch = KernelLaunch(
        _dispatch_copy_kernel,
        (max(1, num_tokens), num_tiles),
        (tuple(sources), tuple(planes), tuple(strides), targets, local_slots, rank_workspace.block_counts,
         send_indices, rank_workspace.round_word(RoundState.DISPATCH_ROWS),
         rank_workspace.round_word(RoundState.DISPATCH_RT), election, *barrier_args(rank_workspace, Phase.DISPATCH, own_signature, active_rank_mask),
         count, num_tokens, round_layout.runtime_max_tokens, rank_workspace.ep_rank),
        dict(NUM_PAYLOADS=len(sources), ROW_UNITS=tuple(row_units), VEC_UNITS=tuple(vec_units), TOP_K=top_k,
             K_CHUNK=min(configs.next_power_of_2(top_k), 8), BLOCK_TOKENS=ROUTE_BLOCK_TOKENS,
             TILE=config.tile, num_warps=config.num_warps, COUNT_FROM_DEVICE=count_from_device,
             PHASE=int(Phase.DISPATCH), FLAG_ROW=int(FlagArray.DISPATCH),
             **protocol_constexprs(rank_workspace, wait_in_kernel), **pdl_constexprs(pdl)),
    )  # fmt: skip
    return launch, [source.dtype for source in sources], num_tiles
