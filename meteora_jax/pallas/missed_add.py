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
    num_warps: both passes'. The gradients' kernels (pair_grads.py) take programs, block_in, block_out and
    num_warps too; the defaults were tuned for the passes."""

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


def shrink_missed_choice(t, j, idx_ref, coef_ref, x_ref, a_ref, h_ref, *, in_features, rank, rank_block,
                         block_in):
    """h[t, j] = coef[t, j] x[t] A[idx[t, j]] over every input feature, in float32 (the shrink pass's work for one
    missed pair; tile_shrink does it too, in its own launch)."""
    ranks = jnp.arange(rank_block)
    adapter = idx_ref[t, j]

    def step(s, h):
        start = s * block_in
        x = x_ref[t, pl.ds(start, block_in)]
        a = plt.load(a_ref.at[adapter, pl.ds(start, block_in), pl.ds(0, rank_block)], mask=ranks[None, :] < rank,
                     other=0)
        return h + jnp.sum(x.astype(jnp.float32)[:, None] * a.astype(jnp.float32), axis=0)

    h_ref[t, j, :] = coef_ref[t, j] * jax.lax.fori_loop(0, in_features // block_in, step,
                                                        jnp.zeros((rank_block,), jnp.float32))


def _shrink_kernel(per_tile_ref, tokens_ref, idx_ref, coef_ref, x_ref, a_ref, h_ref, *, top_k, tiles, tile_tokens,
                   in_features, rank, rank_block, blocks: MissedAddBlockSizes):
    one_choice = functools.partial(shrink_missed_choice, idx_ref=idx_ref, coef_ref=coef_ref, x_ref=x_ref,
                                   a_ref=a_ref, h_ref=h_ref, in_features=in_features, rank=rank,
                                   rank_block=rank_block, block_in=blocks.block_in)
    walk_listed_choices(listed_counts(per_tile_ref, tiles), tokens_ref, coef_ref, one_choice, first=pl.program_id(0),
                        programs=blocks.programs, tile_tokens=tile_tokens, top_k=top_k)


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

    walk_listed_choices(listed_counts(per_tile_ref, tiles), tokens_ref, coef_ref, one_choice, first=pl.program_id(0),
                        programs=blocks.expand_programs, tile_tokens=tile_tokens, top_k=top_k)


def missed_token_list(coef, tile_tokens: int):
    """(per_tile [T // tile_tokens]: each tile's tokens with a nonzero coef [T, K]; tokens [T]: each tile's token
    indices, those with a nonzero coef first, each part in order), as the routing kernel writes them."""
    t = coef.shape[0]
    missed = jnp.any(coef != 0, axis=1).reshape(t // tile_tokens, tile_tokens)
    order = jnp.argsort(~missed, axis=1, stable=True) + jnp.arange(0, t, tile_tokens)[:, None]
    return jnp.sum(missed, axis=1, dtype=jnp.int32), order.reshape(t).astype(jnp.int32)


def listed_counts(per_tile_ref, tiles: int):
    """The list's per-tile counts (missed_token_list's per_tile) as a vector of at least 16 lanes, zero past the
    tiles: walk_listed_choices' first operand. Loaded apart from the walk so that a kernel with other work can
    issue it first and find it there when it walks."""
    lanes = max(pl.next_power_of_2(tiles), 16)
    tile = jnp.arange(lanes)
    return plt.load(per_tile_ref.at[tile], mask=tile < tiles, other=0)


def walk_listed_choices(counts, tokens_ref, coef_ref, one_choice, *, first, programs, tile_tokens: int, top_k: int):
    """Calls one_choice(t, j) for every choice j with a nonzero coefficient of the listed tokens t that are this
    program's: the list's entries first, first + programs, first + 2 programs, ... (see missed_token_list)."""
    tile = jnp.arange(counts.shape[0])
    ends = jnp.cumsum(counts)
    total = jnp.sum(counts)

    def next_entry(entry):
        owner = jnp.sum((ends <= entry).astype(jnp.int32))
        first = jnp.sum(jnp.where(tile == owner, ends - counts, 0))
        t = tokens_ref[owner * tile_tokens + entry - first]
        for j in range(top_k):
            pl.when(coef_ref[t, j] != 0)(functools.partial(one_choice, t, j))
        return entry + programs

    jax.lax.while_loop(lambda entry: entry < total, next_entry, first)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def missed_add(x, lora_a, lora_b, indices, coef, y, listed=None, *,
               blocks: MissedAddBlockSizes = MissedAddBlockSizes(), interpret: bool = False):
    """y + the pairs with nonzero coef [T, K] (see missed_add_reference), in y's dtype. listed: (per_tile, tokens)
    as missed_token_list gives them for some tile that divides T (the routing kernel's); None: built here, with
    the tokens as one tile. I must tile by block_in, O by span_out; indices must lie in [0, N). Forward only: its
    gradients are in pair_grads.py."""
    check_missed_operands(x, lora_a, lora_b, indices, coef, y, blocks)
    listed = check_listed(listed, coef)
    indices, coef = indices.astype(jnp.int32), coef.astype(jnp.float32)
    r = lora_a.shape[-1]
    h = pl.pallas_call(
        functools.partial(_shrink_kernel, in_features=x.shape[1], **walk_params(r, indices, listed, blocks)),
        out_shape=jax.ShapeDtypeStruct(missed_shrink_shape(indices, r), jnp.float32),
        grid=(blocks.programs,),
        compiler_params=compiler_params(blocks),
        interpret=interpret,
        name="meteora_missed_shrink",
    )(*listed, indices, coef, x, lora_a)
    return missed_expand_add(lora_b, indices, coef, h, y, listed, blocks=blocks, interpret=interpret)


def missed_expand_add(lora_b, indices, coef, h, y, listed, *, blocks: MissedAddBlockSizes, interpret: bool):
    """The expand pass alone: y + h[t, j] B[idx[t, j]] for the listed pairs with nonzero coef, h as the shrink
    pass writes it (shrink_missed_choice, at those pairs only). Operands as checked by missed_add."""
    r = lora_b.shape[1]
    if h.shape != missed_shrink_shape(indices, r):
        raise ValueError(f"h {h.shape} must be {missed_shrink_shape(indices, r)} for indices {indices.shape} at "
                         f"rank {r}")
    return pl.pallas_call(
        functools.partial(_expand_kernel, **walk_params(r, indices, listed, blocks)),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(blocks.expand_programs, y.shape[1] // blocks.span_out),
        input_output_aliases={6: 0},
        compiler_params=compiler_params(blocks),
        interpret=interpret,
        name="meteora_missed_add",
    )(*listed, indices.astype(jnp.int32), coef.astype(jnp.float32), h, lora_b, y)


def check_missed_operands(x, lora_a, lora_b, indices, coef, y, blocks: MissedAddBlockSizes) -> None:
    """Readable errors for operands the two passes cannot tile."""
    blocks.check()
    t, i = x.shape
    o = lora_b.shape[-1]
    if y.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t:
        raise ValueError(f"shape mismatch: x {x.shape}, y {y.shape}, indices {indices.shape}, coef {coef.shape}")
    if i % blocks.block_in or o % blocks.span_out:
        raise ValueError(f"x {x.shape} -> y {y.shape} does not tile by {blocks.block_in} inputs and "
                         f"spans of {blocks.span_out} outputs")


def check_listed(listed, coef):
    """The list of missed tokens (per_tile, tokens) as int32, once it is checked to count whole tiles of coef's
    [T, K] tokens; None: built from coef with the tokens as one tile."""
    tokens = coef.shape[0]
    per_tile, listed_tokens = missed_token_list(coef, tokens) if listed is None else listed
    tiles = per_tile.shape[0]
    if listed_tokens.shape != (tokens,) or tiles < 1 or tokens % tiles:
        raise ValueError(f"the list of missed tokens, per_tile {per_tile.shape} and tokens {listed_tokens.shape}, "
                         f"must count whole tiles of the {tokens} tokens and list each once")
    return per_tile.astype(jnp.int32), listed_tokens.astype(jnp.int32)


def missed_shrink_shape(indices, rank: int) -> tuple[int, int, int]:
    """The shrink pass's h: [T, K, rank lanes] float32, written at the missed pairs only."""
    return (*indices.shape, missed_rank_lanes(rank))


def missed_rank_lanes(rank: int) -> int:
    return max(pl.next_power_of_2(rank), 16)


def walk_params(rank: int, indices, listed, blocks: MissedAddBlockSizes, rank_block: int | None = None):
    """The static parameters of a kernel that walks the list (walk_listed_choices) over [T, K] indices, its rank
    lanes missed_rank_lanes(rank) unless given."""
    t, top_k = indices.shape
    tiles = listed[0].shape[0]
    return dict(top_k=top_k, tiles=tiles, tile_tokens=t // tiles, rank=rank,
                rank_block=missed_rank_lanes(rank) if rank_block is None else rank_block, blocks=blocks)


def compiler_params(blocks: MissedAddBlockSizes):
    return plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2)
