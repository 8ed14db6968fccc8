"""The routed shrink of the `fused` strategy: h = x A per token for the adapters of its tile's slots, scaled.

h[t, u r + j] = coef[t, u] * (x[t] @ A[adapters[tile(t), u]])[:, j]: 64 columns, U = 64 // r slots, zero past
U r. Programs per block of tokens and share of the input features read x once and the slots' A as one
[block_in, U, r] gather per step, so one tensor-core dot per step serves every slot (XLA's form gathers A for
every tile into memory first), and scale by the coefficients before they write h.

`tile_shrink_with_misses` also runs the miss path's shrink pass (missed_add.py) in the same launch: after its
block, each program walks its share of the routing kernel's list of tokens with a miss. Where nothing misses,
as under trained gates, that pass then costs no launch of its own (bench/NOTES.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.block_sizes import check_powers_of_two, is_tile_size
from meteora_jax.pallas.missed_add import (
    listed_counts,
    missed_rank_lanes,
    missed_shrink_shape,
    shrink_missed_choice,
    walk_listed_choices,
)
from meteora_jax.pallas.routed_gemm import LANE as COLUMNS  # h's width: the routed GEMM's extra step

# Programs to aim for: the sweeps' best split counts (1 at 16384 tokens, 4 at 4096, 128-token blocks) give 128
# programs, about one per multiprocessor of an H100 (bench/NOTES.md).
TARGET_PROGRAMS = 128
MAX_SPLITS = 4


@dataclasses.dataclass(frozen=True)
class TileShrinkBlockSizes:
    """block_tokens x block_in: one program step's x tile, over num_warps warps; num_stages: steps whose loads are
    in flight at once (Triton's software pipelining). H100 sweeps: bench/NOTES.md. block_tokens must divide the
    routing tile (fused_linear takes the largest power of two up to 128 that does)."""

    block_tokens: int = 128
    block_in: int = 128
    num_warps: int = 4
    num_stages: int = 3
    # Programs per block of tokens, each over its share of the input features: more, shorter programs fill the
    # GPU where tokens are few, but past one split their float32 shares are added by XLA. None: enough splits for
    # about TARGET_PROGRAMS programs (split_count).
    splits: int | None = None

    def check(self, tile_tokens: int) -> None:
        check_powers_of_two(self, ("block_tokens", "block_in"))
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits={self.splits} must be >= 1")
        if tile_tokens % self.block_tokens:
            raise ValueError(f"block_tokens={self.block_tokens} must divide the routing tile of {tile_tokens} tokens")

    def split_count(self, tokens: int, in_features: int) -> int:
        """splits, else about TARGET_PROGRAMS programs (at most MAX_SPLITS, and no more than the input steps)."""
        if self.splits is not None:
            return self.splits
        enough = TARGET_PROGRAMS // max(1, tokens // self.block_tokens)
        return max(1, min(MAX_SPLITS, enough, pl.cdiv(in_features, self.block_in)))


class MissedChoices(NamedTuple):
    """The choices that missed their tile's slots, as tile_routing gives them: the miss pass's operands."""

    indices: jax.Array  # [T, K] int32
    coef: jax.Array  # [T, K] float32, nonzero at the missed pairs only
    per_tile: jax.Array  # [tiles] int32: each routing tile's tokens with a miss (missed_token_list)
    tokens: jax.Array  # [T] int32: the tokens, those with a miss first in each tile


def tile_shrink_reference(x, lora_a, adapters, coef):
    """Plain-JAX form in float32: x [T, I], lora_a [N, I, r], adapters [tiles, U], coef [T, U] -> [T, 64]."""
    tiles, slots = adapters.shape
    t, i = x.shape
    r = lora_a.shape[-1]
    h = jnp.einsum("GTI,GUIR->GTUR", x.reshape(tiles, t // tiles, i).astype(jnp.float32),
                   lora_a[adapters].astype(jnp.float32))
    h = h.reshape(t, slots, r) * coef[:, :, None]
    return jnp.pad(h.reshape(t, slots * r), ((0, 0), (0, COLUMNS - slots * r)))


def _kernel(adapters_ref, coef_ref, x_ref, a_ref, *refs, in_features, rank, slots, tile_tokens, steps, splits,
            blocks: TileShrinkBlockSizes, missed_block_in):
    if missed_block_in is None:
        (out_ref,) = refs
    else:
        per_tile_ref, tokens_ref, idx_ref, missed_ref, adapters_a_ref, out_ref, h_missed_ref = refs
        # Read before the block's steps, so that the walk after them does not wait on this load.
        counts = listed_counts(per_tile_ref, per_tile_ref.shape[0])
    first = pl.program_id(0) * blocks.block_tokens
    split = pl.program_id(1)
    tile = first // tile_tokens
    # A step's A as [inputs, slots, rank] (both padded to powers of two): the slots' adapters broadcast along the
    # other two axes, so Triton sees each slot's row of r elements as contiguous and loads it in 16-byte pieces.
    # Gathered as [inputs, 64] columns, each element's adapter was a loaded value of its own, and the loads went
    # out 2 bytes at a time: 82 us at N = 256, T = 16384, where this gather with 3 steps' loads in flight and one
    # split takes 59 (bench/NOTES.md).
    slot_lanes, rank_lanes = pl.next_power_of_2(slots), pl.next_power_of_2(rank)
    slot = jnp.arange(slot_lanes)
    ranks = jnp.arange(rank_lanes)
    adapter = plt.load(adapters_ref.at[jnp.full((slot_lanes,), tile, jnp.int32), jnp.minimum(slot, slots - 1)])
    shape = (blocks.block_in, slot_lanes, rank_lanes)
    held = (slot < slots)[None, :, None] & (ranks < rank)[None, None, :]
    columns = jnp.broadcast_to((ranks if rank_lanes == rank else jnp.minimum(ranks, rank - 1))[None, None, :], shape)
    inputs = jnp.arange(blocks.block_in)

    ragged = splits * steps * blocks.block_in != in_features  # some step reads past the inputs

    def step(k, acc):
        start = (split * steps + k) * blocks.block_in
        valid = start + inputs < in_features
        x = plt.load(x_ref.at[pl.ds(first, blocks.block_tokens), pl.ds(start, blocks.block_in)],
                     mask=valid[None, :] if ragged else None, other=0 if ragged else None)
        rows = jnp.broadcast_to(adapter[None, :, None] * in_features + (start + inputs)[:, None, None], shape)
        a = plt.load(a_ref.at[rows, columns], mask=valid[:, None, None] & held, other=0)
        # h transposed, [lanes, tokens]: the gathered A (from registers) is the product's left operand and x its
        # right. As x @ A this kernel took 20.0 us against 17.5 at N = 256, T = 4096 (59.0 against 54.8 at
        # 16384; bench/NOTES.md).
        return acc + jnp.dot(a.reshape(blocks.block_in, slot_lanes * rank_lanes).T, x.T,
                             preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step,
                            jnp.zeros((slot_lanes * rank_lanes, blocks.block_tokens), jnp.float32)).T
    lane = jnp.arange(slot_lanes * rank_lanes)
    lane_slot = jnp.minimum(lane // rank_lanes, slots - 1)
    coef = plt.load(coef_ref.at[first + jnp.arange(blocks.block_tokens)[:, None], lane_slot[None, :]])
    # Padding lanes stay exact zeros, whatever the coefficients hold (an inf times 0 would be NaN).
    padding = (lane // rank_lanes >= slots) | (lane % rank_lanes >= rank)
    tokens = pl.ds(first, blocks.block_tokens)
    out = out_ref.at[tokens] if splits == 1 else out_ref.at[split, tokens]
    out[...] = jnp.where(padding[None, :], 0.0, acc * coef).astype(out_ref.dtype)
    if missed_block_in is not None:
        one_choice = functools.partial(shrink_missed_choice, idx_ref=idx_ref, coef_ref=missed_ref, x_ref=x_ref,
                                       a_ref=adapters_a_ref, h_ref=h_missed_ref, in_features=in_features, rank=rank,
                                       rank_block=missed_rank_lanes(rank), block_in=missed_block_in)
        walk_listed_choices(counts, tokens_ref, missed_ref, one_choice, first=pl.program_id(0) * splits + split,
                            programs=pl.num_programs(0) * splits, tile_tokens=tile_tokens, top_k=idx_ref.shape[1])


@functools.partial(jax.jit, static_argnames=("tile_tokens", "blocks", "interpret"))
def tile_shrink(x, lora_a, adapters, coef, *, tile_tokens: int,
                blocks: TileShrinkBlockSizes = TileShrinkBlockSizes(), interpret: bool = False):
    """h [T, 64] in x's dtype (see the module docstring). x [T, I] with T a multiple of tile_tokens, lora_a
    [N, I, r] with r <= 64, adapters [T // tile_tokens, 64 // r] in [0, N), coef [T, 64 // r] float32."""
    _check_shapes(x, lora_a, adapters, coef, tile_tokens, blocks)
    h, _ = _differentiable(x, lora_a, adapters.astype(jnp.int32), coef.astype(jnp.float32), None, tile_tokens,
                           blocks, None, interpret)
    return h


@functools.partial(jax.jit, static_argnames=("tile_tokens", "missed_block_in", "blocks", "interpret"))
def tile_shrink_with_misses(x, lora_a, adapters, coef, misses: MissedChoices, *, tile_tokens: int,
                            missed_block_in: int, blocks: TileShrinkBlockSizes = TileShrinkBlockSizes(),
                            interpret: bool = False):
    """(h as tile_shrink gives it, h_missed [T, K, lanes] float32: missed_add's shrink pass, c x A at the missed
    pairs, unwritten elsewhere, for missed_add.missed_expand_add), in one launch. The list counts tiles of
    tile_tokens; missed_block_in (the miss pass's input features per step) must be a power of two >= 16 that
    divides I. h_missed carries no gradient: the miss path's come from its pairs (pair_grads.py)."""
    _check_shapes(x, lora_a, adapters, coef, tile_tokens, blocks)
    t, i = x.shape
    if misses.indices.shape != misses.coef.shape or misses.indices.shape[0] != t or misses.tokens.shape != (t,) \
            or misses.per_tile.shape != (t // tile_tokens,):
        raise ValueError(f"the missed choices (indices {misses.indices.shape}, coef {misses.coef.shape}, per_tile "
                         f"{misses.per_tile.shape}, tokens {misses.tokens.shape}) must be [{t}, K], [{t}, K], "
                         f"[{t // tile_tokens}] and [{t}] for x {x.shape}")
    # The miss pass's steps load [missed_block_in, lanes] tiles, as MissedAddBlockSizes.block_in.
    if not is_tile_size(missed_block_in) or i % missed_block_in:
        raise ValueError(f"missed_block_in={missed_block_in} must be a power of two >= 16 that divides the {i} "
                         "input features")
    misses = MissedChoices(misses.indices.astype(jnp.int32), misses.coef.astype(jnp.float32),
                           misses.per_tile.astype(jnp.int32), misses.tokens.astype(jnp.int32))
    h, h_missed = _differentiable(x, lora_a, adapters.astype(jnp.int32), coef.astype(jnp.float32), misses,
                                  tile_tokens, blocks, missed_block_in, interpret)
    return h, jax.lax.stop_gradient(h_missed)


def _check_shapes(x, lora_a, adapters, coef, tile_tokens: int, blocks: TileShrinkBlockSizes) -> None:
    blocks.check(tile_tokens)
    t, i = x.shape
    n, a_in, r = lora_a.shape
    slots = max(1, COLUMNS // r)
    if a_in != i or r > COLUMNS or t % tile_tokens:
        raise ValueError(f"shape mismatch: x {x.shape}, lora_a {lora_a.shape}, tile of {tile_tokens} tokens")
    if adapters.shape != (t // tile_tokens, slots) or coef.shape != (t, slots):
        raise ValueError(f"adapters {adapters.shape} must be [{t // tile_tokens}, {slots}] and coef {coef.shape} "
                         f"[{t}, {slots}]")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _differentiable(x, lora_a, adapters, coef, misses, tile_tokens, blocks, missed_block_in, interpret):
    return _call(x, lora_a, adapters, coef, misses, tile_tokens, blocks, missed_block_in, interpret)


def _forward(x, lora_a, adapters, coef, misses, tile_tokens, blocks, missed_block_in, interpret):
    out = _call(x, lora_a, adapters, coef, misses, tile_tokens, blocks, missed_block_in, interpret)
    return out, (x, lora_a, adapters, coef)


def _backward(tile_tokens, blocks, missed_block_in, interpret, residuals, cotangents):
    # The forward's precision, bfloat16 products with float32 sums, where differentiating the float32 reference
    # would keep a float32 copy of x and run float32 matmuls. h_missed's cotangent is dropped (see
    # tile_shrink_with_misses).
    x, lora_a, adapters, coef = residuals
    g = cotangents[0]
    tiles, slots = adapters.shape
    t, i = x.shape
    r = lora_a.shape[-1]
    x_tiles = x.reshape(tiles, t // tiles, i)
    a_slots = lora_a.astype(x.dtype)[adapters]  # [tiles, U, I, r]
    xa = jnp.einsum("GTI,GUIR->GTUR", x_tiles, a_slots, preferred_element_type=jnp.float32)
    g = g[:, : slots * r].astype(jnp.float32).reshape(tiles, t // tiles, slots, r)
    dcoef = jnp.sum(xa * g, axis=-1).reshape(t, slots)
    dxa = (g * coef.reshape(tiles, t // tiles, slots)[..., None]).astype(x.dtype)
    dx = jnp.einsum("GTUR,GUIR->GTI", dxa, a_slots, preferred_element_type=jnp.float32).reshape(t, i)
    da_slots = jnp.einsum("GTI,GTUR->GUIR", x_tiles, dxa, preferred_element_type=jnp.float32)
    da = jnp.zeros(lora_a.shape, jnp.float32).at[adapters].add(da_slots)
    return dx.astype(x.dtype), da.astype(lora_a.dtype), None, dcoef, None


_differentiable.defvjp(_forward, _backward)


def _call(x, lora_a, adapters, coef, misses, tile_tokens, blocks, missed_block_in, interpret):
    t, i = x.shape
    n, _, r = lora_a.shape
    slots = adapters.shape[1]
    splits = blocks.split_count(t, i)
    steps = pl.cdiv(pl.cdiv(i, blocks.block_in), splits)
    kernel = functools.partial(_kernel, in_features=i, rank=r, slots=slots, tile_tokens=tile_tokens, steps=steps,
                               splits=splits, blocks=blocks, missed_block_in=missed_block_in)
    # One split writes h itself; more write float32 shares that XLA adds.
    slot_lanes, rank_lanes = pl.next_power_of_2(slots), pl.next_power_of_2(r)
    shape = (t, slot_lanes * rank_lanes) if splits == 1 else (splits, t, slot_lanes * rank_lanes)
    out_shape = [jax.ShapeDtypeStruct(shape, x.dtype if splits == 1 else jnp.float32)]
    operands = [adapters, coef, x, lora_a.astype(x.dtype).reshape(n * i, r)]
    if misses is not None:
        out_shape.append(jax.ShapeDtypeStruct(missed_shrink_shape(misses.indices, r), jnp.float32))
        operands += [misses.per_tile, misses.tokens, misses.indices, misses.coef, lora_a]
    h, *h_missed = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(t // blocks.block_tokens, splits),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="meteora_tile_shrink",
    )(*operands)
    h_missed = h_missed[0] if h_missed else None
    h = h if splits == 1 else jnp.sum(h, axis=0).astype(x.dtype)
    if rank_lanes == r or slots == 1:  # lane u * rank_lanes + j is h's column u * r + j
        return h, h_missed
    h = h.reshape(t, slot_lanes, rank_lanes)[:, :slots, :r].reshape(t, slots * r)
    return jnp.pad(h, ((0, 0), (0, COLUMNS - slots * r))), h_missed
