"""Gradients of y += c (x A) B over the (token, choice) pairs of nonzero c, per token: the `fused` strategy's
misses (meteora_jax/pallas/missed_add.py), a fraction of a percent of the pairs under trained gates.

dx = c (g B^T) A^T and dc = (x A) . (g B^T) come from one kernel whose program p owns tokens p, p + P, ... (a
program none of whose tokens missed returns at once; missed_add's forward walks a list of the missed tokens
instead, which only the routing kernel writes). No loop in XLA: a while loop over the pairs, or a conditional,
would wait on the host for its predicate in every layer's backward (through SmolLM2's `fused` projections such
loops took a gate step from 88 to 109 ms). Over every pair it is no substitute for XLA's per-pair products, which
fuse the adapters' gathers: 2.3-2.9x their time at 16384 tokens of 4096 features (bench/NOTES.md). The adapters'
gradients, wanted only when the adapters train, come from a loop over the pairs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.in_place import add_into
from meteora_jax.pallas.missed_add import MissedAddBlockSizes, missed_add_reference

# Programs of the pair kernel, which walks its tokens as the one-pass miss kernel did (bench/NOTES.md): 4096 was that
# kernel's choice, the fastest at 11-25% of the choices missing.
PAIR_PROGRAMS = 4096


def pair_input_grads_reference(x, lora_a, lora_b, indices, coef, g):
    """(dx in x's dtype, dcoef [T, K] float32) of the sum for y's cotangent g, in float32, over every pair."""
    def delta(x, coef):
        return missed_add_reference(x, lora_a, lora_b, indices, coef, jnp.zeros(g.shape, jnp.float32))

    _, vjp = jax.vjp(delta, x.astype(jnp.float32), coef.astype(jnp.float32))
    dx, dcoef = vjp(g.astype(jnp.float32))
    return dx.astype(x.dtype), dcoef


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


def _kernel(idx_ref, coef_ref, x_ref, a_ref, b_ref, g_ref, dx_in_ref, dcoef_in_ref, dx_ref, dcoef_ref, *, top_k,
            tokens, in_features, out_features, rank, rank_block, owned_block, interpret, blocks: MissedAddBlockSizes):
    del dx_in_ref, dcoef_in_ref  # aliased to dx_ref and dcoef_ref
    ranks = jnp.arange(rank_block)
    safe_ranks = jnp.minimum(ranks, rank - 1)[None, :]

    # Features past an edge read and write the last feature (see in_place.py); their x is masked to 0 in the sums.
    def project(t, adapter):  # u = g B^T
        def step(i, u):
            cols = i * blocks.block_out + jnp.arange(blocks.block_out)
            inside, safe = cols < out_features, jnp.minimum(cols, out_features - 1)
            g = plt.load(g_ref.at[t, safe], mask=inside, other=0).astype(jnp.float32)
            b = plt.load(b_ref.at[adapter, safe_ranks.T, safe[None, :]], mask=(ranks < rank)[:, None], other=0)
            return u + jnp.sum(b.astype(jnp.float32) * g[None, :], axis=1)

        steps = pl.cdiv(out_features, blocks.block_out)
        return jax.lax.fori_loop(0, steps, step, jnp.zeros((rank_block,), jnp.float32))

    def one_choice(t, j):
        adapter = idx_ref[t, j]
        u = project(t, adapter)
        cu = coef_ref[t, j] * u

        def shrink_and_add(i, h):  # h = x A, and dx += c u A^T over the same A rows
            cols = i * blocks.block_in + jnp.arange(blocks.block_in)
            inside, safe = cols < in_features, jnp.minimum(cols, in_features - 1)
            x = plt.load(x_ref.at[t, safe], mask=inside, other=0).astype(jnp.float32)
            a = plt.load(a_ref.at[adapter, safe[:, None], safe_ranks], mask=(ranks < rank)[None, :],
                         other=0).astype(jnp.float32)
            add_into(dx_ref.at[t, safe], jnp.sum(a * cu[None, :], axis=1), interpret=interpret)
            return h + jnp.sum(x[:, None] * a, axis=0)

        steps = pl.cdiv(in_features, blocks.block_in)
        h = jax.lax.fori_loop(0, steps, shrink_and_add, jnp.zeros((rank_block,), jnp.float32))
        dcoef_ref[t, j] = jnp.sum(h * u)

    walk_missed_choices(coef_ref, one_choice, programs=blocks.programs, tokens=tokens, top_k=top_k,
                        owned_block=owned_block)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def pair_input_grads(x, lora_a, lora_b, indices, coef, g, *,
                     blocks: MissedAddBlockSizes = MissedAddBlockSizes(programs=PAIR_PROGRAMS),
                     interpret: bool = False):
    """(dx [T, I] in x's dtype, dcoef [T, K] float32) of y += sum_j coef[t, j] (x[t] A[idx]) B[idx] for y's
    cotangent g [T, O], over the pairs of nonzero coef (zero elsewhere). Any feature counts: block_in and
    block_out shrink to them (blocks.expand_programs and span_out are not used)."""
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    if g.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t or lora_b.shape[:2] != (n, r):
        raise ValueError(f"shape mismatch: x {x.shape}, lora_a {lora_a.shape}, lora_b {lora_b.shape}, g {g.shape}, "
                         f"indices {indices.shape}, coef {coef.shape}")
    blocks = dataclasses.replace(blocks, block_in=min(blocks.block_in, max(pl.next_power_of_2(i), 16)),
                                 block_out=min(blocks.block_out, max(pl.next_power_of_2(o), 16)))
    blocks.check()
    programs, owned_block = token_ownership(blocks.programs, t)
    blocks = dataclasses.replace(blocks, programs=programs)
    kernel = functools.partial(_kernel, top_k=indices.shape[1], tokens=t, in_features=i, out_features=o, rank=r,
                               rank_block=max(pl.next_power_of_2(r), 16), owned_block=owned_block,
                               interpret=interpret, blocks=blocks)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(coef.shape, jnp.float32)),
        grid=(blocks.programs,),
        input_output_aliases={6: 0, 7: 1},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="meteora_pair_grads",
    )(indices.astype(jnp.int32), coef.astype(jnp.float32), x, lora_a, lora_b, g.astype(x.dtype), jnp.zeros_like(x),
      jnp.zeros(coef.shape, jnp.float32))


# Pairs per step of the adapters' gradient loop: its temporaries hold this many pairs' copies of A and B.
BACKWARD_PAIRS_PER_STEP = 256


def pair_adapter_grads(x, lora_a, lora_b, indices, coef, g):
    """(dA, dB) of the same sum for y's cotangent g, from the pairs with nonzero coef alone.

    Those pairs are moved to the front and taken BACKWARD_PAIRS_PER_STEP at a time by a loop that stops after
    the last one, so the cost follows the misses and the temporaries stay at one step's gathered adapters (a
    per-token gather of every pair would copy [T, K, I, r] and [T, K, r, O]). XLA drops the loop when nothing
    uses its result, as when only the gates train."""
    t, k = indices.shape
    step = BACKWARD_PAIRS_PER_STEP
    flat_coef = coef.reshape(-1).astype(jnp.float32)
    count = jnp.sum(flat_coef != 0)
    order = jnp.pad(jnp.argsort(flat_coef == 0, stable=True), (0, -(t * k) % step))  # the padding is past count
    g = g.astype(x.dtype)

    def body(carry):  # dA = c x^T (g B^T), dB = c (x A)^T g
        start, da, db = carry
        pair = jax.lax.dynamic_slice(order, (start,), (step,))
        token, adapter = pair // k, indices.reshape(-1)[pair].astype(jnp.int32)
        c = jnp.where(start + jnp.arange(step) < count, flat_coef[pair], 0.0)[:, None]
        a, b = lora_a[adapter].astype(x.dtype), lora_b[adapter].astype(x.dtype)
        xa = jnp.einsum("PI,PIR->PR", x[token], a, preferred_element_type=jnp.float32)
        gb = jnp.einsum("PO,PRO->PR", g[token], b, preferred_element_type=jnp.float32)
        da = da.at[adapter].add(jnp.einsum("PI,PR->PIR", x[token].astype(jnp.float32), gb * c))
        db = db.at[adapter].add(jnp.einsum("PR,PO->PRO", xa * c, g[token].astype(jnp.float32)))
        return start + step, da, db

    init = (0, jnp.zeros(lora_a.shape, jnp.float32), jnp.zeros(lora_b.shape, jnp.float32))
    _, da, db = jax.lax.while_loop(lambda carry: carry[0] < count, body, init)
    return da.astype(lora_a.dtype), db.astype(lora_b.dtype)
