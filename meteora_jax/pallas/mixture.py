"""The `pallas` MeteoRA strategy: the decode or prefill kernel forward, and a custom VJP.

Backward: dx runs the same kernels on the transposed adapters (dx = sum_j c_j (g B_j^T) A_j^T); the
routing-weight gradient d c[m, j] = (x_m A_j) . (g_m B_j^T) is a per-token gather in XLA; adapter
gradients, needed only when adapters train, come from the plain reference's VJP (XLA drops them
when nothing uses them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from meteora_jax.lora_mixture import PALLAS_DECODE_MAX_TOKENS
from meteora_jax.pallas.lora_gather import GatherBlockSizes, lora_gather, lora_gather_reference
from meteora_jax.pallas.lora_segment import SegmentBlockSizes, lora_segment_add


def _kernel(x, lora_a, lora_b, indices, coef, y, interpret):
    """y + delta in y's dtype; the prefill kernel adds in place."""
    if x.shape[0] <= PALLAS_DECODE_MAX_TOKENS:  # the per-token gather beats grouping tokens by adapter
        delta = lora_gather(x, lora_a, lora_b, indices, coef, blocks=GatherBlockSizes(), interpret=interpret)
        return (y.astype(jnp.float32) + delta).astype(y.dtype)
    return lora_segment_add(x, lora_a, lora_b, indices, coef, y, blocks=SegmentBlockSizes(), interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _mixture(x, lora_a, lora_b, indices, coef, y, interpret):
    return _kernel(x, lora_a, lora_b, indices, coef, y, interpret)


def _forward(x, lora_a, lora_b, indices, coef, y, interpret):
    return _kernel(x, lora_a, lora_b, indices, coef, y, interpret), (x, lora_a, lora_b, indices, coef)


def _backward(interpret, residuals, g):
    x, lora_a, lora_b, indices, coef = residuals
    g32 = g.astype(jnp.float32)
    transposed_a = jnp.swapaxes(lora_b, 1, 2)  # [N, O, R]
    transposed_b = jnp.swapaxes(lora_a, 1, 2)  # [N, R, I]
    zeros = jnp.zeros(x.shape, jnp.float32)
    dx = _kernel(g.astype(x.dtype), transposed_a, transposed_b, indices, coef, zeros, interpret).astype(x.dtype)
    hx = jnp.einsum("MI,MKIR->MKR", x, lora_a[indices], preferred_element_type=jnp.float32)
    hg = jnp.einsum("MO,MKRO->MKR", g.astype(x.dtype), lora_b[indices], preferred_element_type=jnp.float32)
    dcoef = jnp.sum(hx * hg, axis=-1)
    _, adapter_vjp = jax.vjp(lambda a, b: lora_gather_reference(x, a, b, indices, coef), lora_a, lora_b)
    da, db = adapter_vjp(g32)
    return dx, da, db, None, dcoef, g


_mixture.defvjp(_forward, _backward)


def mixture_pallas(x, lora_a, lora_b, scaling, indices, weights, *, interpret: bool | None = None):
    """delta [M, O] float32, the `lora_mixture` contract; `interpret` defaults to True off GPU."""
    y = jnp.zeros((x.shape[0], lora_b.shape[-1]), jnp.float32)
    return mixture_pallas_add(x, lora_a, lora_b, scaling, indices, weights, y, interpret=interpret)


def mixture_pallas_add(x, lora_a, lora_b, scaling, indices, weights, y, *, interpret: bool | None = None):
    """y + delta in y's dtype, y [M, O]: the prefill kernel adds into y in place, so no [M, O] float32
    delta is materialised (bench/NOTES.md); otherwise as `mixture_pallas`."""
    if y.shape != (x.shape[0], lora_b.shape[-1]):
        raise ValueError(f"y has shape {y.shape}; expected {(x.shape[0], lora_b.shape[-1])}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        lora_a, lora_b = lora_a.astype(x.dtype), lora_b.astype(x.dtype)
    coef = weights.astype(jnp.float32) * scaling.astype(jnp.float32)[indices]
    return _mixture(x, lora_a, lora_b, indices.astype(jnp.int32), coef, y, interpret)
