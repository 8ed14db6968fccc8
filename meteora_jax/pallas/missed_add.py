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
    program, span = pl.program_id(0), pl.program_id(1)
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

    def one_token(t):
        for j in range(top_k):
            pl.when(coef_ref[t, j] != 0)(functools.partial(one_choice, t, j))

    owned = jnp.arange(owned_block)
    rows = program + owned * blocks.programs
    missed = sum(plt.load(coef_ref.at[rows, jnp.full_like(rows, j)], mask=rows < tokens, other=0) != 0
                 for j in range(top_k))

    def next_missed(left):
        first = jnp.min(jnp.where(left > 0, owned, owned_block))
        one_token(program + first * blocks.programs)
        return jnp.where(owned == first, 0, left)

    # Only the owned tokens with a miss, one after the other: a scalar check per owned token would wait on
    # memory once per token.
    jax.lax.while_loop(lambda left: jnp.max(left) > 0, next_missed, missed.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def missed_add(x, lora_a, lora_b, indices, coef, y, *, blocks: MissedAddBlockSizes = MissedAddBlockSizes(),
               interpret: bool = False):
    """y + the pairs with nonzero coef [T, K] (see missed_add_reference), in y's dtype. I must tile by
    block_in, O by spans x block_out; indices must lie in [0, N). Forward only: `missed_add_vjp` gives its
    gradients."""
    blocks.check()
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    if y.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t:
        raise ValueError(f"shape mismatch: x {x.shape}, y {y.shape}, indices {indices.shape}, coef {coef.shape}")
    if i % blocks.block_in or o % (blocks.spans * blocks.block_out):
        raise ValueError(f"x {x.shape} -> y {y.shape} does not tile by {blocks.block_in} inputs and "
                         f"{blocks.spans} spans of {blocks.block_out} outputs")
    blocks = dataclasses.replace(blocks, programs=max(min(blocks.programs, t), 1))
    kernel = functools.partial(_kernel, top_k=indices.shape[1], tokens=t, in_features=i, span_out=o // blocks.spans,
                               rank=r, rank_block=max(pl.next_power_of_2(r), 16),
                               owned_block=pl.next_power_of_2(pl.cdiv(t, blocks.programs)), blocks=blocks)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(blocks.programs, blocks.spans),
        input_output_aliases={5: 0},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="meteora_missed_add",
    )(indices.astype(jnp.int32), coef.astype(jnp.float32), x, lora_a, lora_b, y)


# Missed pairs per step of the backward's loop: its temporaries hold this many pairs' copies of A and B.
BACKWARD_PAIRS_PER_STEP = 256


def missed_add_vjp(x, lora_a, lora_b, indices, coef, g):
    """(dx, dA, dB, dcoef) of missed_add for y's cotangent g [T, O], from the pairs with nonzero coef alone.

    Those pairs are moved to the front and taken BACKWARD_PAIRS_PER_STEP at a time by a loop that stops after
    the last one, so the cost follows the misses (0.2% of the pairs under trained gates) and the temporaries
    stay at one step's gathered adapters: a per-token gather of every pair would copy [T, K, I, r] and
    [T, K, r, O]. Products in x's dtype with float32 sums. dA and dB, wanted only when the adapters train, come
    from a loop of their own, which XLA drops when nothing uses them. dcoef is zero where coef is: in
    `fused_linear` those are the choices held by their tile's slots (masked there anyway) and choices of routing
    weight exactly 0, whose softmax derivative is 0 too (the adapters' scaling, which would need it, never
    trains)."""
    t, k = indices.shape
    step = BACKWARD_PAIRS_PER_STEP
    flat_coef = coef.reshape(-1).astype(jnp.float32)
    flat_adapter = indices.reshape(-1).astype(jnp.int32)
    count = jnp.sum(flat_coef != 0)
    order = jnp.pad(jnp.argsort(flat_coef == 0, stable=True), (0, -(t * k) % step))  # the padding is past count
    g = g.astype(x.dtype)

    def gathered(start):
        pair = jax.lax.dynamic_slice(order, (start,), (step,))
        live = start + jnp.arange(step) < count
        token, adapter = pair // k, flat_adapter[pair]
        c = jnp.where(live, flat_coef[pair], 0.0)
        a, b = lora_a[adapter].astype(x.dtype), lora_b[adapter].astype(x.dtype)
        xa = jnp.einsum("PI,PIR->PR", x[token], a, preferred_element_type=jnp.float32)
        gb = jnp.einsum("PO,PRO->PR", g[token], b, preferred_element_type=jnp.float32)
        return pair, live, token, adapter, c, a, xa, gb

    def over_missed(update, init):
        def body(carry):
            start, acc = carry
            return start + step, update(gathered(start), acc)

        return jax.lax.while_loop(lambda carry: carry[0] < count, body, (0, init))[1]

    def input_grads(pairs, acc):  # y += c (x A) B: dc = (x A) . (g B^T), dx = c (g B^T) A^T
        pair, live, token, _, c, a, xa, gb = pairs
        dx, dcoef = acc
        dcoef = dcoef.at[pair].add(jnp.where(live, jnp.sum(xa * gb, axis=-1), 0.0))
        dx_pairs = jnp.einsum("PR,PIR->PI", (gb * c[:, None]).astype(x.dtype), a, preferred_element_type=jnp.float32)
        return dx.at[token].add(dx_pairs.astype(x.dtype)), dcoef

    def adapter_grads(pairs, acc):  # dA = c x^T (g B^T), dB = c (x A)^T g
        _, _, token, adapter, c, _, xa, gb = pairs
        da, db = acc
        da = da.at[adapter].add(jnp.einsum("PI,PR->PIR", x[token].astype(jnp.float32), gb * c[:, None]))
        db = db.at[adapter].add(jnp.einsum("PR,PO->PRO", xa * c[:, None], g[token].astype(jnp.float32)))
        return da, db

    # dx sums in x's dtype: a token takes at most K additions, and a float32 [T, I] would take twice x's bytes.
    dx, dcoef = over_missed(input_grads, (jnp.zeros_like(x), jnp.zeros(t * k, jnp.float32)))
    da, db = over_missed(adapter_grads, (jnp.zeros(lora_a.shape, jnp.float32), jnp.zeros(lora_b.shape, jnp.float32)))
    return dx, da.astype(lora_a.dtype), db.astype(lora_b.dtype), dcoef.reshape(t, k)
