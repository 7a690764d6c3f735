"""The engine-facing layer: one object per expert-parallel group, rank-major receive buffers.

The shape of FlashInfer 0.7's `flashinfer.moe_ep` one-sided NVLink communication, over a2a:
an engine writes its prepare (route, quantize, dispatch) and finalize (combine) once.

    params = a2a.EpParams(num_experts=256, top_k=8, max_tokens_per_rank=128, hidden_size=7168,
                          dispatch_format=a2a.QuantFormat.FP8_PER_TOKEN)
    ep = a2a.EpAlltoAll(params, mapping, world=world)        # or mnnvl_config=MnnvlConfig(comm_backend=...)
    received = ep.dispatch(hidden_states, topk_ids, topk_weights)
    # received.hidden_states: [ep_size * tokens_per_rank, ...], row source * tokens_per_rank + slot;
    # rows past a source's count carry topk_ids == invalid_expert_id.
    buffer = ep.get_combine_input_buffer()                   # [ep_size * tokens_per_rank, hidden_size]
    ... experts write each received row's weighted output into buffer ...
    out = ep.combine(buffer)                                 # [num_local_tokens, hidden_size]

Payloads of one dispatch, in order: the hidden states (as they are, or quantized with
`dispatch_format`: values, scales (, nvfp4 global scale)), the int32 top-k ids, the top-k
weights if given. Every rank of the group makes the same sequence of calls with the same params.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a2a.moe_alltoall import MoeAlltoAll
from a2a.functional import moe_a2a_get_workspace_size_per_rank
from a2a.ops import validation
from a2a.quantization import QuantFormat, QuantizedActivation, quantize


@dataclass(frozen=True)
class EpParams:
    """What every rank of the group agrees on.

    dtype: the hidden states' dtype and the expert outputs' (combine) dtype. dispatch_format: None
    sends the hidden states as they are; a `QuantFormat` quantizes them before dispatch (unless the
    caller passes them quantized with `hidden_states_scale`). low_precision_combine: fp8 per-row
    expert outputs on the links (FlashInfer's `use_low_precision`)."""

    num_experts: int
    top_k: int
    max_tokens_per_rank: int
    hidden_size: int
    dtype: torch.dtype = torch.bfloat16
    dispatch_format: QuantFormat | None = None
    invalid_expert_id: int = -1
    low_precision_combine: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "max_tokens_per_rank", "hidden_size"):
            validation.require_int(f"EpParams.{name}", getattr(self, name), 1)
        validation.require_int("EpParams.invalid_expert_id", self.invalid_expert_id, -(2**31), 2**31 - 1)
        if self.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"EpParams.dtype must be bf16, fp16 or fp32, got {self.dtype}")
        if self.dispatch_format is not None and not isinstance(self.dispatch_format, QuantFormat):
            raise TypeError(f"EpParams.dispatch_format must be None or a QuantFormat, got {self.dispatch_format!r}")

    def hidden_payload_bytes(self) -> list[int]:
        """Bytes per token of the hidden-state payloads (one, or those of the quantized format)."""
        if self.dispatch_format is None:
            return [self.hidden_size * self.dtype.itemsize]
        return self.dispatch_format.payload_bytes_per_token(self.hidden_size)

    def workspace_size_per_rank(self, ep_size: int, with_weights: bool = True, eplb_stats_num_experts: int = 0) -> int:
        rows = [*self.hidden_payload_bytes(), 4 * self.top_k] + ([4 * self.top_k] if with_weights else [])
        combine = self.hidden_size * self.dtype.itemsize + 4  # + room for the fp8 combine's row scales
        return moe_a2a_get_workspace_size_per_rank(ep_size, self.max_tokens_per_rank, rows, combine,
                                                   eplb_stats_num_experts)  # fmt: skip


@dataclass
class EpDispatchResult:
    """Rank-major receive buffers, `[ep_size * tokens_per_rank, ...]`: row `source * tokens_per_rank +
    slot` holds the slot-th token that rank `source` sent here; rows past a source's count are
    stale (their `topk_ids` are all `invalid_expert_id`). Views into the workspace, valid until
    the matching combine starts."""

    hidden_states: torch.Tensor  # the hidden states, or the quantized values
    topk_ids: torch.Tensor  # int32 [rows, top_k], global expert ids
    topk_weights: torch.Tensor | None
    tokens_per_rank: int
    hidden_states_scale: torch.Tensor | None = None  # quantized dispatch: the scales
    hidden_states_global_scale: torch.Tensor | None = None  # nvfp4: one fp32 per row
    eplb_gathered_stats: torch.Tensor | None = None  # read or copy it before the combine
    dispatch_format: QuantFormat | None = None

    def quantized(self) -> QuantizedActivation:
        """The received rows as a `QuantizedActivation` (quantized dispatch only)."""
        if self.dispatch_format is None:
            raise ValueError("the hidden states were dispatched unquantized")
        planes = [self.hidden_states, self.hidden_states_scale]
        if self.hidden_states_global_scale is not None:
            planes.append(self.hidden_states_global_scale)
        return QuantizedActivation.from_payloads(self.dispatch_format, planes)


class EpAlltoAll:
    """One rank's dispatch / combine for its expert-parallel group (one in-flight pair at a time).

    `mapping`, `world`, `mnnvl_config`, `eplb_stats_num_experts`, `enable_rank_mask`: as for
    `MoeAlltoAll`, which this wraps (`alltoall`); its workspace is sized exactly for the params'
    payloads (`with_weights`: whether dispatch carries top-k weights)."""

    def __init__(self, params: EpParams, mapping: object, *, world: object = None, mnnvl_config: object = None,
                 eplb_stats_num_experts: int = 0, enable_rank_mask: bool = False, with_weights: bool = True):  # fmt: skip
        if not isinstance(params, EpParams):
            raise TypeError(f"params must be an EpParams, got {type(params).__name__}")
        self.params = params
        size = params.workspace_size_per_rank(int(mapping.moe_ep_size), with_weights, eplb_stats_num_experts)  # type: ignore[attr-defined]
        self.alltoall = MoeAlltoAll(mapping, params.max_tokens_per_rank, params.top_k, params.num_experts, size,
                                    mnnvl_config=mnnvl_config, eplb_stats_num_experts=eplb_stats_num_experts,
                                    enable_rank_mask=enable_rank_mask, world=world)  # fmt: skip
        self.ep_size, self.ep_rank = self.alltoall.ep_size, self.alltoall.ep_rank
        self._tokens_per_rank: int | None = None
        self._combine_buffer: torch.Tensor | None = None

    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None = None,
                 *, hidden_states_scale: torch.Tensor | None = None, runtime_max_tokens_per_rank: int | None = None,
                 eplb_local_stats: torch.Tensor | None = None,
                 active_rank_mask: torch.Tensor | None = None) -> EpDispatchResult:  # fmt: skip
        """Send this rank's `[n, hidden_size]` tokens to the ranks owning their `topk_ids`.

        `runtime_max_tokens_per_rank` (default: max_tokens_per_rank) bounds every rank's n this
        round and must agree across ranks. `hidden_states_scale`: the hidden states are already
        quantized in the params' fp8 format (values, with these scales)."""
        params = self.params
        if self._tokens_per_rank is not None:
            raise RuntimeError("EpAlltoAll.dispatch called twice without a combine in between")
        rt = params.max_tokens_per_rank if runtime_max_tokens_per_rank is None else runtime_max_tokens_per_rank
        validation.require_int("runtime_max_tokens_per_rank", rt, 1, params.max_tokens_per_rank)
        if isinstance(topk_ids, torch.Tensor) and topk_ids.dtype != torch.int32:
            topk_ids = topk_ids.to(torch.int32)
        hidden_payloads = self._hidden_payloads(hidden_states, hidden_states_scale)
        payloads = [*hidden_payloads, topk_ids] + ([topk_weights] if topk_weights is not None else [])
        ids_index = len(hidden_payloads)
        recv = self.alltoall.dispatch(topk_ids, payloads, rt, params.invalid_expert_id, ids_index, eplb_local_stats,
                                      active_rank_mask)  # fmt: skip
        self._tokens_per_rank = rt
        rows = [plane.flatten(0, 1) for plane in recv]
        quantized = params.dispatch_format is not None
        return EpDispatchResult(
            hidden_states=rows[0], topk_ids=rows[ids_index], tokens_per_rank=rt,
            topk_weights=rows[ids_index + 1] if topk_weights is not None else None,
            hidden_states_scale=rows[1] if quantized else None,
            hidden_states_global_scale=rows[2] if quantized and len(hidden_payloads) == 3 else None,
            eplb_gathered_stats=self.alltoall.eplb_gathered_stats if eplb_local_stats is not None else None,
            dispatch_format=params.dispatch_format,
        )  # fmt: skip

    def _hidden_payloads(self, hidden_states: torch.Tensor, scale: torch.Tensor | None) -> list[torch.Tensor]:
        params = self.params
        if params.dispatch_format is None:
            if scale is not None:
                raise ValueError("hidden_states_scale needs EpParams.dispatch_format (a quantized dispatch)")
            return [hidden_states]
        if scale is not None:
            if params.dispatch_format is QuantFormat.NVFP4:
                raise ValueError("pre-quantized nvfp4 needs its global scale too: pass the bf16 hidden states")
            return QuantizedActivation(params.dispatch_format, hidden_states, scale).payloads()
        return quantize(hidden_states, params.dispatch_format).payloads()

    def get_combine_input_buffer(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`[ep_size * tokens_per_rank, hidden_size]` view of this rank's combine plane: write the
        expert outputs here and pass it to `combine` (no staging copy)."""
        if self._tokens_per_rank is None:
            raise RuntimeError("get_combine_input_buffer called before dispatch")
        plane = self.alltoall.get_combine_payload_tensor_in_workspace(
            self._tokens_per_rank, self.params.hidden_size, dtype or self.params.dtype
        )
        self._combine_buffer = plane.flatten(0, 1)
        return self._combine_buffer

    def combine(self, expert_output: torch.Tensor, *, output: torch.Tensor | None = None,
                active_rank_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Sum every local token's expert outputs (`[ep_size * tokens_per_rank, hidden_size]`, or
        `[ep_size, tokens_per_rank, hidden_size]`, weighted), `[n, hidden_size]`."""
        rt = self._tokens_per_rank
        if rt is None:
            raise RuntimeError("combine called before dispatch")
        if not isinstance(expert_output, torch.Tensor) or expert_output.dim() not in (2, 3):
            raise ValueError(f"expert_output must be a 2-D or 3-D tensor, got {getattr(expert_output, 'shape', expert_output)!r}")
        payload = expert_output.view(self.ep_size, rt, -1) if expert_output.dim() == 2 else expert_output
        in_workspace = self._combine_buffer is not None and expert_output.data_ptr() == self._combine_buffer.data_ptr()
        combined = self.alltoall.combine(payload, rt, in_workspace, output=output,
                                         use_low_precision=self.params.low_precision_combine,
                                         active_rank_mask=active_rank_mask)  # fmt: skip
        self._tokens_per_rank = None
        self._combine_buffer = None
        return combined
