"""Row tiles for grouped matmuls over rows sorted by expert (megablox-style metadata).

Each expert's rows are cut into tiles of `tm` rows starting at the expert's first row, so a
tile never mixes experts in what it stores: rows it reads past its expert's end belong to the
next expert (or to padding) and are masked out when the tile writes its output. Experts with
no rows get no tiles, hence their weights are never read.

The number of tiles is sum_e ceil(g_e / tm) <= T // tm + min(E, T) (`max_tiles`), the static
grid size; tiles past the real count carry expert id -1 and do nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def max_tiles(num_rows: int, num_groups: int, tm: int) -> int:
    return num_rows // tm + min(num_groups, num_rows)


@dataclasses.dataclass(frozen=True)
class RowTiles:
    expert: jax.Array  # [max_tiles] int32, -1 for unused tiles
    row_start: jax.Array  # [max_tiles] int32, first row the tile reads
    row_end: jax.Array  # [max_tiles] int32, end of its expert's rows (store mask bound)
    num_valid_rows: jax.Array  # [] int32, sum of group sizes (rows past it are zero)


def make_row_tiles(group_sizes: jax.Array, num_rows: int, tm: int) -> RowTiles:
    gs = jnp.maximum(group_sizes.astype(jnp.int32), 0)  # [E]
    num_groups = gs.shape[0]
    ends = jnp.cumsum(gs)  # [E]
    starts = ends - gs
    ntiles = (gs + tm - 1) // tm  # [E]
    tile_ends = jnp.cumsum(ntiles)
    tile_starts = tile_ends - ntiles
    t = jnp.arange(max_tiles(num_rows, num_groups, tm), dtype=jnp.int32)
    # Tile t belongs to the expert whose [tile_start, tile_end) holds it: count ends <= t.
    e = jnp.searchsorted(tile_ends, t, side="right").astype(jnp.int32)
    valid = t < tile_ends[-1]
    e = jnp.minimum(e, num_groups - 1)
    row_start = starts[e] + (t - tile_starts[e]) * tm
    return RowTiles(
        expert=jnp.where(valid, e, -1),
        row_start=jnp.where(valid, row_start, 0).astype(jnp.int32),
        row_end=jnp.where(valid, ends[e], 0).astype(jnp.int32),
        num_valid_rows=jnp.minimum(ends[-1], num_rows),
    )
