"""Combine launcher: stage expert outputs, signal readiness, wait for peers, gather and reduce.

On CUDA a combine is the stage (unless the payload is in the workspace), then either the barrier
kernel and the gather, or, for a small round whose grid fits on the GPU beside every peer's
(`configs.fused_combine_max_tokens`; A2A_FUSED_COMBINE=0 turns it off) called outside CUDA-graph
capture, one fused launch of both.
On the CPU the host waits between a signal launch and the gate: gate and gather are then one
fused launch for small rounds, or two launches. A fused launch serves only rounds whose gather
compares the signatures (`configs.GATHER_COMPARE_MAX_TOKENS` rows or fewer)."""

from __future__ import annotations

import torch

from a2a.ops import configs, validation
from a2a.quantization import SfLayout, quantize_fp8_per_token
from a2a.ops.barrier import barrier_args, combine_signature, protocol_constexprs, signature_tensor
from a2a import envs
from a2a.kernels import _combine_barrier_kernel, _combine_kernel, _fused_combine_kernel, _stage_combine_kernel
from a2a.ops.launch import KernelLaunch, capturing, pdl_constexprs, use_pdl
from a2a.layout import MAX_TOP_K, PLANE_ALIGN, RoundState, combine_scales_offset
from a2a.runtime.protocol import COMBINE_SIGNATURE_FIELDS, SIGNATURE_WORDS, FlagArray, Phase, mask_halves
from a2a.runtime.scheduler import run_steps
from a2a.runtime.current_stream import current_stream
from a2a.ops.context import resolve_context, tensor_key, timeout_of_plan
from a2a.workspace import RankWorkspace

COMBINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Signature words every gather program compares: the combine's fields (words past them are 0 on
# every rank), so a program holds 16 words a rank, not SIGNATURE_WORDS.
COMPARED_SIGNATURE_WORDS = configs.next_power_of_2(len(COMBINE_SIGNATURE_FIELDS))
assert COMPARED_SIGNATURE_WORDS <= SIGNATURE_WORDS
QUANTIZED_COMBINE_DTYPES = (torch.float8_e4m3fn,)


def moe_a2a_combine(
    payload: torch.Tensor,
    local_num_tokens: int,
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    combine_payload_offset: int,
    payload_in_workspace: bool = False,
    output_dtype: torch.dtype | None = None,
    output_scales: torch.Tensor | None = None,
    output_scalar_scale: float = 1.0,
    sf_layout: int = SfLayout.layout_linear,
    output: torch.Tensor | None = None,
    *,
    use_low_precision: bool = False,
    enable_pdl: bool | None = None,
    enable_rank_mask: bool = False,
    active_rank_mask: torch.Tensor | int | None = None,
    backend: str = "trtllm",
    payload_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return every local token's sum over its top-k expert outputs, gathered from the peers.

    payload: `[ep_size, runtime_max_tokens_per_rank, H]` fp16/bf16/fp32, this rank's expert output
    for each received row (row `[s][j]` answers the j-th token source s sent here), already weighted.
    With `payload_in_workspace=True` it must be the view of this rank's combine plane
    (`MoeAlltoAll.get_combine_payload_tensor_in_workspace`) and no staging copy runs.
    `local_num_tokens`, `runtime_max_tokens_per_rank`, `top_k` and `combine_payload_offset` must be
    those of the matching dispatch (checked: `ValueError` on the host, or a recorded fault when the
    combine barrier finds a different dispatch in the workspace). Returns `[local_num_tokens, H]` of the
    payload's dtype (written into `output` when given), valid once the stream reaches the end of
    this op; NaN rows if the round failed on this rank. Every rank must agree on the combine
    payload's bytes per token and dtype, the offset and the mask (checked at the barrier).

    Low-precision combine (a2a addition): `payload` float8_e4m3fn with `payload_scales` `[ep_size,
    rt, 1]` fp32, one scale per row (e.g. `a2a.quantization.quantize_fp8_per_token` of the expert
    outputs): half the bytes cross the links; rows are dequantized and summed in fp32 on this
    rank, and the output is bf16 (or `output`'s fp16 / bf16 / fp32). In the workspace, the scales
    live in `MoeAlltoAll.get_combine_scales_tensor_in_workspace`. Raises the `A2AFaultError` an
    earlier wait of this rank recorded.

    FlashInfer's arguments: `output_dtype` bf16 / fp16 / fp32 (the fp32 sum is cast to it; the
    quantized outputs fp8 / packed fp4 raise `NotImplementedError`, as do `output_scales` and an
    `sf_layout` other than linear); `output_scalar_scale` only scales NVFP4 outputs, so it changes
    nothing here; `use_low_precision=True` quantizes the bf16 / fp16 payload to fp8 e4m3 per row
    (`a2a.quantization.quantize_fp8_per_token`) and runs the low-precision combine above (bf16
    output). `enable_rank_mask` / `active_rank_mask`, `enable_pdl`, `backend`: as in dispatch.
    """
    validation.check_backend(backend)
    validation.check_enable_pdl(enable_pdl)
    validation.check_combine_output_format(output_dtype, output_scales, sf_layout)
    active_rank_mask = validation.rank_mask_argument(active_rank_mask, enable_rank_mask, ep_size)
    if not isinstance(use_low_precision, bool):
        raise TypeError(f"use_low_precision must be a bool, got {type(use_low_precision).__name__}")
    rank_workspace = resolve_context(workspace, metainfo, ep_rank)
    rank_workspace.raise_if_faulted()
    live = rank_workspace.live_round_for("moe_a2a_combine", 0)
    if live is not None:
        check_matches_dispatch(live, local_num_tokens, runtime_max_tokens_per_rank, combine_payload_offset)
    if use_low_precision:
        payload, payload_scales = quantized_payload(payload, payload_scales)
        payload_in_workspace = False  # the fp8 rows are staged into the combine plane (over the bf16 ones)
    output = output_of_dtype(output, output_dtype, local_num_tokens, payload)
    plan = combine_plan(rank_workspace, payload, payload_scales, local_num_tokens, runtime_max_tokens_per_rank, ep_size,
                        top_k, combine_payload_offset, payload_in_workspace, output, active_rank_mask,
                        enable_pdl)  # fmt: skip
    if output is None:
        output = torch.empty((local_num_tokens, plan.hidden), dtype=plan.output_dtype, device=plan.device)
    plan.launch(payload, payload_scales, local_num_tokens, output)
    rank_workspace.end_round()
    return output


def output_of_dtype(output: object, output_dtype: torch.dtype | None, local_num_tokens: object, payload: object) -> object:
    """FlashInfer's `output_dtype` as an output tensor to write (`output` itself when given or no
    dtype asked; a bad payload is left for the plan's checks to report)."""
    if output is not None or output_dtype is None or not isinstance(payload, torch.Tensor) or payload.dim() != 3 \
            or not isinstance(local_num_tokens, int) or local_num_tokens < 0:
        return output
    return torch.empty((local_num_tokens, payload.shape[2]), dtype=output_dtype, device=payload.device)


def quantized_payload(payload: object, payload_scales: object) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's `use_low_precision`: the payload as fp8 e4m3 rows with one fp32 scale each, on
    the current stream (only new tensors are written)."""
    if payload_scales is not None:
        raise ValueError("use_low_precision quantizes the payload itself: pass a bf16 / fp16 payload, no payload_scales")
    if not isinstance(payload, torch.Tensor) or payload.dim() != 3 or payload.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("use_low_precision needs a bf16 or fp16 payload [ep_size, rt, H], got "
                         f"{getattr(payload, 'dtype', type(payload).__name__)} {list(getattr(payload, 'shape', []))}")
    quantized = quantize_fp8_per_token(payload.reshape(-1, payload.shape[2]))
    return quantized.values.view(payload.shape), quantized.scales.view(payload.shape[0], payload.shape[1], 1)


def check_matches_dispatch(live, local_num_tokens: object, runtime_max_tokens: object, combine_offset: object) -> None:
    """A combine must use the token count, rt and combine offset of the dispatch it ends: anything
    else would read top-k entries or plane rows that dispatch did not write."""
    for name, got, want in (("local_num_tokens", local_num_tokens, live.num_tokens),
                            ("runtime_max_tokens_per_rank", runtime_max_tokens, live.runtime_max_tokens),
                            ("combine_payload_offset", combine_offset, live.combine_offset)):  # fmt: skip
        if type(got) is not int or got != want:
            raise ValueError(f"{name} must be the dispatch's ({want}) for the combine of its round, got {got!r}")


def combine_plan(rank_workspace: RankWorkspace, payload, payload_scales, local_num_tokens, runtime_max_tokens_per_rank,
                 ep_size, top_k, combine_payload_offset, payload_in_workspace, output, active_rank_mask,
                 enable_pdl=None) -> _CombinePlan:  # fmt: skip
    """The validated plan of this call; launches nothing (a call that fails here changed nothing)."""
    key = _plan_key(payload, output, payload_scales, runtime_max_tokens_per_rank, ep_size, top_k,
                    combine_payload_offset, payload_in_workspace, active_rank_mask, enable_pdl)  # fmt: skip
    plan = rank_workspace.find_plan(key)
    if plan is None or not plan.accepts(payload, payload_scales, local_num_tokens, output):
        plan = _CombinePlan.build(payload, payload_scales, local_num_tokens, rank_workspace, runtime_max_tokens_per_rank,
                                  ep_size, top_k, combine_payload_offset, payload_in_workspace, output,
                                  active_rank_mask, enable_pdl)  # fmt: skip
        rank_workspace.remember_plan(key, plan)
    return plan


def _plan_key(payload: object, output: object, scales: object, rt: object, ep_size: object, top_k: object,
              offset: object, in_workspace: object, active_rank_mask: object, enable_pdl: object) -> object:  # fmt: skip
    """Combine's call signature (a2a.ops.context.plan_key's kind of key, built flat as dispatch's);
    the output's rows are the token count, so only its row shape counts."""
    try:
        return ("combine", tensor_key(payload), tensor_key(output, rows=False), tensor_key(scales), rt, ep_size,
                top_k, offset, in_workspace, active_rank_mask, enable_pdl, type(rt), type(ep_size), type(top_k),
                type(offset), type(in_workspace), type(active_rank_mask), type(enable_pdl))  # fmt: skip
    except (AttributeError, TypeError, RuntimeError):  # not dense tensors (a sparse one's data_ptr raises):
        return object()  # a key no plan has, so the full checks report them


class _CombinePlan:
    """One validated call signature of combine on one rank: loaded stage / barrier / gather kernels."""

    @classmethod
    def build(cls, payload, payload_scales, local_num_tokens, rank_workspace: RankWorkspace, runtime_max_tokens_per_rank: int,
              ep_size: int, top_k: int, combine_payload_offset: int, payload_in_workspace: bool, output,
              active_rank_mask: int | None, enable_pdl: bool | None = None) -> _CombinePlan:  # fmt: skip
        layout = rank_workspace.layout
        workspace = rank_workspace.workspace
        validation.check_geometry(ep_size, rank_workspace.ep_rank, top_k)
        if layout.ep_size != ep_size:
            raise ValueError(f"ep_size ({ep_size}) must equal the workspace layout's ep_size ({layout.ep_size})")
        mask = validation.check_active_rank_mask(active_rank_mask, ep_size, rank_workspace.ep_rank)
        payload = validation.require_tensor(
            "payload", payload, dtypes=COMBINE_DTYPES + QUANTIZED_COMBINE_DTYPES, ndim=3, device=workspace.device
        )
        validation.check_runtime_max_tokens(runtime_max_tokens_per_rank, layout.max_num_tokens)
        validation.require_shape(
            "payload", payload, (ep_size, runtime_max_tokens_per_rank, payload.shape[2]),
            "[ep_size, runtime_max_tokens_per_rank, hidden]",
        )  # fmt: skip
        validation.require_int("local_num_tokens", local_num_tokens, 0, runtime_max_tokens_per_rank)
        hidden = payload.shape[2]
        if hidden == 0:
            raise ValueError("payload hidden size must be >= 1, got 0")
        plane_bytes = ep_size * runtime_max_tokens_per_rank * hidden * payload.element_size()
        validation.require_int("combine_payload_offset", combine_payload_offset, layout.payload_offset)
        if combine_payload_offset % PLANE_ALIGN:
            raise ValueError(f"combine_payload_offset must be a multiple of {PLANE_ALIGN}, got {combine_payload_offset}")
        validation.check_fits("the combine plane", combine_payload_offset + plane_bytes, workspace.shape[1])
        quantized = payload.dtype in QUANTIZED_COMBINE_DTYPES
        scales_offset = combine_scales_offset(combine_payload_offset, ep_size, runtime_max_tokens_per_rank,
                                              hidden * payload.element_size())  # fmt: skip
        if quantized:
            if payload_scales is None:
                raise ValueError(f"payload_scales is required for a {payload.dtype} payload: [ep_size, rt, 1] float32")
            validation.require_tensor("payload_scales", payload_scales, dtypes=[torch.float32], ndim=3,
                                      device=workspace.device)  # fmt: skip
            validation.require_shape("payload_scales", payload_scales, (ep_size, runtime_max_tokens_per_rank, 1),
                                     "[ep_size, runtime_max_tokens_per_rank, 1]: one scale per row")  # fmt: skip
            validation.check_fits("the combine scales", scales_offset + 4 * ep_size * runtime_max_tokens_per_rank,
                                  workspace.shape[1])  # fmt: skip
        elif payload_scales is not None:
            raise ValueError(f"payload_scales is only for a float8_e4m3fn payload, got a {payload.dtype} payload")
        if not isinstance(payload_in_workspace, bool):
            raise TypeError(f"payload_in_workspace must be a bool, got {type(payload_in_workspace).__name__}")
        if payload_in_workspace and payload.data_ptr() != rank_workspace.own_address(combine_payload_offset):
            raise ValueError(
                "payload_in_workspace is True but payload is not this rank's combine plane: "
                f"data_ptr {payload.data_ptr():#x} != {rank_workspace.own_address(combine_payload_offset):#x}"
            )
        if quantized and payload_in_workspace and payload_scales.data_ptr() != rank_workspace.own_address(scales_offset):
            raise ValueError(
                "payload_in_workspace is True but payload_scales is not this rank's combine scales "
                f"(MoeAlltoAll.get_combine_scales_tensor_in_workspace): data_ptr {payload_scales.data_ptr():#x} != "
                f"{rank_workspace.own_address(scales_offset):#x}"
            )
        if output is not None:
            dtypes = COMBINE_DTYPES if quantized else [payload.dtype]
            validation.require_tensor("output", output, dtypes=dtypes, ndim=2, device=workspace.device)
            validation.require_shape("output", output, (local_num_tokens, hidden), "[local_num_tokens, hidden]")
        return cls(rank_workspace, payload, payload_scales, combine_payload_offset, payload_in_workspace, top_k, output,
                   mask, use_pdl(workspace.device, enable_pdl))  # fmt: skip

    def __init__(self, rank_workspace: RankWorkspace, payload: torch.Tensor, payload_scales: torch.Tensor | None,
                 combine_offset: int, in_workspace: bool, top_k: int, output: torch.Tensor | None,
                 active_rank_mask: int, pdl: bool = False):  # fmt: skip
        self.device = rank_workspace.workspace.device
        ep_size, rt, self.hidden = payload.shape
        self.in_workspace = in_workspace
        self.plane_address = rank_workspace.own_address(combine_offset)
        self.quantized = payload_scales is not None
        scales_offset = combine_scales_offset(combine_offset, ep_size, rt, self.hidden * payload.element_size())
        self.scales_address = rank_workspace.own_address(scales_offset)
        self.output_dtype = output.dtype if output is not None else torch.bfloat16 if self.quantized else payload.dtype
        self.wait_in_kernel = self.device.type == "cuda"  # the CPU path waits on the host
        layout = rank_workspace.layout
        self.signature = signature_tensor(
            combine_signature(rt, layout.max_num_tokens, top_k, payload, combine_offset, self.quantized,
                              active_rank_mask), self.device
        )  # fmt: skip
        if output is None:  # a stand-in of the same dtype and alignment as the ones allocated per call
            output = torch.empty((1, self.hidden), dtype=self.output_dtype, device=self.device)
        stage = _stage_launch(rank_workspace, payload, combine_offset, pdl)
        self.stage_grid = stage.grid
        # The gather's tile for small rounds and for larger ones (a2a.ops.configs.SMALL_ROUND_TOKENS),
        # and whether its programs compare the signatures (configs.GATHER_COMPARE_MAX_TOKENS; else the
        # barrier does): a small round's with and without, a larger round's without. Variants that
        # come out the same are bound once. Both limits are read here, once: a plan's choices never
        # change after it is built.
        self.small_round_tokens = configs.SMALL_ROUND_TOKENS
        self.gather_compare_max_tokens = min(configs.GATHER_COMPARE_MAX_TOKENS, self.small_round_tokens)
        gathers = {(small_rounds, compare): _gather_launch(rank_workspace, payload, combine_offset, output, top_k,
                                                           scales_offset if self.quantized else None, active_rank_mask,
                                                           self.signature, self.wait_in_kernel, small_rounds, pdl,
                                                           compare)
                   for small_rounds, compare in ((True, True), (True, False), (False, False))}  # fmt: skip
        # Load every variant before the barrier is enqueued, also those this rank skips: see a2a.ops.launch.
        self.stage = stage.bind(dynamic=("src_ptr",))
        self.stage_unit = stage.args[0].dtype
        self.stage_scales = None
        if self.quantized:
            stage_scales = _stage_launch(rank_workspace, payload_scales, scales_offset, pdl)
            self.stage_scales_grid = stage_scales.grid
            self.stage_scales = stage_scales.bind(dynamic=("src_ptr",))
            self.stage_scales_unit = stage_scales.args[0].dtype
        # CUDA: one launch signals, waits, compares unless the gather does, and gates. CPU: a signal
        # launch, the host's wait (comparing unless the gather does), a gate launch.
        # Keyed by whether the barrier compares.
        self.barriers = {compare: barrier_launch(rank_workspace, self.signature, active_rank_mask, rt, top_k,
                                                 self.wait_in_kernel, gate=self.wait_in_kernel, pdl=pdl,
                                                 compare=compare and self.wait_in_kernel).bind(dynamic=("num_tokens",))
                         for compare in (False, True)}  # fmt: skip
        bound = {}  # constexprs -> (bound launch, column tiles)
        self.gathers = {}  # (small round, compares) -> (bound launch, column tiles)
        for variant, gather in gathers.items():
            key = tuple(sorted(gather.constexprs.items()))
            if key not in bound:
                bound[key] = (gather.bind(dynamic=("out_ptr", "num_tokens")), gather.grid[1])
            self.gathers[variant] = bound[key]
        if not self.wait_in_kernel:
            self.combine_waits = {compare: rank_workspace.flag_wait(Phase.COMBINE, active_rank_mask,
                                                                    timeout_of_plan()[1], compare_signatures=compare)
                                  for compare in (False, True)}  # fmt: skip
            self.gate = barrier_launch(rank_workspace, self.signature, active_rank_mask, rt, top_k, False, gate=True,
                                       signal=False).bind(dynamic=("num_tokens",))  # fmt: skip
        # Barrier (CUDA; the gate only on the CPU) and a small round's gather in one launch, for
        # token counts up to fused_max_tokens (-1: never).
        self.fused_max_tokens = -1
        if envs.fused_combine_allowed():
            fused = _fused_launch(rank_workspace, payload, combine_offset, output, top_k,
                                  scales_offset if self.quantized else None, active_rank_mask, self.signature, rt,
                                  self.wait_in_kernel, pdl)  # fmt: skip
            self.fused = fused.bind(dynamic=("out_ptr", "num_tokens"))
            self.fused_tiles = fused.grid[1]
            self.fused_max_tokens = min(self.gather_compare_max_tokens,  # the fused programs compare
                                        _fused_max_tokens(self.fused, self.fused_tiles, ep_size, self.wait_in_kernel))

    def accepts(self, payload: torch.Tensor, payload_scales: torch.Tensor | None, local_num_tokens: object,
                output: torch.Tensor | None) -> bool:  # fmt: skip
        """The per-call checks the key leaves open."""
        if type(local_num_tokens) is not int or not 0 <= local_num_tokens <= payload.shape[1]:
            return False
        if self.in_workspace and payload.data_ptr() != self.plane_address:
            return False
        if self.in_workspace and self.quantized and payload_scales.data_ptr() != self.scales_address:
            return False
        return output is None or output.shape[0] == local_num_tokens

    def launch(self, payload: torch.Tensor, payload_scales: torch.Tensor | None, local_num_tokens: int,
               output: torch.Tensor) -> None:  # fmt: skip
        # At least one token row, so a rank without tokens still tells its peers its gather is done.
        rows = max(1, local_num_tokens)
        # Fused only in eager calls: there it saves a launch's host time (7.5 us a combine), while in a
        # CUDA graph, which hides host time, the two launches finished sooner (19.3-19.6 vs 20.7-21.1
        # us at 8 tokens, 8 ranks on one H200; bench/RESULTS.md).
        fused = rows <= self.fused_max_tokens and not (self.wait_in_kernel and capturing(self.device))
        # Who compares the signatures: the gather's programs up to gather_compare_max_tokens rows, else
        # the barrier.
        gather_compares = rows <= self.gather_compare_max_tokens  # a fused round's always do (fused_max_tokens)
        if fused:
            bound_gather, gather_tiles = self.fused, self.fused_tiles
        else:
            bound_gather, gather_tiles = self.gathers[(rows <= self.small_round_tokens, gather_compares)]
        barrier = self.barriers[not gather_compares]
        gather_grid = (rows, gather_tiles)

        def stage() -> None:
            self.stage(self.stage_grid, payload if self.stage.fast else validation.as_units(payload, self.stage_unit))
            if self.stage_scales is not None:
                scales = payload_scales if self.stage_scales.fast else \
                    validation.as_units(payload_scales, self.stage_scales_unit)  # fmt: skip
                self.stage_scales(self.stage_scales_grid, scales)

        if self.wait_in_kernel:  # on the current CUDA stream: the barrier kernel (or program) waits and gates
            if not self.in_workspace:
                stage()
            if not fused:
                barrier((1,), local_num_tokens)
            bound_gather(gather_grid, output, local_num_tokens)
            return

        def gather() -> None:
            bound_gather(gather_grid, output, local_num_tokens)

        steps = [] if self.in_workspace else [stage]
        gate = [] if fused else [lambda: self.gate((1,), local_num_tokens)]  # the fused launch gates itself
        run_steps(current_stream(self.device), [*steps, lambda: barrier((1,), local_num_tokens),
                                                self.combine_waits[not gather_compares], *gate, gather])  # fmt: skip


def _stage_launch(rank_workspace: RankWorkspace, payload: torch.Tensor, combine_offset: int,
                  pdl: bool = False) -> KernelLaunch:  # fmt: skip
    ep_size, rt, hidden = payload.shape
    row_bytes = hidden * payload.element_size()
    workspace = rank_workspace.workspace
    plane_address = workspace.data_ptr() + rank_workspace.ep_rank * rank_workspace.segment_stride + combine_offset
    unit = configs.copy_unit(row_bytes, payload.data_ptr(), plane_address)
    source = validation.as_units(payload, unit.dtype)
    plane = rank_workspace.own(combine_offset, ep_size * rt * unit.row_units, unit.dtype)
    config = configs.stage_config(unit.row_units, unit.unit_bytes)
    return KernelLaunch(
        _stage_combine_kernel,
        (ep_size * rt, -(-unit.row_units // config.tile)),
        (source, plane, rank_workspace.recv_counters, rt),
        dict(ROW_UNITS=unit.row_units, VEC_UNITS=unit.vec_units, TILE=config.tile, num_warps=config.num_warps,
             **pdl_constexprs(pdl)),
    )


def _gather_launch(
    rank_workspace: RankWorkspace, payload: torch.Tensor, combine_offset: int, output: torch.Tensor, top_k: int,
    scales_offset: int | None, active_rank_mask: int, own_signature: torch.Tensor, wait_in_kernel: bool,
    small_rounds: bool = False, pdl: bool = False, compare: bool = True,
) -> KernelLaunch:
    """The gather and top-k reduction; with `compare` every program compares the peers' combine
    signatures with `own_signature` before its stores, and the last one records a disagreement
    (a2a.kernels.combine); without it the barrier must have compared them."""
    ep_size, rt, hidden = payload.shape
    layout = rank_workspace.layout
    planes = rank_workspace.every_rank(combine_offset, ep_size * rt * hidden * payload.element_size(), payload.dtype)
    if scales_offset is not None:
        scales = rank_workspace.every_rank(scales_offset, 4 * ep_size * rt, torch.float32)
    else:  # unused: any fp32 view of the workspace stands in
        scales = rank_workspace.every_rank(layout.payload_offset, 4, torch.float32)
    capacity = layout.max_num_tokens * MAX_TOP_K
    targets = rank_workspace.own(layout.topk_target_ranks_offset, capacity)
    send_indices = rank_workspace.own(layout.topk_send_indices_offset, capacity)
    config = configs.combine_config(hidden, payload.element_size(), top_k, ep_size, small_rounds)
    protocol = protocol_constexprs(rank_workspace, wait_in_kernel)
    return KernelLaunch(
        _combine_kernel,
        (max(1, output.shape[0]), -(-hidden // config.tile)),
        (planes, planes.stride(0), scales, scales.stride(0), output, targets, send_indices, rt, rank_workspace.ep_rank,
         output.shape[0], rank_workspace.round_word(RoundState.GATHER_ELECTION),
         rank_workspace.round_word(RoundState.GATHER_COUNT), rank_workspace.round_words(RoundState.GATHERED_MASK, 2),
         rank_workspace.flag_block_every_rank, rank_workspace.stride_rank, rank_workspace.fault_record,
         *mask_halves(active_rank_mask), rank_workspace.signatures_every_rank(Phase.COMBINE), own_signature,
         rank_workspace.round_word(RoundState.FLAG_VALUE), rank_workspace.host_record_address),
        dict(HIDDEN=hidden, TOP_K=top_k, TILE=config.tile, HAS_SCALES=scales_offset is not None,
             EP_SIZE=ep_size, EP_PAD=protocol["EP_PAD"], FLAG_ARRAY_STRIDE=protocol["FLAG_ARRAY_STRIDE"],
             PHASE=int(Phase.COMBINE), FLAG_ROW=int(FlagArray.COMBINE), SIGNATURE_WORDS=protocol["SIGNATURE_WORDS"],
             COMPARED_WORDS=COMPARED_SIGNATURE_WORDS, HAS_HOST_RECORD=protocol["HAS_HOST_RECORD"],
             COMPARE=compare, num_warps=config.num_warps, **pdl_constexprs(pdl)),
    )


def _fused_launch(rank_workspace: RankWorkspace, payload: torch.Tensor, combine_offset: int, output: torch.Tensor,
                  top_k: int, scales_offset: int | None, active_rank_mask: int, own_signature: torch.Tensor, rt: int,
                  wait_in_kernel: bool, pdl: bool = False) -> KernelLaunch:  # fmt: skip
    """The gather of a small round (`_gather_launch`'s arguments and tile) with the barrier's
    (`barrier_launch`) and the arrival and gate words: `_fused_combine_kernel`. On CUDA its elected
    program signals, waits and gates; on the CPU (the host waited before) it only gates. Every
    program compares the signatures, as the comparing gather's do."""
    gather = _gather_launch(rank_workspace, payload, combine_offset, output, top_k, scales_offset, active_rank_mask,
                            own_signature, wait_in_kernel, small_rounds=True, pdl=pdl)  # fmt: skip
    barrier = barrier_launch(rank_workspace, own_signature, active_rank_mask, rt, top_k, wait_in_kernel,
                             gate=True, signal=wait_in_kernel, pdl=pdl)  # fmt: skip
    barrier_values = dict(zip(_combine_barrier_kernel.arg_names, barrier.args))
    constexprs = {name: value for name, value in barrier.constexprs.items()
                  if name in _fused_combine_kernel.arg_names or name in ("num_warps", "launch_pdl")}  # fmt: skip
    constexprs.update(gather.constexprs)  # the gather's tile and warps
    return KernelLaunch(
        _fused_combine_kernel,
        gather.grid,
        (*gather.args, *(barrier_values[name] for name in _FUSED_BARRIER_ARGS),
         rank_workspace.round_word(RoundState.COMBINE_ARRIVALS), rank_workspace.round_word(RoundState.COMBINE_GATE)),
        {name: value for name, value in constexprs.items() if name not in ("GATE", "COMPARE")},
    )


# The barrier's arguments the fused kernel takes after the gather's (in this order).
_FUSED_BARRIER_ARGS = ("timeout_ns", "timeout_ms", "dispatch_rows_ptr", "dispatch_rt_ptr")


def _fused_max_tokens(fused, tiles: int, ep_size: int, wait_in_kernel: bool) -> int:
    """The most tokens a round may have to run fused: on CUDA what fits beside every peer
    (`configs.fused_combine_max_tokens`; never where the GPU's capacity is unknown), on the CPU
    (interpreted programs run one after another, nothing spins) every small round (the plan then
    caps both at the gather-compare limit)."""
    if not wait_in_kernel:
        return configs.SMALL_ROUND_TOKENS
    resident = fused.resident_programs()
    return -1 if resident is None else configs.fused_combine_max_tokens(resident, tiles, ep_size)


# The gate marks up to max_num_tokens * MAX_TOP_K entries of a lost round, this many per step.
GATE_BLOCK = 1024


def barrier_launch(rank_workspace: RankWorkspace, own_signature: torch.Tensor, active_rank_mask: int, rt: int,
                   top_k: int, wait_in_kernel: bool, gate: bool, signal: bool = True, pdl: bool = False,
                   compare: bool = False) -> KernelLaunch:  # fmt: skip
    """One program: (signal) "my combine plane is ready", with the round's signature, to every peer;
    (wait_in_kernel) wait for theirs and (compare) compare their signatures with this rank's, for a
    gather that does not; (gate) let the gather read, or mark the combine's top-k entries lost after
    a fault or a combine that differs from its dispatch."""
    layout = rank_workspace.layout
    targets = rank_workspace.own(layout.topk_target_ranks_offset, layout.max_num_tokens * MAX_TOP_K)
    return KernelLaunch(
        _combine_barrier_kernel,
        (1,),
        (*barrier_args(rank_workspace, Phase.COMBINE, own_signature, active_rank_mask), rank_workspace.ep_rank,
         targets, rank_workspace.round_word(RoundState.DISPATCH_ROWS), rank_workspace.round_word(RoundState.DISPATCH_RT),
         0, rt),
        dict(PHASE=int(Phase.COMBINE), FLAG_ROW=int(FlagArray.COMBINE), TOP_K=top_k, GATE_BLOCK=GATE_BLOCK,
             SIGNAL=signal, GATE=gate, COMPARE=compare, num_warps=1,
             **protocol_constexprs(rank_workspace, wait_in_kernel),
             **pdl_constexprs(pdl)),
    )
