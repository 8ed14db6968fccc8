"""The MeteoRA dense layer: a frozen base projection plus N LoRA adapters mixed per token by a top-k gate.

Parameters of one projection (Hugging Face name kept for the base kernel):
    q_proj/kernel              [in, out]   frozen base weight
    q_proj/meteora/lora_a      [N, in, r]  adapters' A, zero-padded to the largest rank
    q_proj/meteora/lora_b      [N, r, out]
    q_proj/meteora/scaling     [N]         alpha / r (or alpha / sqrt(r) for rsLoRA)
    q_proj/meteora/gate        [in, N]     the trained gate, no bias
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from meteora_jax.gate_logits import compute_gate_logits
from meteora_jax.layers import PROJECTIONS, Linear, weight_init
from meteora_jax.lora_mixture import (
    STRATEGIES,
    fused_output,
    gated_output,
    lora_mixture,
    pick_strategy,
)
from meteora_jax.routing import Routing


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeteoraConfig:
    num_adapters: int
    rank: int
    targets: tuple[str, ...] = PROJECTIONS
    top_k: int = 2
    temperature: float = 1.0
    strategy: str = "auto"
    gate_init_std: float = 0.02

    def __post_init__(self):
        unknown = set(self.targets) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown MeteoRA targets {sorted(unknown)}; choose from {PROJECTIONS}")
        if self.num_adapters < 1 or self.rank < 1:
            raise ValueError(f"num_adapters={self.num_adapters} and rank={self.rank} must be >= 1")
        if not 1 <= self.top_k <= self.num_adapters:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_adapters={self.num_adapters}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")


class MeteoraDense(nn.Module):
    features: int
    meteora: MeteoraConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, routing: Routing | None = None) -> jax.Array:
        cfg, routing = self.meteora, routing or Routing()
        in_features = x.shape[-1]
        kernel = self.param("kernel", weight_init, (in_features, self.features), self.param_dtype)
        y = jnp.einsum("...I,IO->...O", x.astype(self.dtype), kernel.astype(self.dtype))
        bank = AdapterBank(cfg, in_features, self.features, self.param_dtype, name="meteora")()
        if routing.adapters_off:
            return y

        flat = x.reshape(-1, in_features).astype(self.dtype)
        lora_a, lora_b = bank["lora_a"].astype(self.dtype), bank["lora_b"].astype(self.dtype)
        strategy = routing.strategy or cfg.strategy
        # `fused` only for prompts: their tokens route in runs, a batch of decode steps does not.
        if strategy == "auto" and routing.inference and x.ndim >= 3 and x.shape[-2] > 1:
            shape = (in_features, self.features)
            if pick_strategy(cfg.num_adapters, cfg.rank, flat.shape[0], flat.dtype, shape) == "fused":
                strategy = "fused"
        if routing.force_adapter is None and routing.assignment is None:
            # The temperature is a static Python float (Routing keeps it out of the traced values), as the
            # `pallas` decode kernels need.
            out, gate_logits, indices = gated_output(
                flat, y.reshape(-1, self.features), bank["gate"], lora_a, lora_b, bank["scaling"],
                routing.top_k or cfg.top_k, routing.temperature or cfg.temperature, strategy,
                base_kernel=kernel.astype(self.dtype),
            )
        else:
            gate_logits = compute_gate_logits(flat, bank["gate"])
            indices, weights = self._choose(gate_logits, routing)
            if strategy == "fused":
                out = fused_output(flat, kernel.astype(self.dtype), lora_a, lora_b, bank["scaling"], indices, weights)
            else:
                delta = lora_mixture(flat, lora_a, lora_b, bank["scaling"], indices, weights, strategy)
                out = y.reshape(-1, self.features) + delta.astype(y.dtype)
        self.sow("intermediates", "gate_logits", gate_logits.reshape(*x.shape[:-1], cfg.num_adapters))
        self.sow("intermediates", "adapter_indices", indices.reshape(*x.shape[:-1], -1))
        return out.reshape(y.shape)

    @staticmethod
    def _choose(gate_logits: jax.Array, routing: Routing) -> tuple[jax.Array, jax.Array]:
        """Indices and weights of forced routing: one adapter for all tokens, or a per-token assignment."""
        m, n = gate_logits.shape
        if routing.force_adapter is not None:
            if not 0 <= routing.force_adapter < n:
                raise ValueError(f"force_adapter={routing.force_adapter} is not an adapter index (0..{n - 1})")
            return jnp.full((m, 1), routing.force_adapter, jnp.int32), jnp.ones((m, 1), jnp.float32)
        chosen = routing.assignment.reshape(m, 1).astype(jnp.int32)
        try:
            top = int(chosen.max(initial=-1))
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):  # traced under jit
            top = -1  # checked by the mask below
        if top >= n:
            raise ValueError(f"assignment holds adapter {top}; the adapter indices are 0..{n - 1}")
        # -1 means "no adapter": any index with weight 0 contributes nothing. Under jit an index past the
        # adapters (which cannot raise there) routes nowhere too, rather than reading past the stack.
        valid = (chosen >= 0) & (chosen < n)
        return jnp.where(valid, chosen, 0), valid.astype(jnp.float32)


class AdapterBank(nn.Module):
    """Holds the stacked adapters and the gate of one projection under the `meteora` scope."""

    config: MeteoraConfig
    in_features: int
    out_features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        n, r = self.config.num_adapters, self.config.rank
        return {
            "lora_a": self.param("lora_a", weight_init, (n, self.in_features, r), self.param_dtype),
            # Zero B, as PEFT initialises it: a fresh bank leaves the base model's function unchanged.
            "lora_b": self.param("lora_b", nn.initializers.zeros, (n, r, self.out_features), self.param_dtype),
            "scaling": self.param("scaling", nn.initializers.ones, (n,), jnp.float32),
            "gate": self.param(
                "gate", nn.initializers.normal(self.config.gate_init_std), (self.in_features, n), jnp.float32
            ),
        }


@dataclasses.dataclass(frozen=True)
class MeteoraLinear:
    """Linear-layer factory: MeteoRA layers for the configured targets, plain ones elsewhere."""

    config: MeteoraConfig

    def __call__(self, *, name, layer_index, features, dtype, param_dtype) -> nn.Module:
        del layer_index
        if name in self.config.targets:
            return MeteoraDense(features, self.config, dtype=dtype, param_dtype=param_dtype, name=name)
        return Linear(features, dtype=dtype, param_dtype=param_dtype, name=name)
