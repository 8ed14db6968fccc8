"""The `fused` strategy's remainder: y += the choices that missed their tile's adapter slots, in place.

A token tile spanning more adapters than the routed GEMM's slots leaves some (token, choice) pairs out. They are
added per token (BGMV style) in two passes: a shrink pass, h = c x A for each missed pair, and an expand pass,
y += h B, whose programs each take one span of the outputs. Both walk a list of the tokens with a miss, which the
routing kernel writes per tile (each tile's count, and its tokens with a miss first): program p of P takes the
list's entries p, p + P, p + 2P, ..., so a call where nothing missed costs each program one read of the counts,
and the work is spread evenly however the misses cluster. No branch in XLA (an XLA conditional would wait on the
host for its predicate in every layer). Two passes because one program per missed token, shrinking and then
expanding over every output in a loop, waited on memory once per step: ~20 us for a lone miss (bench/NOTES.md).
Each token is one program's per pass, each output span one program's: no two programs write the same element.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.block_sizes import check_powers_of_two
from meteora_jax.pallas.lora_gather import lora_gather_reference


@dataclasses.dataclass(frozen=True)
class MissedAddBlockSizes:
    """programs: the shrink pass's programs, sharing the listed tokens (program p takes every programs-th entry
    from p); block_in: input features per shrink step. expand_programs x (outputs / span_out): the expand pass's
    grid, its programs sharing the entries the same way, each over span_out outputs in block_out steps.
    num_warps: both passes'."""

    # bench/missed_add_tuning.py over the list (session 13), N = 256, T = 16384: nothing missed 3.4 us (1024 x
    # 1024 programs: 6.6), 0.06% missed 15.2 (16.6), a random gate (88% missed) 1481 (1238); N = 1024, T = 4096
    # alike. The random gate's choices would rather go to an XLA strategy anyway.
    programs: int = 256
    block_in: int = 1024
    expand_programs: int = 128
    span_out: int = 1024
    block_out: int = 256
    num_warps: int = 4

    def check(self) -> None:
        check_powers_of_two(self, ("block_in", "span_out", "block_out"))
        if self.programs < 1 or self.expand_programs < 1:
            raise ValueError(f"programs={self.programs} and expand_programs={self.expand_programs} must be >= 1")
        if self.span_out % self.block_out:
            raise ValueError(f"span_out={self.span_out} must be a multiple of block_out={self.block_out}")


def missed_add_reference(x, lora_a, lora_b, indices, coef, y):
    """y + sum_j coef[t, j] (x[t] A[idx[t, j]]) B[idx[t, j]] in float32, cast to y's dtype."""
    return (y.astype(jnp.float32) + lora_gather_reference(x, lora_a, lora_b, indices, coef)).astype(y.dtype)


def _shrink_kernel(per_tile_ref, tokens_ref, idx_ref, coef_ref, x_ref, a_ref, h_ref, *, top_k, tiles, tile_tokens,
                   in_features, rank, rank_block, blocks: MissedAddBlockSizes):
    ranks = jnp.arange(rank_block)

    def one_choice(t, j):
        adapter = idx_ref[t, j]

        def step(s, h):
            start = s * blocks.block_in
            x = x_ref[t, pl.ds(start, blocks.block_in)]
            a = plt.load(a_ref.at[adapter, pl.ds(start, blocks.block_in), pl.ds(0, rank_block)],
                         mask=ranks[None, :] < rank, other=0)
            return h + jnp.sum(x.astype(jnp.float32)[:, None] * a.astype(jnp.float32), axis=0)

        h_ref[t, j, :] = coef_ref[t, j] * jax.lax.fori_loop(0, in_features // blocks.block_in, step,
                                                            jnp.zeros((rank_block,), jnp.float32))

    walk_listed_choices(per_tile_ref, tokens_ref, coef_ref, one_choice, programs=blocks.programs, tiles=tiles,
                        tile_tokens=tile_tokens, top_k=top_k)


def _expand_kernel(per_tile_ref, tokens_ref, idx_ref, coef_ref, h_ref, b_ref, y_ref, out_ref, *, top_k, tiles,
                   tile_tokens, rank, rank_block, blocks: MissedAddBlockSizes):
    del y_ref  # aliased to out_ref
    span = pl.program_id(1)
    ranks = jnp.arange(rank_block)

    def one_choice(t, j):
        adapter = idx_ref[t, j]
        h = h_ref[t, j, :]

        def step(s, carry):
            start = span * blocks.span_out + s * blocks.block_out
            b = plt.load(b_ref.at[adapter, pl.ds(0, rank_block), pl.ds(start, blocks.block_out)],
                         mask=ranks[:, None] < rank, other=0)
            row = out_ref.at[t, pl.ds(start, blocks.block_out)]
            row[...] = (row[...].astype(jnp.float32) + jnp.sum(h[:, None] * b.astype(jnp.float32), axis=0)).astype(
                out_ref.dtype)
            return carry

        jax.lax.fori_loop(0, blocks.span_out // blocks.block_out, step, 0)

    walk_listed_choices(per_tile_ref, tokens_ref, coef_ref, one_choice, programs=blocks.expand_programs,
                        tiles=tiles, tile_tokens=tile_tokens, top_k=top_k)


def missed_token_list(coef, tile_tokens: int):
    """(per_tile [T // tile_tokens]: each tile's tokens with a nonzero coef [T, K]; tokens [T]: each tile's token
    indices, those with a nonzero coef first, each part in order), as the routing kernel writes them."""
    t = coef.shape[0]
    missed = jnp.any(coef != 0, axis=1).reshape(t // tile_tokens, tile_tokens)
    order = jnp.argsort(~missed, axis=1, stable=True) + jnp.arange(0, t, tile_tokens)[:, None]
    return jnp.sum(missed, axis=1, dtype=jnp.int32), order.reshape(t).astype(jnp.int32)


def walk_listed_choices(per_tile_ref, tokens_ref, coef_ref, one_choice, *, programs: int, tiles: int,
                        tile_tokens: int, top_k: int):
    """Calls one_choice(t, j) for every choice j with a nonzero coefficient of the listed tokens t that are this
    program's: the list's entries program id, + programs, + 2 programs, ... (see missed_token_list)."""
    lanes = max(pl.next_power_of_2(tiles), 16)
    tile = jnp.arange(lanes)
    counts = plt.load(per_tile_ref.at[tile], mask=tile < tiles, other=0)
    ends = jnp.cumsum(counts)
    total = jnp.sum(counts)

    def next_entry(entry):
        owner = jnp.sum((ends <= entry).astype(jnp.int32))
        first = jnp.sum(jnp.where(tile == owner, ends - counts, 0))
        t = tokens_ref[owner * tile_tokens + entry - first]
        for j in range(top_k):
            pl.when(coef_ref[t, j] != 0)(functools.partial(one_choice, t, j))
        return entry + programs

    jax.lax.while_loop(lambda entry: entry < total, next_entry, pl.program_id(0))


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def missed_add(x, lora_a, lora_b, indices, coef, y, listed=None, *,
               blocks: MissedAddBlockSizes = MissedAddBlockSizes(), interpret: bool = False):
    """y + the pairs with nonzero coef [T, K] (see missed_add_reference), in y's dtype. listed: (per_tile, tokens)
    as missed_token_list gives them for some tile that divides T (the routing kernel's); None: built here, with
    the tokens as one tile. I must tile by block_in, O by span_out; indices must lie in [0, N). Forward only: its
    gradients are in pair_grads.py."""
    blocks.check()
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    if y.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t:
        raise ValueError(f"shape mismatch: x {x.shape}, y {y.shape}, indices {indices.shape}, coef {coef.shape}")
    if i % blocks.block_in or o % blocks.span_out:
        raise ValueError(f"x {x.shape} -> y {y.shape} does not tile by {blocks.block_in} inputs and "
                         f"spans of {blocks.span_out} outputs")
    per_tile, tokens = missed_token_list(coef, t) if listed is None else listed
    tiles = per_tile.shape[0]
    if tokens.shape != (t,) or tiles < 1 or t % tiles:
        raise ValueError(f"the list of missed tokens, per_tile {per_tile.shape} and tokens {tokens.shape}, must "
                         f"count whole tiles of the {t} tokens and list each once")
    top_k = indices.shape[1]
    rank_block = max(pl.next_power_of_2(r), 16)
    listed = (per_tile.astype(jnp.int32), tokens.astype(jnp.int32))
    indices, coef = indices.astype(jnp.int32), coef.astype(jnp.float32)
    params = plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2)
    shared = dict(top_k=top_k, tiles=tiles, tile_tokens=t // tiles, rank=r, rank_block=rank_block, blocks=blocks)

    h = pl.pallas_call(
        functools.partial(_shrink_kernel, in_features=i, **shared),
        out_shape=jax.ShapeDtypeStruct((t, top_k, rank_block), jnp.float32),  # written at the missed pairs only
        grid=(blocks.programs,),
        compiler_params=params,
        interpret=interpret,
        name="meteora_missed_shrink",
    )(*listed, indices, coef, x, lora_a)

    return pl.pallas_call(
        functools.partial(_expand_kernel, **shared),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(blocks.expand_programs, o // blocks.span_out),
        input_output_aliases={6: 0},
        compiler_params=params,
        interpret=interpret,
        name="meteora_missed_add",
    )(*listed, indices, coef, h, lora_b, y)
