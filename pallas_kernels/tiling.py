"""Row tiles for grouped matmuls over rows sorted by group (megablox-style metadata).

Rows arrive sorted by an int32 group key (for the experts: tier and weight row); rows whose
key is `INVALID` (padding tokens, masked pairs) sort last and belong to no tile. Each group's
rows are cut into tiles of `tm` rows starting at the group's first row, so a tile never mixes
groups in what it stores: rows it reads past its group's end belong to the next group (or to
padding) and are masked out when the tile writes. Groups without rows get no tiles, hence
their weights are never read.

The number of tiles is sum_g ceil(n_g / tm) <= rows // tm + min(groups, rows) (`max_tiles`),
the static grid size; tiles past `count` carry key INVALID and do nothing. Everything here is
elementwise work, cumulative sums and one scatter: no sort, no search loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INVALID = jnp.iinfo(jnp.int32).max  # key of rows that no tile computes


def max_tiles(num_rows: int, num_groups: int, tm: int) -> int:
    return num_rows // tm + min(num_groups, num_rows)


@dataclasses.dataclass(frozen=True)
class Tiles:
    key: jax.Array  # [M] int32 group of each tile, INVALID for unused tiles
    start: jax.Array | None  # [M] int32 first row the tile reads; None: tile t starts at row t
    end: jax.Array  # [M] int32 end of its group's rows (rows at or past it are not stored)
    count: jax.Array  # [] int32 tiles in use (a prefix of the M slots)


jax.tree_util.register_dataclass(Tiles, data_fields=["key", "start", "end", "count"], meta_fields=[])


def _openers(keys: jax.Array, tm: int):
    """(rows that open a tile [P] bool, end of each row's group [P]) for sorted `keys` [P]."""
    (P,) = keys.shape
    r = jnp.arange(P, dtype=jnp.int32)
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), keys[:-1]])
    first = keys != prev  # [P] row opens a group
    group_start = jax.lax.cummax(jnp.where(first, r, 0))
    # Each group ends where the next one opens (or at P): a reversed running minimum.
    opens_after = jnp.concatenate([jnp.where(first[1:], r[1:], P), jnp.full((1,), P, jnp.int32)])
    group_end = jax.lax.cummin(opens_after, reverse=True)
    return (keys != INVALID) & (first | ((r - group_start) % tm == 0)), group_end


def row_tiles(keys: jax.Array, tm: int) -> Tiles:
    """One tile slot per row: row r's slot is a tile starting at r if r opens one, else unused.

    No compaction and no scan: each row finds its group's bounds by comparing its key with
    every key (P^2 compares in one fused kernel, cheap for the few hundred rows of a decode
    step), and the grid has a program per row, those of rows that open no tile exiting at
    once. `plan_tiles` compacts, for long prefills.
    """
    (P,) = keys.shape
    group_start = jnp.sum(keys[None, :] < keys[:, None], axis=1, dtype=jnp.int32)
    group_end = jnp.sum(keys[None, :] <= keys[:, None], axis=1, dtype=jnp.int32)
    r = jnp.arange(P, dtype=jnp.int32)
    opens = (keys != INVALID) & ((r - group_start) % tm == 0)
    return Tiles(key=jnp.where(opens, keys, INVALID), start=None, end=group_end, count=jnp.int32(P))


def plan_tiles(keys: jax.Array, tm: int, num_tiles: int) -> Tiles:
    """Tiles of `tm` rows over `keys` [P] (sorted ascending, INVALID last), `num_tiles` slots."""
    (P,) = keys.shape
    r = jnp.arange(P, dtype=jnp.int32)
    opens_tile, group_end = _openers(keys, tm)
    slot = jnp.where(opens_tile, jnp.cumsum(opens_tile) - 1, num_tiles)  # num_tiles: dropped
    scatter = lambda fill, values: jnp.full((num_tiles,), fill, jnp.int32).at[slot].set(values, mode="drop")
    return Tiles(
        key=scatter(INVALID, keys),
        start=scatter(0, r),
        end=scatter(0, group_end),
        count=jnp.sum(opens_tile, dtype=jnp.int32),
    )


def group_keys(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[num_rows] group index of each row for rows sorted by group (`jax.lax.ragged_dot`
    semantics); rows past the sum of `group_sizes` get INVALID. Negative sizes count as 0."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.cumsum(sizes)
    # A row's group is the number of groups ending at or before it: compare against every end
    # (no search loop; G is the number of experts, small).
    g = jnp.sum(jnp.arange(num_rows, dtype=jnp.int32)[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)
    return jnp.where(g < sizes.shape[0], g, INVALID)
