"""The `fused` strategy's remainder: y += the choices that missed their tile's adapter slots, in place.

A token tile spanning more adapters than the routed GEMM's slots leaves some (token, choice) pairs out. A grid
of P programs (P = min(T, blocks.programs)) x output spans adds them per token (BGMV style: x A, then h B over
the span). Program p owns tokens p, p + P, p + 2P, ... (misses cluster in tiles; interleaving spreads a tile's
over the programs). It reads its tokens' coefficients with one vector load per choice, returns at once if none
missed, else walks only the tokens that did. So a call with few misses costs one short launch, with no branch
in XLA (an XLA conditional would wait on the host for its predicate in every layer) and no list of the missed
tokens (XLA's cumulative sum and scatter for one took longer than the kernel). Each token is one program's,
each output span one program's: no two programs write the same element.
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
    """programs: at most this many programs share the tokens (program p takes every programs-th from p);
    spans: output spans per token, one program each (each redoes the token's x A: more spans shorten a program
    but repeat reads of A); block_in, block_out: features per loop step."""

    # bench/missed_add_tuning.py: with 0.1-0.3% of the choices missing, 256 x 4 took 14-15 us and this 26-28; under
    # a random gate (91-95% missing) this was the fastest and 256 x 4 took 2.1x its time. In the layer, with
    # 11-25% missing (runs of 48 tokens), 1024 x 2 took up to 1.2x the time of one token per program.
    programs: int = 4096
    spans: int = 1
    block_in: int = 1024
    block_out: int = 256
    num_warps: int = 4

    def check(self) -> None:
        check_powers_of_two(self, ("block_in", "block_out"))
        if self.programs < 1 or self.spans < 1:
            raise ValueError(f"programs={self.programs} and spans={self.spans} must be >= 1")


def missed_add_reference(x, lora_a, lora_b, indices, coef, y):
    """y + sum_j coef[t, j] (x[t] A[idx[t, j]]) B[idx[t, j]] in float32, cast to y's dtype."""
    return (y.astype(jnp.float32) + lora_gather_reference(x, lora_a, lora_b, indices, coef)).astype(y.dtype)


def _kernel(idx_ref, coef_ref, x_ref, a_ref, b_ref, y_ref, out_ref, *, top_k, tokens, in_features, span_out, rank,
            rank_block, owned_block, blocks: MissedAddBlockSizes):
    del y_ref  # aliased to out_ref
    span = pl.program_id(1)
    ranks = jnp.arange(rank_block)

    def one_choice(t, j):
        adapter = idx_ref[t, j]

        def shrink(step, h):
            start = step * blocks.block_in
            x = x_ref[t, pl.ds(start, blocks.block_in)]
            a = plt.load(a_ref.at[adapter, pl.ds(start, blocks.block_in), pl.ds(0, rank_block)],
                         mask=ranks[None, :] < rank, other=0)
            return h + jnp.sum(x.astype(jnp.float32)[:, None] * a.astype(jnp.float32), axis=0)

        h = coef_ref[t, j] * jax.lax.fori_loop(0, in_features // blocks.block_in, shrink,
                                               jnp.zeros((rank_block,), jnp.float32))

        def expand(step, carry):
            start = span * span_out + step * blocks.block_out
            b = plt.load(b_ref.at[adapter, pl.ds(0, rank_block), pl.ds(start, blocks.block_out)],
                         mask=ranks[:, None] < rank, other=0)
            row = out_ref.at[t, pl.ds(start, blocks.block_out)]
            row[...] = (row[...].astype(jnp.float32) + jnp.sum(h[:, None] * b.astype(jnp.float32), axis=0)).astype(
                out_ref.dtype)
            return carry

        jax.lax.fori_loop(0, span_out // blocks.block_out, expand, 0)

    walk_missed_choices(coef_ref, one_choice, programs=blocks.programs, tokens=tokens, top_k=top_k,
                        owned_block=owned_block)


def token_ownership(blocks: MissedAddBlockSizes, tokens: int) -> tuple[MissedAddBlockSizes, int]:
    """(blocks with at most one program per token, owned_block: a power of two >= the tokens a program owns)."""
    blocks = dataclasses.replace(blocks, programs=max(min(blocks.programs, tokens), 1))
    return blocks, pl.next_power_of_2(pl.cdiv(tokens, blocks.programs))


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
    block_in, O by spans x block_out; indices must lie in [0, N). Forward only: its gradients are in
    pair_grads.py."""
    blocks.check()
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    if y.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t:
        raise ValueError(f"shape mismatch: x {x.shape}, y {y.shape}, indices {indices.shape}, coef {coef.shape}")
    if i % blocks.block_in or o % (blocks.spans * blocks.block_out):
        raise ValueError(f"x {x.shape} -> y {y.shape} does not tile by {blocks.block_in} inputs and "
                         f"{blocks.spans} spans of {blocks.block_out} outputs")
    blocks, owned_block = token_ownership(blocks, t)
    kernel = functools.partial(_kernel, top_k=indices.shape[1], tokens=t, in_features=i, span_out=o // blocks.spans,
                               rank=r, rank_block=max(pl.next_power_of_2(r), 16), owned_block=owned_block,
                               blocks=blocks)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(blocks.programs, blocks.spans),
        input_output_aliases={5: 0},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="meteora_missed_add",
    )(indices.astype(jnp.int32), coef.astype(jnp.float32), x, lora_a, lora_b, y)
