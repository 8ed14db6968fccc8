"""Building blocks shared by the model: RMSNorm and the linear-layer factory for the 7 projections."""

from __future__ import annotations

from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The Hugging Face submodule each projection lives in.
PROJECTION_PARENT = {p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in PROJECTIONS}

# Hugging Face's LLaMA initialiser; only tests and random-weight benchmarks see it.
weight_init = nn.initializers.normal(stddev=0.02)


class LinearFactory(Protocol):
    """Makes the module for one projection; the MeteoRA layer is another factory of this shape.

    `name` is one of PROJECTIONS and is also the parameter scope, so base weights keep
    Hugging Face's names whatever factory built them. The module is called as
    `module(x, routing)`, `routing` being a `Routing` or None; plain layers ignore it.
    """

    def __call__(
        self, *, name: str, layer_index: int, features: int, dtype: jnp.dtype, param_dtype: jnp.dtype
    ) -> nn.Module: ...


class Linear(nn.Module):
    """Bias-free projection with a [in, out] `kernel`, computed in `dtype`."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, routing=None) -> jax.Array:
        del routing
        kernel = self.param("kernel", weight_init, (x.shape[-1], self.features), self.param_dtype)
        return jnp.einsum("...I,IO->...O", x.astype(self.dtype), kernel.astype(self.dtype))


def dense_linear(
    *, name: str, layer_index: int, features: int, dtype: jnp.dtype, param_dtype: jnp.dtype
) -> nn.Module:
    del layer_index
    return Linear(features, dtype=dtype, param_dtype=param_dtype, name=name)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # Hugging Face casts back to the input dtype before scaling; matching it keeps bf16 parity.
        return scale.astype(x.dtype) * normed.astype(x.dtype)
