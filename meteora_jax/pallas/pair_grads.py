"""Gradients of y += c (x A) B over the (token, choice) pairs of nonzero c, per token: the `fused` strategy's
misses (meteora_jax/pallas/missed_add.py), a fraction of a percent of the pairs under trained gates.

Two kernels whose programs walk the routing kernel's list of the tokens with a miss, as missed_add's passes do
(program p of P takes the list's entries p, p + P, ...; where nothing missed each reads the counts and returns):
one gives dx = c (g B^T) A^T and dc = (x A) . (g B^T), each token one program's; the other, wanted only when the
adapters train, adds each pair's c x^T (g B^T) and c (x A)^T g into float32 gradients atomically, since one
adapter's pairs fall to many programs. No loop in XLA: a while loop over the pairs, or a conditional, would wait
on the host for its predicate in every layer's backward (through SmolLM2's `fused` projections such loops took a
gate step from 88 to 109 ms). Over every pair the dx kernel is no substitute for XLA's per-pair products, which
fuse the adapters' gathers: 2.3-2.9x their time at 16384 tokens of 4096 features (bench/NOTES.md; it then walked
the tokens program p owned, p, p + P, ..., with 4096 programs).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.in_place import add_into
from meteora_jax.pallas.missed_add import (
    MissedAddBlockSizes,
    check_listed,
    compiler_params,
    listed_counts,
    missed_add_reference,
    walk_listed_choices,
    walk_params,
)


def pair_input_grads_reference(x, lora_a, lora_b, indices, coef, g):
    """(dx in x's dtype, dcoef [T, K] float32) of the sum for y's cotangent g, in float32, over every pair."""
    def delta(x, coef):
        return missed_add_reference(x, lora_a, lora_b, indices, coef, jnp.zeros(g.shape, jnp.float32))

    _, vjp = jax.vjp(delta, x.astype(jnp.float32), coef.astype(jnp.float32))
    dx, dcoef = vjp(g.astype(jnp.float32))
    return dx.astype(x.dtype), dcoef


def _pair_shapes(x, lora_a, lora_b, indices, coef, g) -> tuple[int, int, int, int, int]:
    """(T, I, N, r, O) once the pair kernels' operands agree."""
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    if (g.shape != (t, o) or indices.shape != coef.shape or indices.shape[0] != t or lora_a.shape[1] != i
            or lora_b.shape[:2] != (n, r)):
        raise ValueError(f"shape mismatch: x {x.shape}, lora_a {lora_a.shape}, lora_b {lora_b.shape}, g {g.shape}, "
                         f"indices {indices.shape}, coef {coef.shape}")
    return t, i, n, r, o


def _kernel(per_tile_ref, tokens_ref, idx_ref, coef_ref, x_ref, a_ref, b_ref, g_ref, dx_in_ref, dcoef_in_ref, dx_ref,
            dcoef_ref, *, top_k, tiles, tile_tokens, in_features, out_features, rank, rank_block, interpret,
            blocks: MissedAddBlockSizes):
    del dx_in_ref, dcoef_in_ref  # aliased to dx_ref and dcoef_ref
    counts = listed_counts(per_tile_ref, tiles)
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
        cu = jnp.where(ranks < rank, coef_ref[t, j] * u, 0)  # padded lanes stay 0 for an infinite coefficient

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

    walk_listed_choices(counts, tokens_ref, coef_ref, one_choice, first=pl.program_id(0), programs=blocks.programs,
                        tile_tokens=tile_tokens, top_k=top_k)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def pair_input_grads(x, lora_a, lora_b, indices, coef, g, listed=None, *,
                     blocks: MissedAddBlockSizes = MissedAddBlockSizes(), interpret: bool = False):
    """(dx [T, I] in x's dtype, dcoef [T, K] float32) of y += sum_j coef[t, j] (x[t] A[idx]) B[idx] for y's
    cotangent g [T, O], over the pairs of nonzero coef (zero elsewhere). listed: the tokens with one, (per_tile,
    tokens) as missed_token_list gives them, each token once (None: built here); each is one program's, so dx
    needs no atomics.
    Any feature counts: block_in and block_out shrink to them (blocks.expand_programs and span_out are not used)."""
    t, i, n, r, o = _pair_shapes(x, lora_a, lora_b, indices, coef, g)
    blocks = dataclasses.replace(blocks, block_in=min(blocks.block_in, max(pl.next_power_of_2(i), 16)),
                                 block_out=min(blocks.block_out, max(pl.next_power_of_2(o), 16)))
    blocks.check()
    if t == 0:
        return jnp.zeros_like(x), jnp.zeros(coef.shape, jnp.float32)
    listed = check_listed(listed, coef)
    kernel = functools.partial(_kernel, in_features=i, out_features=o, interpret=interpret,
                               **walk_params(r, indices, listed, blocks))
    return _call_over_pairs(kernel, "meteora_pair_grads", (jnp.zeros_like(x), jnp.zeros(coef.shape, jnp.float32)),
                            listed, indices, coef, x, lora_a, lora_b, g, blocks=blocks, interpret=interpret)


def _call_over_pairs(kernel, name: str, zeros, listed, indices, coef, x, lora_a, lora_b, g, *,
                     blocks: MissedAddBlockSizes, interpret: bool):
    """A pair kernel on blocks.programs programs, adding into its outputs, which start as `zeros` (two buffers)."""
    return pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(z.shape, z.dtype) for z in zeros),
        grid=(blocks.programs,),
        input_output_aliases={8: 0, 9: 1},
        compiler_params=compiler_params(blocks),
        interpret=interpret,
        name=name,
    )(*listed, indices.astype(jnp.int32), coef.astype(jnp.float32), x, lora_a, lora_b, g.astype(x.dtype), *zeros)


def _adapter_kernel(per_tile_ref, tokens_ref, idx_ref, coef_ref, x_ref, a_ref, b_ref, g_ref, da_in_ref, db_in_ref,
                    da_ref, db_ref, *, top_k, tiles, tile_tokens, in_features, out_features, rank, rank_block,
                    blocks: MissedAddBlockSizes):
    del da_in_ref, db_in_ref  # aliased to da_ref and db_ref
    ranks = jnp.arange(rank_block)
    counts = listed_counts(per_tile_ref, tiles)

    def one_choice(t, j):
        adapter, c = idx_ref[t, j], coef_ref[t, j]

        def output_block(s):
            return pl.ds(s * blocks.block_out, blocks.block_out)

        def project(s, u):  # u = g B^T
            g = g_ref[t, output_block(s)].astype(jnp.float32)
            b = plt.load(b_ref.at[adapter, pl.ds(0, rank_block), output_block(s)], mask=(ranks < rank)[:, None],
                         other=0)
            return u + jnp.sum(b.astype(jnp.float32) * g[None, :], axis=1)

        u = jax.lax.fori_loop(0, out_features // blocks.block_out, project, jnp.zeros((rank_block,), jnp.float32))

        def shrink_and_add(s, h):  # h = x A, and dA += c x^T u over the same A rows
            rows = pl.ds(s * blocks.block_in, blocks.block_in)
            x = x_ref[t, rows].astype(jnp.float32)
            a = plt.load(a_ref.at[adapter, rows, pl.ds(0, rank_block)], mask=(ranks < rank)[None, :], other=0)
            plt.atomic_add(da_ref, (adapter, rows, slice(None)), (c * x)[:, None] * u[None, :])
            return h + jnp.sum(x[:, None] * a.astype(jnp.float32), axis=0)

        ch = c * jax.lax.fori_loop(0, in_features // blocks.block_in, shrink_and_add,
                                   jnp.zeros((rank_block,), jnp.float32))

        def expand_add(s, carry):  # dB += c h^T g
            g = g_ref[t, output_block(s)].astype(jnp.float32)
            plt.atomic_add(db_ref, (adapter, slice(None), output_block(s)), ch[:, None] * g[None, :])
            return carry

        jax.lax.fori_loop(0, out_features // blocks.block_out, expand_add, 0)

    walk_listed_choices(counts, tokens_ref, coef_ref, one_choice, first=pl.program_id(0), programs=blocks.programs,
                        tile_tokens=tile_tokens, top_k=top_k)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def pair_adapter_grads(x, lora_a, lora_b, indices, coef, g, listed=None, *,
                       blocks: MissedAddBlockSizes = MissedAddBlockSizes(), interpret: bool = False):
    """(dA [N, I, r], dB [N, r, O] in the adapters' dtypes) of the same sum for y's cotangent g, from the pairs
    with nonzero coef alone.

    One kernel, no loop in XLA: its programs walk the list of the tokens with a nonzero coef as missed_add's do
    (listed: (per_tile, tokens) as missed_token_list gives them; None: built here), and each pair adds its
    c x^T (g B^T) and c (x A)^T g into float32 gradients by atomic adds, since pairs of one adapter fall to many
    programs. So the cost follows the pairs and the temporaries are the two gradients. Their sums' order varies
    from run to run in the last bits. I and O must be multiples of 16."""
    t, i, n, r, o = _pair_shapes(x, lora_a, lora_b, indices, coef, g)
    if i % 16 or o % 16:
        raise ValueError(f"x {x.shape} and g {g.shape}: the adapters' gradient kernel takes features in multiples "
                         "of 16")
    blocks = dataclasses.replace(blocks, block_in=math.gcd(i, blocks.block_in), block_out=math.gcd(o, blocks.block_out),
                                 span_out=math.gcd(o, blocks.span_out))
    blocks.check()
    if t == 0:
        return jnp.zeros_like(lora_a), jnp.zeros_like(lora_b)
    listed = check_listed(listed, coef)
    rank_lanes = pl.next_power_of_2(r)  # the gradients' rank lanes: exact where r is a power of two
    kernel = functools.partial(_adapter_kernel, in_features=i, out_features=o,
                               **walk_params(r, indices, listed, blocks, rank_block=rank_lanes))
    zeros = (jnp.zeros((n, i, rank_lanes), jnp.float32), jnp.zeros((n, rank_lanes, o), jnp.float32))
    da, db = _call_over_pairs(kernel, "meteora_pair_adapter_grads", zeros, listed, indices, coef, x, lora_a, lora_b,
                              g, blocks=blocks, interpret=interpret)
    return da[:, :, :r].astype(lora_a.dtype), db[:, :r].astype(lora_b.dtype)
