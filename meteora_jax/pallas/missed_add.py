"""The `fused` strategy's remainder: y += the choices that missed their tile's adapter slots, in place.

A token tile spanning more adapters than the routed GEMM's slots leaves some (token, choice) pairs out. They are
added per token (BGMV style) in two passes: a shrink pass, h = c x A for each missed pair, and an expand pass,
y += h B, whose programs each take one span of the outputs. In both, program p of P owns tokens p, p + P, p + 2P,
... (misses cluster in tiles; interleaving spreads a tile's over the programs), reads its tokens' coefficients
with one vector load per choice, returns at once if none missed, else walks only the tokens that did. So a call
with few misses costs two short launches, with no branch in XLA (an XLA conditional would wait on the host for
its predicate in every layer) and no list of the missed tokens (XLA's cumulative sum and scatter for one took
longer than the kernel). Two passes because one program per missed token, shrinking and then expanding over every
output in a loop, waited on memory once per step: ~20 us for a lone miss (bench/NOTES.md). Each token is one
program's per pass, each output span one program's: no two programs write the same element.
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
    """programs: at most this many shrink programs share the tokens (program p takes every programs-th from p);
    block_in: input features per shrink step. expand_programs x (outputs / span_out): the expand pass's grid, its
    programs sharing the tokens the same way, each over span_out outputs in block_out steps. num_warps: both
    passes'."""

    # bench/missed_add_tuning.py: with 0.07% of the choices missing (N = 256, T = 16384) this took 17.4 us, the
    # one-pass kernel 27.5; at 23% missing 447 against 390, under a random gate 1257 against 1522. More
    # programs suit many misses (4096 x 4096: 347 us at 23%) but cost 29 us where few miss: each program that
    # finds nothing still costs its launch.
    programs: int = 1024
    block_in: int = 1024
    expand_programs: int = 1024
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


def _shrink_kernel(idx_ref, coef_ref, x_ref, a_ref, h_ref, *, top_k, tokens, in_features, rank, rank_block,
                   owned_block, blocks: MissedAddBlockSizes):
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

    walk_missed_choices(coef_ref, one_choice, programs=blocks.programs, tokens=tokens, top_k=top_k,
                        owned_block=owned_block)


def _expand_kernel(idx_ref, coef_ref, h_ref, b_ref, y_ref, out_ref, *, top_k, tokens, rank, rank_block, owned_block,
                   blocks: MissedAddBlockSizes):
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

    walk_missed_choices(coef_ref, one_choice, programs=blocks.expand_programs, tokens=tokens, top_k=top_k,
                        owned_block=owned_block)


def token_ownership(programs: int, tokens: int) -> tuple[int, int]:
    """(programs, at most one per token; owned_block: a power of two >= the tokens a program owns)."""
    programs = max(min(programs, tokens), 1)
    return programs, pl.next_power_of_2(pl.cdiv(tokens, programs))


def walk_missed_choices(coef_ref, one_choice, *, programs: int, tokens: int, top_k: int, owned_block: int):
    """Calls one_choice(t, j) for every choice j with a nonzero coefficient of every token t that this program
    owns (t = program id + a multiple of `programs`), token after token."""
    program = pl.program_id(0)
    owned = jnp.arange(owned_block)
    rows = program + owned * programs
    missed = sum(plt.load(coef_ref.at[rows, jnp.full_like(rows, j)], mask=rows < tokens, other=0) != 0
                 for j in range(top_k))

    def next_missed(left):
        first = jnp.min(jnp.where(left > 0, owned, owned_block))
        t = program + first * programs
        for j in range(top_k):
            pl.when(coef_ref[t, j] != 0)(functools.partial(one_choice, t, j))
        return jnp.where(owned == first, 0, left)

    # Only the owned tokens with a miss, one after the other: a scalar check per owned token would wait on
    # memory once per token.
    jax.lax.while_loop(lambda left: jnp.max(left) > 0, next_missed, missed.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def missed_add(x, lora_a, lora_b, indices, coef, y, *, blocks: MissedAddBlockSizes = MissedAddBlockSizes(),
               interpret: bool = False):
    """y + the pairs with nonzero coef [T, K] (see missed_add_reference), in y's dtype. I must tile by
    block_in, O by span_out; indices must lie in [0, N). Forward only: its gradients are in
    pair_grads.py."""
    blocks.check()
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    if y.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t:
        raise ValueError(f"shape mismatch: x {x.shape}, y {y.shape}, indices {indices.shape}, coef {coef.shape}")
    if i % blocks.block_in or o % blocks.span_out:
        raise ValueError(f"x {x.shape} -> y {y.shape} does not tile by {blocks.block_in} inputs and "
                         f"spans of {blocks.span_out} outputs")
    top_k = indices.shape[1]
    rank_block = max(pl.next_power_of_2(r), 16)
    indices, coef = indices.astype(jnp.int32), coef.astype(jnp.float32)
    params = plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2)

    programs, owned_block = token_ownership(blocks.programs, t)
    h = pl.pallas_call(
        functools.partial(_shrink_kernel, top_k=top_k, tokens=t, in_features=i, rank=r, rank_block=rank_block,
                          owned_block=owned_block, blocks=dataclasses.replace(blocks, programs=programs)),
        out_shape=jax.ShapeDtypeStruct((t, top_k, rank_block), jnp.float32),  # written at the missed pairs only
        grid=(programs,),
        compiler_params=params,
        interpret=interpret,
        name="meteora_missed_shrink",
    )(indices, coef, x, lora_a)

    programs, owned_block = token_ownership(blocks.expand_programs, t)
    return pl.pallas_call(
        functools.partial(_expand_kernel, top_k=top_k, tokens=t, rank=r, rank_block=rank_block, owned_block=owned_block,
                          blocks=dataclasses.replace(blocks, expand_programs=programs)),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(programs, o // blocks.span_out),
        input_output_aliases={4: 0},
        compiler_params=params,
        interpret=interpret,
        name="meteora_missed_add",
    )(indices, coef, h, lora_b, y)
