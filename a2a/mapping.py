"""The parallel layout (`Mapping`) and the MNNVL configuration (`MnnvlConfig`), with FlashInfer's
arguments, as `MoeAlltoAll` and `EpAlltoAll` take them."""

from __future__ import annotations

from dataclasses import dataclass

from a2a.ops import validation


class Mapping:
    """The parallel layout, with FlashInfer's / TensorRT-LLM's arguments and rank properties
    (`MoeAlltoAll` reads `moe_ep_size` and `moe_ep_rank`; FlashInfer's own `Mapping` works too).

    FlashInfer's rules: `tp_size * pp_size * cp_size == world_size`, the MoE sizes split `tp_size`
    (`moe_ep_size` and `moe_tp_size` default from each other; both unset: no expert parallelism),
    and `moe_ep_rank = tp_rank % moe_ep_size`. a2a's short form, `Mapping(world_size, rank)` with
    nothing else (which FlashInfer rejects for world_size > 1): every rank one expert-parallel rank.
    """

    def __init__(self, world_size: int = 1, rank: int = 0, gpus_per_node: int = 8, *, cp_size: int = 1,
                 cp_config: object = None, tp_size: int = 1, pp_size: int = 1, moe_cluster_size: int = -1,
                 moe_tp_size: int = -1, moe_ep_size: int = -1, attn_tp_size: int = -1, attn_cp_size: int = -1,
                 auto_parallel: bool = False, enable_attention_dp: bool = False):  # fmt: skip
        validation.require_int("Mapping.world_size", world_size, 1)
        validation.require_int("Mapping.rank", rank, 0, world_size - 1)
        validation.require_int("Mapping.gpus_per_node", gpus_per_node, 1)
        for name, value in (("cp_size", cp_size), ("tp_size", tp_size), ("pp_size", pp_size)):
            validation.require_int(f"Mapping.{name}", value, 1)
        short_form = (tp_size, pp_size, cp_size, moe_tp_size, moe_ep_size, moe_cluster_size) == (1, 1, 1, -1, -1, -1)
        if short_form and world_size > 1:  # a2a's form: pure expert parallelism over the world
            tp_size = moe_ep_size = world_size
        if moe_cluster_size == -1:
            moe_cluster_size = 1
        if moe_tp_size == -1 and moe_ep_size == -1:
            moe_tp_size, moe_ep_size = tp_size // moe_cluster_size, 1
        elif moe_tp_size == -1:
            moe_tp_size = tp_size // (validation.require_int("Mapping.moe_ep_size", moe_ep_size, 1) * moe_cluster_size)
        elif moe_ep_size == -1:
            moe_ep_size = tp_size // (validation.require_int("Mapping.moe_tp_size", moe_tp_size, 1) * moe_cluster_size)
        for name, value in (("moe_ep_size", moe_ep_size), ("moe_tp_size", moe_tp_size),
                            ("moe_cluster_size", moe_cluster_size)):  # fmt: skip
            validation.require_int(f"Mapping.{name}", value, 1)
        if not auto_parallel and tp_size * pp_size * cp_size != world_size:
            raise ValueError(f"Mapping: world_size ({world_size}) must equal tp_size * pp_size * cp_size "
                             f"({tp_size} * {pp_size} * {cp_size})")  # fmt: skip
        if moe_ep_size * moe_tp_size * moe_cluster_size != tp_size:
            raise ValueError(f"Mapping: moe_ep_size * moe_tp_size * moe_cluster_size ({moe_ep_size} * {moe_tp_size} * "
                             f"{moe_cluster_size}) must equal tp_size ({tp_size})")  # fmt: skip
        self.world_size, self.rank, self.gpus_per_node = world_size, rank, gpus_per_node
        self.cp_size, self.cp_config, self.tp_size, self.pp_size = cp_size, cp_config, tp_size, pp_size
        self.moe_cluster_size, self.moe_tp_size, self.moe_ep_size = moe_cluster_size, moe_tp_size, moe_ep_size
        self.attn_tp_size, self.attn_cp_size = attn_tp_size, attn_cp_size
        self.auto_parallel, self.enable_attention_dp = auto_parallel, enable_attention_dp

    @property
    def tp_rank(self) -> int:
        return 0 if self.auto_parallel else self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return 0 if self.auto_parallel else self.rank // (self.tp_size * self.cp_size)

    @property
    def cp_rank(self) -> int:
        return 0 if self.auto_parallel else self.rank % (self.tp_size * self.cp_size) // self.tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank // (self.moe_ep_size * self.moe_cluster_size)

    @property
    def moe_cluster_rank(self) -> int:
        return self.tp_rank % self.moe_cluster_size

    @property
    def moe_ep_rank(self) -> int:
        return self.tp_rank % self.moe_ep_size

    @property
    def node_rank(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.gpus_per_node

    def has_moe_ep(self) -> bool:
        return self.moe_ep_size > 1

    def __repr__(self) -> str:
        return (f"Mapping(world_size={self.world_size}, rank={self.rank}, tp_size={self.tp_size}, "
                f"moe_ep_size={self.moe_ep_size}, moe_ep_rank={self.moe_ep_rank})")  # fmt: skip


@dataclass
class MnnvlConfig:
    """FlashInfer's MNNVL configuration; a2a reads `comm_backend` (a communicator with Get_rank,
    Get_size, allgather and barrier, e.g. vLLM's / SGLang's) to build the world. FlashInfer's own
    MnnvlConfig works too. The other fields size fabric allocations, which a2a does not make."""

    comm_backend: object = None
    allocation_granularity: int = 0
    fabric_page_size: int = 1 << 29
