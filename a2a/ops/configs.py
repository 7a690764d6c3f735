"""Launch parameters: copy units and tile / warp choices, deterministic and identical on every rank.

A choice depends only on shapes every rank agrees on (row bytes, top_k, ep_size) and the GPU
architecture, never on timing at run time, so all ranks build (and load) the same variants: the
tuned table (`tuned_configs.json`, written by `python -m bench.tune`, keyed by architecture, kernel,
row-bytes bucket, top_k and ep_size; ties broken by timings with every rank busy, see tie_break),
else a heuristic. The gather has one variant for small rounds and one for larger ones; each call
picks by its own token count (the tile changes no result).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

TUNED_TABLE = Path(__file__).with_name("tuned_configs.json")

# The widest vector access: 16 bytes (v4.b32).
VECTOR_BYTES = 16
_UNIT_DTYPES = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclass(frozen=True)
class CopyUnit:
    """How a row is moved: as `dtype` units, `row_units` per row, rows aligned to `vec_units` units."""

    dtype: torch.dtype
    row_units: int
    vec_units: int

    @property
    def unit_bytes(self) -> int:
        return self.dtype.itemsize


def copy_unit(row_bytes: int, *addresses: int) -> CopyUnit:
    """Widest unit dividing the row size and every base address; vector alignment if rows allow it."""
    unit = next(u for u in (4, 2, 1) if row_bytes % u == 0 and all(a % u == 0 for a in addresses))
    vector_ok = row_bytes % VECTOR_BYTES == 0 and all(a % VECTOR_BYTES == 0 for a in addresses)
    vec_units = VECTOR_BYTES // unit if vector_ok else 1
    return CopyUnit(_UNIT_DTYPES[unit], row_bytes // unit, vec_units)


def next_power_of_2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def rank_pad(ep_size: int) -> int:
    """Lanes of a per-rank vector in a kernel: a power of 2 >= ep_size, at least 2."""
    return max(next_power_of_2(ep_size), 2)


@dataclass(frozen=True)
class TileConfig:
    tile: int  # elements (or copy units) per program along the row
    num_warps: int


def _tile_for(row_elements: int, element_bytes: int) -> TileConfig:
    """The largest tile (<= 1024 elements) leaving under 1/8 of its lanes masked off in the last
    tile of a row, with enough warps that each thread moves one 16-byte vector."""
    vec = max(1, VECTOR_BYTES // element_bytes)
    candidates = [t for t in (1024, 512, 256, 128, 64, 32, 16) if t <= max(16, next_power_of_2(row_elements))]
    padded = lambda t: -(-row_elements // t) * t  # noqa: E731
    tile = next((t for t in candidates if 8 * (padded(t) - row_elements) < padded(t)), candidates[-1])
    num_warps = min(8, max(1, tile // (32 * vec)))
    return TileConfig(tile=tile, num_warps=num_warps)


def table_key(row_bytes: int, top_k: int, ep_size: int) -> str:
    return f"row_bytes<={next_power_of_2(row_bytes)},top_k={top_k},ep_size={ep_size}"


@functools.cache
def architecture() -> str | None:
    """`sm<major><minor>` of the current CUDA device, None on the CPU (the interpreter ignores tiles' speed)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


@functools.cache
def _tuned_table() -> dict:
    if not TUNED_TABLE.exists():
        return {}
    return json.loads(TUNED_TABLE.read_text()).get("configs", {})


# Candidates whose one-rank timings (bench.tune) are within this fraction of the fastest tie.
TIE_MARGIN = 0.02


def _config_named(name: str) -> TileConfig:
    tile, warps = (int(part.split("=")[1]) for part in name.split(","))
    return TileConfig(tile=tile, num_warps=warps)


# Rounds of at most this many tokens per rank are "small": a tuned entry's busy timings at those
# sizes choose their config apart from the larger rounds' (the DeepSeek gather: 2048x8 is 1 us
# faster at 16 tokens, 1024x4 5 % faster at 1024-4096; bench/results/h200_tile_choices_combine.log).
SMALL_ROUND_TOKENS = 128

# The combine compares its peers' round signatures in every gather program for rounds of at most
# this many token rows a rank, and in the barrier kernel after its wait for larger ones
# (a2a.kernels.combine). In the barrier the compare delays every gather by 0.9 us at 16 tokens; in
# the gather it is hidden there but cost 2.4-2.65 us at 128 tokens and 2 us at 4096 (graph A/B of the
# two placements against 544fef1, 8 ranks on one H200, bench/RESULTS.md session 16).
GATHER_COMPARE_MAX_TOKENS = 32
assert GATHER_COMPARE_MAX_TOKENS <= SMALL_ROUND_TOKENS  # the gathers of larger rounds never compare


# A fused combine (barrier and gather in one launch, a2a.ops.combine) has every program spin while it
# holds an SM: the elected one on the peers, the others on its gate. On one GPU shared by every rank
# of a world (the simulation, or processes sharing a GPU) and by a second instance's rounds, all of
# them may be resident at once, each rank with up to OTHER_WAITING_PROGRAMS single waiting programs
# of its other phases. A combine fuses only while all of that fits; otherwise a peer's barrier could
# find no SM free until its wait timed out.
FUSED_COMBINE_INSTANCES = 2
OTHER_WAITING_PROGRAMS = 3


def _spinning_programs_per_rank(resident_programs: int, ep_size: int) -> int:
    return resident_programs // (FUSED_COMBINE_INSTANCES * ep_size) - OTHER_WAITING_PROGRAMS


def fused_combine_max_tokens(resident_programs: int, tiles: int, ep_size: int) -> int:
    """The most tokens per rank (at most SMALL_ROUND_TOKENS) whose fused combine grid
    (`tiles` programs a token) fits `resident_programs` (what the GPU holds of the fused variant)
    on the rule above; below 1, no round fuses."""
    return min(SMALL_ROUND_TOKENS, _spinning_programs_per_rank(resident_programs, ep_size) // tiles)


# A fused dispatch (routing and copy in one launch, a2a.ops.dispatch) routes one block of tokens
# in every program, so it serves rounds of one routing block; each program spins in its own wait
# for the previous round's gathers, so the same residency rule as the fused combine's applies.
# Two variants: a 16-token block for decode rounds (a quarter of the 64-token block's routing work
# in every program) and the full block. Its copy stores one [K_PAD, TILE] tile per payload tile, so
# top_k up to 8 (K_PAD 8, the copy kernel's widest K_CHUNK).
FUSED_DISPATCH_BLOCKS = (16, 64)
FUSED_DISPATCH_MAX_K_PAD = 8


# Under the Triton interpreter (CPU) programs run one after another, so every program routing the
# whole block costs what it saves: a round of 16, 9, 30 and 2 tokens on 4 ranks took 3.9 s fused
# against 2.4 s apart (hidden 256, 1 tile a token). The CPU fuses only decode-size rounds.
INTERPRETED_FUSED_DISPATCH_TOKENS = 16


def fused_dispatch_max_tokens(resident_programs: int, tiles: int, ep_size: int) -> int:
    """The most tokens per rank (at most one routing block, the largest of FUSED_DISPATCH_BLOCKS)
    whose fused dispatch grid (`tiles` programs a token) fits `resident_programs` on the rule above."""
    return min(FUSED_DISPATCH_BLOCKS[-1], _spinning_programs_per_rank(resident_programs, ep_size) // tiles)


def fused_dispatch_block(num_tokens: int) -> int:
    """The routing block of the fused dispatch variant that serves `num_tokens` rows."""
    return next(block for block in FUSED_DISPATCH_BLOCKS if num_tokens <= block)


def tie_break(entry: dict, small_rounds: bool = False) -> TileConfig:
    """A tuned entry's choice for small rounds (<= SMALL_ROUND_TOKENS tokens per rank) or larger
    ones: the fastest candidate of bench.tune (one rank alone), unless candidates tied with it
    (within TIE_MARGIN) were timed with every rank busy (`busy_us`, from
    bench.profile.tile_choices) at every size of that class it was timed at: then the one of those
    with the least total busy time there. Where one-rank timings cannot tell candidates apart, the
    busy timings can (5 % apart)."""
    alone = entry["candidates_us"]
    fastest = min(alone, key=alone.get)
    busy = entry.get("busy_us", {})
    sizes = [t for t in busy.get(fastest, {}) if (int(t) <= SMALL_ROUND_TOKENS) == small_rounds]
    if not sizes:
        return _config_named(fastest)
    tied = [name for name, us in alone.items()
            if us <= alone[fastest] * (1 + TIE_MARGIN) and all(t in busy.get(name, {}) for t in sizes)]  # fmt: skip
    return _config_named(min(tied, key=lambda name: sum(busy[name][t] for t in sizes)))


def _tuned(kernel: str, row_elements: int, element_bytes: int, top_k: int, ep_size: int,
           small_rounds: bool = False) -> TileConfig | None:  # fmt: skip
    arch = architecture()
    if arch is None:
        return None
    entry = _tuned_table().get(arch, {}).get(kernel, {}).get(table_key(row_elements * element_bytes, top_k, ep_size))
    if entry is None:
        return None
    return tie_break(entry, small_rounds)  # the stored tile / num_warps: tie_break(entry) (larger rounds)


def dispatch_copy_config(max_row_units: int, unit_bytes: int, top_k: int, ep_size: int) -> TileConfig:
    """Tile over the widest payload row (in copy units): tuned table, else heuristic."""
    tuned = _tuned("dispatch_copy", max_row_units, unit_bytes, top_k, ep_size)
    return tuned or _tile_for(max_row_units, unit_bytes)


def combine_config(hidden: int, element_bytes: int, top_k: int, ep_size: int, small_rounds: bool = False) -> TileConfig:
    """Tile over the hidden size (elements) of the gather of a small round (<= SMALL_ROUND_TOKENS
    tokens) or a larger one: tuned table, else heuristic."""
    tuned = _tuned("combine", hidden, element_bytes, top_k, ep_size, small_rounds)
    return tuned or _tile_for(hidden, element_bytes)


def stage_config(row_units: int, unit_bytes: int) -> TileConfig:
    return _tile_for(row_units, unit_bytes)


SANITIZE_BLOCK_ROWS = 128
# 8 warps: with every rank's routing running at once (one GPU, or one SM shared by several
# ranks' single-block launches) a 16-token round's routing took 16.4 us at 4 warps, 11.6 us at 8
# (bench/profile/round_timeline.py 16 rank-graphs route-warps=N, H100).
ROUTE_NUM_WARPS = 8
# Blocks scanned per step by the last routing program.
ROUTE_SCAN_BLOCKS = 32
# Elements of one [tokens, k, chunk] comparison tile of routing: 8192 int32 over 8 warps is 32
# registers a thread, no spills.
ROUTE_TILE_ELEMENTS = 8192


def route_chunks(block_tokens: int, k_pad: int, ep_pad: int, tile_elements: int = ROUTE_TILE_ELEMENTS) -> dict[str, int]:
    """Routing's K_CHUNK (earlier entries compared per de-duplication step) and RANK_CHUNK (ranks
    per slot step): as many as keep a [block_tokens, k_pad, chunk] tile within `tile_elements`
    (ROUTE_TILE_ELEMENTS for the routing kernel's warps; a fused dispatch passes 1024 per warp)."""
    widest = max(1, tile_elements // (block_tokens * k_pad))
    return dict(K_CHUNK=min(k_pad, widest), RANK_CHUNK=min(ep_pad, widest))
