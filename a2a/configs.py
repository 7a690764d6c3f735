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


@dataclass(frozen=True)
class TileConfig:
    tile: int  # elements (or copy units) per program along the row
    num_warps: int


def _tile_for(row_elements: int, max_tile: int) -> TileConfig:
    tile = min(next_power_of_2(row_elements), max_tile)
    num_warps = 4 if tile <= 512 else 8
    return TileConfig(tile=max(tile, 16), num_warps=num_warps)


def dispatch_copy_config(max_row_units: int, top_k: int, ep_size: int) -> TileConfig:
    """Tile over the widest payload row (in copy units)."""
    return _tile_for(max_row_units, 1024)


def combine_config(hidden: int, top_k: int, ep_size: int) -> TileConfig:
    return _tile_for(hidden, 1024)


def stage_config(row_units: int) -> TileConfig:
    return _tile_for(row_units, 1024)


SANITIZE_BLOCK_ROWS = 128
ROUTE_NUM_WARPS = 4
# Blocks scanned per step by the last routing program.
ROUTE_SCAN_BLOCKS = 32
