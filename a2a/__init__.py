"""a2a: MoE expert-parallel all-to-all (dispatch, sanitize, combine) in Triton over symmetric memory.

Floors, each importing only from below (docs/architecture.md): this package's top level is the API
(`MoeAlltoAll`, `moe_a2a_*`, torch ops) and the data model (layout, workspace views, errors);
`a2a.ops` holds the launchers; `a2a.kernels` (Triton) and `a2a.runtime` (streams, signalling,
worlds, memory) are the ground floor.

The API follows FlashInfer's `flashinfer.comm` MoE all-to-all (`MoeAlltoAll` and the `moe_a2a_*`
functions), so switching is one import. Without a CUDA device the kernels run under the Triton
interpreter (TRITON_INTERPRET=1 is set here before any kernel is defined, unless already set).
"""

from a2a import envs

envs.configure_triton_for_host()

from a2a.errors import (  # noqa: E402
    A2AError,
    A2AFaultError,
    A2AMismatchError,
    A2APeerFailedError,
    A2ATimeoutError,
    PhaseError,
)
from a2a.functional import (  # noqa: E402
    MOE_A2A_RANK_MASK_WORDS,
    moe_a2a_active_rank_mask,
    moe_a2a_combine,
    moe_a2a_dispatch,
    moe_a2a_get_aux_data_size,
    moe_a2a_get_metainfo_index_pairs,
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_initialize,
    moe_a2a_sanitize_expert_ids,
    moe_a2a_wrap_payload_tensor_in_workspace,
)
from a2a.layout import MAX_PAYLOADS, MAX_RANKS, MAX_TOP_K, WorkspaceLayout  # noqa: E402
from a2a.mapping import Mapping, MnnvlConfig  # noqa: E402
from a2a.moe_alltoall import MoeAlltoAll  # noqa: E402
from a2a.quantization import QuantFormat, SfLayout  # noqa: E402
from a2a.ep_layer import EpAlltoAll, EpDispatchResult, EpParams  # noqa: E402
from a2a.runtime.process_world import ProcessWorld  # noqa: E402
from a2a.runtime.simulated import SimulatedWorld  # noqa: E402

__all__ = [
    "A2AError",
    "A2AFaultError",
    "A2AMismatchError",
    "A2APeerFailedError",
    "A2ATimeoutError",
    "MAX_PAYLOADS",
    "MAX_RANKS",
    "EpAlltoAll",
    "EpDispatchResult",
    "EpParams",
    "MAX_TOP_K",
    "MOE_A2A_RANK_MASK_WORDS",
    "Mapping",
    "MnnvlConfig",
    "MoeAlltoAll",
    "PhaseError",
    "ProcessWorld",
    "SimulatedWorld",
    "QuantFormat",
    "SfLayout",
    "WorkspaceLayout",
    "moe_a2a_active_rank_mask",
    "moe_a2a_combine",
    "moe_a2a_dispatch",
    "moe_a2a_get_aux_data_size",
    "moe_a2a_get_metainfo_index_pairs",
    "moe_a2a_get_workspace_size_per_rank",
    "moe_a2a_initialize",
    "moe_a2a_sanitize_expert_ids",
    "moe_a2a_wrap_payload_tensor_in_workspace",
]
