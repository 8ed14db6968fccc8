"""The `fused` strategy's remainder: y += the choices that missed their tile's adapter slots, in place.

A token tile spanning more adapters than the routed GEMM's slots leaves some (token, choice) pairs out. This
kernel adds them per token (BGMV style): one program per block of tokens (by default one token), which returns
at once when its block has none, so the common case costs one launch and no branch in XLA (an XLA conditional
would wait on the host for its predicate in every layer).
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
    # A program walks its tokens one after another, each over all its outputs: one token per program spreads a
    # tile's misses (or, under a random gate, every token) over the whole GPU.
    block_tokens: int = 1
    block_in: int = 1024
    block_out: int = 256
    num_warps: int = 4

    def check(self) -> None:
        check_powers_of_two(self, ("block_in", "block_out"))
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens={self.block_tokens} must be >= 1")


def missed_add_reference(x, lora_a, lora_b, indices, coef, y):
    """y + sum_j coef[t, j] (x[t] A[idx[t, j]]) B[idx[t, j]] in float32, cast to y's dtype."""
    return (y.astype(jnp.float32) + lora_gather_reference(x, lora_a, lora_b, indices, coef)).astype(y.dtype)


def _kernel(any_ref, idx_ref, coef_ref, x_ref, a_ref, b_ref, y_ref, out_ref, *, top_k, in_features,
            out_features, rank, rank_block, blocks: MissedAddBlockSizes):
    del y_ref  # aliased to out_ref
    block = pl.program_id(0)
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
            start = step * blocks.block_out
            b = plt.load(b_ref.at[adapter, pl.ds(0, rank_block), pl.ds(start, blocks.block_out)],
                         mask=ranks[:, None] < rank, other=0)
            row = out_ref.at[t, pl.ds(start, blocks.block_out)]
            row[...] = (row[...].astype(jnp.float32) + jnp.sum(h[:, None] * b.astype(jnp.float32), axis=0)).astype(
                out_ref.dtype)
            return carry

        jax.lax.fori_loop(0, out_features // blocks.block_out, expand, 0)

    def one_token(offset, carry):
        t = block * blocks.block_tokens + offset
        for j in range(top_k):
            pl.when(coef_ref[t, j] != 0)(functools.partial(one_choice, t, j))
        return carry

    @pl.when(any_ref[block] != 0)
    def _():
        jax.lax.fori_loop(0, blocks.block_tokens, one_token, 0)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def missed_add(x, lora_a, lora_b, indices, coef, y, *, blocks: MissedAddBlockSizes = MissedAddBlockSizes(),
               interpret: bool = False):
    """y + the pairs with nonzero coef [T, K] (see missed_add_reference), in y's dtype. T, I and O must tile by
    the blocks; indices must lie in [0, N). Forward only: `fused_linear` differentiates the reference form."""
    blocks.check()
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    if y.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t:
        raise ValueError(f"shape mismatch: x {x.shape}, y {y.shape}, indices {indices.shape}, coef {coef.shape}")
    if t % blocks.block_tokens or i % blocks.block_in or o % blocks.block_out:
        raise ValueError(f"x {x.shape} -> y {y.shape} does not tile by {blocks.block_tokens} tokens, "
                         f"{blocks.block_in} inputs and {blocks.block_out} outputs")
    coef = coef.astype(jnp.float32)
    any_missed = jnp.any(coef.reshape(t // blocks.block_tokens, -1) != 0, axis=1).astype(jnp.int32)
    kernel = functools.partial(_kernel, top_k=indices.shape[1], in_features=i, out_features=o, rank=r,
                               rank_block=max(pl.next_power_of_2(r), 16), blocks=blocks)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(t // blocks.block_tokens,),
        input_output_aliases={6: 0},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="meteora_missed_add",
    )(any_missed, indices.astype(jnp.int32), coef, x, lora_a, lora_b, y)
