"""The `fused` strategy: the base linear and the routed mixture in one GEMM (`routed_gemm`), for prefill.

Per tile of neighbouring tokens the routing keeps its U = 64 // r most chosen adapters as slots (8 at r = 8).
h [T, 64] holds each token's x A for each slot's adapter times its routing coefficient (zero for slots it did not
choose; columns past U r zero); the GEMM gathers the slots' B rows, B_tile [64, O] per tile, and adds h @ B_tile
in its epilogue. A token choice whose adapter missed its tile's slots (a tile spanning more than U adapters) is added
afterwards, per token, by meteora_jax/pallas/missed_add.py's two passes, whose programs walk the routing kernel's
list of the tokens with a miss; the first runs in the shrink's launch (tile_shrink_with_misses).
meteora_jax/pallas/pair_grads.py gives their gradients.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from meteora_jax.pallas.missed_add import MissedAddBlockSizes, missed_expand_add
from meteora_jax.pallas.pair_grads import pair_adapter_grads, pair_input_grads
from meteora_jax.pallas.routed_gemm import LANE, SLOT_ROW_GROUP, RoutedGemmBlockSizes, routed_gemm
from meteora_jax.pallas.tile_routing import route_tiles, slot_count
from meteora_jax.pallas.tile_shrink import MissedChoices, TileShrinkBlockSizes, tile_shrink_with_misses


def fused_linear(x, w, lora_a, lora_b, scaling, indices, weights, *,
                 blocks: RoutedGemmBlockSizes = RoutedGemmBlockSizes(), interpret: bool | None = None):
    """x @ w plus the mixture (lora_mixture's formula) [T, O] in bfloat16; every operand bfloat16 but scaling
    and weights (float32). Tokens are padded to a multiple of blocks.tile_tokens."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    t = x.shape[0]
    n, i, r = lora_a.shape
    if r > LANE:
        raise ValueError(f"the fused GEMM takes ranks up to {LANE}; the adapters have rank {r}")
    if w.shape[0] != i or lora_b.shape[:2] != (n, r) or lora_b.shape[2] != w.shape[1]:
        raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, lora_a {lora_a.shape}, lora_b {lora_b.shape}")
    if scaling.shape != (n,) or indices.ndim != 2 or indices.shape[0] != t or weights.shape != indices.shape:
        raise ValueError(f"scaling {scaling.shape} must be [{n}], and indices {indices.shape} and weights "
                         f"{weights.shape} [{t}, K] for x {x.shape}")
    # Checked here, not only by the GEMM after padding, so that the message names the caller's shapes.
    if w.shape[1] % blocks.tile_outputs or i % blocks.tile_k:
        raise ValueError(f"w {w.shape} does not tile by {blocks.tile_k} inputs x {blocks.tile_outputs} outputs")
    if t == 0:
        return jnp.zeros((0, w.shape[1]), x.dtype)
    padded = -t % blocks.tile_tokens
    if padded:
        x = jnp.pad(x, ((0, padded), (0, 0)))
        indices = jnp.pad(indices, ((0, padded), (0, 0)))
        weights = jnp.pad(weights, ((0, padded), (0, 0)))
    routing = route_tiles(indices, weights, scaling, tile_tokens=blocks.tile_tokens, slots=slot_count(r),
                          interpret=interpret)
    shrink_blocks = TileShrinkBlockSizes(block_tokens=math.gcd(blocks.tile_tokens, TileShrinkBlockSizes.block_tokens))
    misses = MissedChoices(indices, routing.missed, routing.tile_misses, routing.missed_tokens)
    h, h_missed = tile_shrink_with_misses(x, lora_a, routing.adapters, routing.per_slot, misses,
                                          tile_tokens=blocks.tile_tokens, blocks=shrink_blocks,
                                          missed_block_in=_missed_blocks(x, w).block_in, interpret=interpret)
    y = routed_gemm(x, w, h, *_slot_bank(lora_b, routing.adapters), blocks=blocks, interpret=interpret)
    listed = (routing.tile_misses, routing.missed_tokens)
    return _add_missed(x, y, lora_a, lora_b, indices, routing.missed, listed, h_missed, interpret)[:t]


def _slot_bank(lora_b, adapters):
    """(bank, slots) for routed_gemm: the adapters' B itself where r fills whole row groups of its B_tile (r = 8,
    16, 32, 64), which the GEMM then gathers by copy engine; else each tile's B rows gathered here (zero past
    slots x r) as a bank of one slot per tile."""
    tiles, slots = adapters.shape
    r = lora_b.shape[1]
    if r % SLOT_ROW_GROUP == 0 and LANE % r == 0:
        return lora_b, adapters
    b_tile = lora_b[adapters].reshape(tiles, slots * r, -1)
    return jnp.pad(b_tile, ((0, 0), (0, LANE - slots * r), (0, 0))), jnp.arange(tiles, dtype=jnp.int32)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _add_missed(x, y, lora_a, lora_b, indices, missed, listed, h_missed, interpret):
    """y plus the choices that missed their tile's slots (`missed`: their coefficients, zero elsewhere; `listed`:
    the tokens with one, as the routing kernel lists them; h_missed: their c x A, from the shrink's launch)."""
    return missed_expand_add(lora_b, indices, missed, h_missed, y, listed, blocks=_missed_blocks(x, y),
                             interpret=interpret)


def _missed_blocks(x, y):
    """For x [T, I] and any [., O]: the miss passes' blocks."""
    i, o = x.shape[1], y.shape[1]
    return MissedAddBlockSizes(block_in=math.gcd(i, MissedAddBlockSizes.block_in),
                               span_out=math.gcd(o, MissedAddBlockSizes.span_out),
                               block_out=math.gcd(o, MissedAddBlockSizes.block_out))


def _add_missed_forward(*operands):
    # Symbolic zeros: each operand's leaves arrive as CustomVJPPrimal, so the backward knows whether the adapters
    # are differentiated and runs their gradients' kernel only then. y passes straight through (its cotangent is
    # g), so it is no residual: one [T, O] buffer less to keep.
    *primals, interpret = operands
    x, y, lora_a, lora_b, indices, missed, listed, h_missed = jax.tree.map(lambda p: p.value, primals)
    adapters_train = primals[2].perturbed or primals[3].perturbed
    out = _add_missed(x, y, lora_a, lora_b, indices, missed, listed, h_missed, interpret)
    return out, (x, lora_a, lora_b, indices, missed, listed, adapters_train)


def _add_missed_backward(interpret, residuals, g):
    """dmissed is zero where missed is: there the choices are held by their tile's slots (whose gradients come
    through the GEMM's) or have routing weight exactly 0, whose softmax derivative is 0 too (the adapters'
    scaling, which would need it, never trains). The adapters' gradients are None (zero) where they are frozen,
    as in gate training."""
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # a custom VJP downstream sent no cotangent
        return (None,) * 8
    x, lora_a, lora_b, indices, missed, listed, adapters_train = residuals
    blocks = _missed_blocks(x, g)
    dx, dmissed = pair_input_grads(x, lora_a, lora_b, indices, missed, g, listed, blocks=blocks, interpret=interpret)
    da = db = None
    if adapters_train:
        da, db = pair_adapter_grads(x, lora_a, lora_b, indices, missed, g, listed, blocks=blocks, interpret=interpret)
    return dx, g, da, db, None, dmissed, None, None


_add_missed.defvjp(_add_missed_forward, _add_missed_backward, symbolic_zeros=True)
