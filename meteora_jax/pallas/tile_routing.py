"""The `fused` strategy's routing per token tile: each tile's slots (its U most chosen adapters) and what every
token gives each slot, in one kernel.

    c[t, j] = w[t, j] * s[idx[t, j]];  slots of tile g: its U adapters of most nonzero-c choices (ties to the
    lower index);  per_slot[t, u] = sum_j c[t, j] [idx[t, j] is slot u of t's tile];  missed[t, j] = c[t, j]
    where idx[t, j] is none of them, else 0

and, for the miss kernels after it, the list of tokens with a miss that missed_add walks (missed_token_list),
written here so that no launch of its own builds it.

Why: in XLA this is a dozen small kernels (the votes' scatter-add, a top-k sort over [tiles, N], the slots'
scatter and gather, a one-hot product, index building): ~15 us at 16384 tokens (bench/NOTES.md). Here one
program per tile loads its tokens' choices once, counts the votes in registers (up to 256 adapters each adapter's,
the choices against the adapters; beyond, each choice's, the choices against each other, independent of N), picks
the slots by U rounds of max and writes its tokens' coefficients. A first form that counted over N in steps of 16
tokens, reading the choices again in each, took 18 us: its steps waited on memory one after another.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.block_sizes import check_num_warps
from meteora_jax.pallas.missed_add import missed_token_list
from meteora_jax.pallas.routed_gemm import LANE


def slot_count(rank: int) -> int:
    """Adapters per tile that the GEMM's one extra 64-column step holds (at least one)."""
    return max(1, LANE // rank)  # tile_shrink's column layout


def tile_slots(indices, num_adapters: int, tile_tokens: int, slots: int, counted=None):
    """(adapters [tiles, U]: each tile's U most chosen adapters, ties to the lower index; slot [T, K]: the slot
    holding each choice, U where its adapter missed its tile's slots).

    Only choices where `counted` [T, K] (default all) is true vote, so padding tokens take no slot. Slots past
    the tile's distinct voted adapters hold adapter 0 and take no choice."""
    t = indices.shape[0]
    tiles = t // tile_tokens
    tile_of_token = jnp.arange(t) // tile_tokens
    votes = jnp.ones(indices.shape, jnp.int32) if counted is None else counted.astype(jnp.int32)
    counts = jnp.zeros((tiles, num_adapters), jnp.int32).at[tile_of_token[:, None], indices].add(votes)
    kept = min(slots, num_adapters)
    most, adapters = jax.lax.top_k(counts, kept)
    voted = most > 0
    place = jnp.full((tiles, num_adapters), slots, jnp.int32).at[
        jnp.arange(tiles)[:, None], jnp.where(voted, adapters, num_adapters)].set(
        jnp.arange(kept, dtype=jnp.int32), mode="drop")
    slot = place[tile_of_token[:, None], indices]
    adapters = jnp.where(voted, adapters, 0).astype(jnp.int32)
    return jnp.pad(adapters, ((0, 0), (0, slots - kept))), slot


def slot_coefficients(coef, slot, slots: int):
    """Each token's coefficient per slot [T, U] from its choices' coefficients and slots [T, K]; a choice in slot U
    (missed) adds nothing. Selected, not multiplied by a one-hot: an infinite coefficient stays out of the slots it
    is not in (inf x 0 would be NaN there)."""
    return jnp.sum(jnp.where(slot[..., None] == jnp.arange(slots), coef[..., None], 0.0), axis=1)


class TileRouting(NamedTuple):
    adapters: jax.Array  # [tiles, U] int32
    per_slot: jax.Array  # [T, U] float32
    missed: jax.Array  # [T, K] float32
    tile_misses: jax.Array  # [tiles] int32: missed_token_list's per_tile
    missed_tokens: jax.Array  # [T] int32: its tokens


def route_tiles_reference(indices, weights, scaling, *, tile_tokens: int, slots: int) -> TileRouting:
    """The routing in plain JAX, float32."""
    per_choice = weights.astype(jnp.float32) * scaling.astype(jnp.float32)[indices]
    adapters, slot = tile_slots(indices, scaling.shape[0], tile_tokens, slots, counted=per_choice != 0)
    missed = jnp.where(slot < slots, 0, per_choice)
    return TileRouting(adapters, slot_coefficients(per_choice, slot, slots), missed,
                       *missed_token_list(missed, tile_tokens))


# Up to this many adapters (rounded up to a power of two) a program counts each adapter's votes, comparing the tile's
# choices with every adapter: 4.5 us at N = 256, where counting each choice's votes pairwise among the tile's choices
# took 6.8; at N = 1024 the per-adapter count took 13.6 and the pairwise one, independent of N, 6.9 (bench/NOTES.md).
MAX_ADAPTER_VOTE_LANES = 256
# The pairwise count compares this many voters at a time: 16 took 11.6-11.8 us, 32 6.4-6.8, 64 8.9-9.4 and all 256
# at once 8.4-9.0 (H100, 128-token tiles, top-2; bench/NOTES.md).
VOTER_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class TileRoutingBlockSizes:
    """num_warps per program (one program per tile); None: 4 where it counts votes per adapter (4.5 us at N = 256,
    8 warps 10.9, 16 9.1), 8 where it counts them pairwise (6.4-6.8 us, 4 warps 7.8-8.4, 16 6.9-7.1; bench/NOTES.md)."""

    num_warps: int | None = None

    def check(self) -> None:
        check_num_warps(self, ("num_warps",))

    def warps(self, num_adapters: int) -> int:
        if self.num_warps is not None:
            return self.num_warps
        return 4 if counts_per_adapter(num_adapters) else 8


def counts_per_adapter(num_adapters: int) -> bool:
    """Whether the kernel counts votes per adapter (else per choice, pairwise)."""
    return pl.next_power_of_2(num_adapters) <= MAX_ADAPTER_VOTE_LANES


def _kernel(idx_ref, weight_ref, scaling_ref, idx_flat_ref, weight_flat_ref, adapters_ref, per_slot_ref, missed_ref,
            tile_misses_ref, missed_tokens_ref, *, tile_tokens, top_k, num_adapters, slots):
    tile = pl.program_id(0)
    block = jnp.arange(max(pl.next_power_of_2(tile_tokens), 16))  # Triton's blocks: powers of two
    inside = block < tile_tokens
    rows = tile * tile_tokens + block
    columns = [jnp.full_like(rows, j) for j in range(top_k)]
    adapter = [plt.load(idx_ref.at[rows, column], mask=inside, other=0) for column in columns]
    # Rows past the tile: no coefficient, no vote, no miss (0 x an infinite scaling would be NaN, which counts).
    coef = [jnp.where(inside, plt.load(weight_ref.at[rows, column], mask=inside, other=0) * plt.load(scaling_ref.at[a]),
                      0.0) for column, a in zip(columns, adapter)]
    lanes = pl.next_power_of_2(num_adapters)
    if counts_per_adapter(num_adapters):
        votes, candidates = _votes_per_adapter(adapter, coef, lanes)
    else:
        votes = _votes_per_choice(adapter, idx_flat_ref, weight_flat_ref, scaling_ref, tile, tile_tokens, top_k)
        candidates = adapter
    # The key orders adapters by votes, then by lower index: the ties of lax.top_k over the counts.
    keys = [jnp.where(v > 0, v * lanes + (lanes - 1 - a), -1) for a, v in zip(candidates, votes)]
    held = [jnp.zeros(rows.shape, jnp.bool_) for _ in range(top_k)]
    for slot in range(slots):
        best = functools.reduce(jnp.maximum, [jnp.max(k) for k in keys])
        voted = best >= 0
        chosen = jnp.where(voted, lanes - 1 - best % lanes, 0).astype(jnp.int32)
        adapters_ref[tile, slot] = chosen
        hits = [(a == chosen) & voted for a in adapter]
        share = functools.reduce(jnp.add, [jnp.where(hit, c, 0.0) for hit, c in zip(hits, coef)])
        plt.store(per_slot_ref.at[rows, jnp.full_like(rows, slot)], share, mask=inside)
        held = [h | hit for h, hit in zip(held, hits)]
        keys = [jnp.where(a == chosen, -1, k) for a, k in zip(candidates, keys)]
    for column, c, h in zip(columns, coef, held):
        plt.store(missed_ref.at[rows, column], jnp.where(h, 0.0, c), mask=inside)
    # The tile's tokens with a miss first, then the others, each part in order (missed_token_list).
    missing = functools.reduce(jnp.logical_or, [~h & (c != 0) for h, c in zip(held, coef)]).astype(jnp.int32)
    count = jnp.sum(missing)
    tile_misses_ref[tile] = count
    before = jnp.cumsum(missing) - missing
    position = jnp.where(missing > 0, before, count + block - before)
    plt.store(missed_tokens_ref.at[tile * tile_tokens + position], rows, mask=inside)

def _votes_per_adapter(adapter, coef, lanes):
    """([votes of every adapter], [the adapters]) in one vector of lanes: each column's choices that count (a
    nonzero coefficient) compared with the adapters and summed over the tile's rows."""
    candidates = jnp.arange(lanes)
    voters = [jnp.where(c != 0, a, -1) for a, c in zip(adapter, coef)]
    votes = functools.reduce(jnp.add, [jnp.sum((v[:, None] == candidates[None, :]).astype(jnp.int32), axis=0)
                                       for v in voters])
    return [votes], [candidates]


def _votes_per_choice(adapter, idx_flat_ref, weight_flat_ref, scaling_ref, tile, tile_tokens, top_k):
    """Each choice's votes: how many counted choices of the tile name its adapter (pairwise, not over N), against
    the tile's choices as one flat vector (row-major [T, K]), -1 where a choice takes no vote, VOTER_CHUNK voters
    at a time: one [rows, rows K] comparison per column took 8.4-9.0 us, in chunks 6.4-6.8 (bench/NOTES.md)."""
    flat_size = max(pl.next_power_of_2(tile_tokens * top_k), 16)
    chunk = min(VOTER_CHUNK, flat_size)
    counts = [jnp.zeros(a.shape, jnp.int32) for a in adapter]
    for start in range(0, flat_size, chunk):
        flat = start + jnp.arange(chunk)
        position = tile * tile_tokens * top_k + flat
        voting = flat < tile_tokens * top_k
        choice = plt.load(idx_flat_ref.at[position], mask=voting, other=0)
        weight = plt.load(weight_flat_ref.at[position], mask=voting, other=0)
        voters = jnp.where(voting & (weight * plt.load(scaling_ref.at[choice]) != 0), choice, -1)[None, :]
        counts = [c + jnp.sum((a[:, None] == voters).astype(jnp.int32), axis=1) for c, a in zip(counts, adapter)]
    return counts


def route_tiles(indices, weights, scaling, *, tile_tokens: int, slots: int,
                blocks: TileRoutingBlockSizes = TileRoutingBlockSizes(), interpret: bool = False):
    """route_tiles_reference's TileRouting from one kernel; T a multiple of tile_tokens, indices in [0, N) for
    scaling [N]. Differentiable in weights and scaling (through the reference's per_slot and missed)."""
    blocks.check()
    t, k = indices.shape
    if weights.shape != (t, k) or scaling.ndim != 1 or t % tile_tokens:
        raise ValueError(f"indices {indices.shape} and weights {weights.shape} must match, scaling {scaling.shape} be "
                         f"[N], and the tokens tile by {tile_tokens}")
    return _differentiable(indices.astype(jnp.int32), weights.astype(jnp.float32), scaling.astype(jnp.float32),
                           tile_tokens, slots, blocks, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _differentiable(indices, weights, scaling, tile_tokens, slots, blocks, interpret):
    return _call(indices, weights, scaling, tile_tokens, slots, blocks, interpret)


def _forward(indices, weights, scaling, tile_tokens, slots, blocks, interpret):
    return _call(indices, weights, scaling, tile_tokens, slots, blocks, interpret), (indices, weights, scaling)


def _backward(tile_tokens, slots, blocks, interpret, residuals, cotangents):
    indices, weights, scaling = residuals
    dper_slot, dmissed = cotangents.per_slot, cotangents.missed

    def coefficients(weights, scaling):
        routing = route_tiles_reference(indices, weights, scaling, tile_tokens=tile_tokens, slots=slots)
        return routing.per_slot, routing.missed

    _, vjp = jax.vjp(coefficients, weights, scaling)
    return (None, *vjp((dper_slot, dmissed)))


_differentiable.defvjp(_forward, _backward)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _call(indices, weights, scaling, tile_tokens, slots, blocks, interpret):
    t, k = indices.shape
    tiles = t // tile_tokens
    kernel = functools.partial(_kernel, tile_tokens=tile_tokens, top_k=k, num_adapters=scaling.shape[0], slots=slots)
    return TileRouting(*pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((tiles, slots), jnp.int32), jax.ShapeDtypeStruct((t, slots), jnp.float32),
                   jax.ShapeDtypeStruct((t, k), jnp.float32), jax.ShapeDtypeStruct((tiles,), jnp.int32),
                   jax.ShapeDtypeStruct((t,), jnp.int32)),
        grid=(tiles,),
        compiler_params=plt.CompilerParams(num_warps=blocks.warps(scaling.shape[0])),
        interpret=interpret,
        name="meteora_route_tiles",
    )(indices, weights, scaling, indices.reshape(-1), weights.reshape(-1)))
