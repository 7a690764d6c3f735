"""Launch parameters: copy units and tile / warp choices, deterministic and identical on every rank.

A choice depends only on shapes every rank agrees on (row bytes, top_k, ep_size), never on timing,
so all ranks launch the same variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def dispatch_copy_config(max_row_units: int, unit_bytes: int, top_k: int, ep_size: int) -> TileConfig:
    """Tile over the widest payload row (in copy units)."""
    return _tile_for(max_row_units, unit_bytes)


def combine_config(hidden: int, element_bytes: int, top_k: int, ep_size: int) -> TileConfig:
    return _tile_for(hidden, element_bytes)


def stage_config(row_units: int, unit_bytes: int) -> TileConfig:
    return _tile_for(row_units, unit_bytes)


SANITIZE_BLOCK_ROWS = 128
ROUTE_NUM_WARPS = 4
# Blocks scanned per step by the last routing program.
ROUTE_SCAN_BLOCKS = 32
