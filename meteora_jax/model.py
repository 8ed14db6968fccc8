"""Flax LLaMA-family causal language model with an explicit KV cache.

Axis letters in einsums: B batch, T query tokens, S key slots, D hidden, K key-value heads,
G query heads per key-value head, H head size, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from meteora_jax.config import LlamaConfig
from meteora_jax.layers import LinearFactory, RMSNorm, dense_linear, weight_init
from meteora_jax.rope import apply_rotary, inverse_frequencies, rotary_tables
from meteora_jax.routing import Routing

# Finite, so that a query row with every key masked (a padding token) gives uniform weights, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class KVCache:
    """Keys and values of every layer, written left to right; slot `index` is the next free one."""

    keys: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    values: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    key_valid: jax.Array  # [B, S] bool: slot holds a real (not padding) token
    index: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_len: int) -> KVCache:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_hidden_layers))
        return cls(
            keys=zeros,
            values=tuple(jnp.zeros_like(z) for z in zeros),
            key_valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


class Attention(nn.Module):
    config: LlamaConfig
    layer_index: int
    linear: LinearFactory

    def _proj(self, name: str, features: int) -> nn.Module:
        cfg = self.config
        return self.linear(
            name=name,
            layer_index=self.layer_index,
            features=features,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
        )

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, index, routing):
        cfg = self.config
        b, t, _ = x.shape
        n_kv, group, hs = cfg.num_key_value_heads, cfg.num_query_groups, cfg.head_dim
        q = self._proj("q_proj", cfg.num_attention_heads * hs)(x, routing).reshape(b, t, n_kv * group, hs)
        k = self._proj("k_proj", n_kv * hs)(x, routing).reshape(b, t, n_kv, hs)
        v = self._proj("v_proj", n_kv * hs)(x, routing).reshape(b, t, n_kv, hs)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv = (k, v)
        q = q.reshape(b, t, n_kv, group, hs)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores * (hs**-0.5)
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n_kv * group * hs)
        return self._proj("o_proj", cfg.hidden_size)(out.astype(x.dtype), routing), kv


class MLP(nn.Module):
    config: LlamaConfig
    layer_index: int
    linear: LinearFactory

    @nn.compact
    def __call__(self, x, routing):
        cfg = self.config
        common = dict(layer_index=self.layer_index, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        gate = self.linear(name="gate_proj", features=cfg.intermediate_size, **common)(x, routing)
        up = self.linear(name="up_proj", features=cfg.intermediate_size, **common)(x, routing)
        return self.linear(name="down_proj", features=cfg.hidden_size, **common)(nn.silu(gate) * up, routing)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    layer_index: int
    linear: LinearFactory

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, index, routing):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
        h = RMSNorm(**norm, name="input_layernorm")(x)
        attention = Attention(cfg, self.layer_index, self.linear, name="self_attn")
        attn, kv = attention(h, cos, sin, mask, kv, index, routing)
        x = x + attn
        h = RMSNorm(**norm, name="post_attention_layernorm")(x)
        return x + MLP(cfg, self.layer_index, self.linear, name="mlp")(h, routing), kv


class LlamaForCausalLM(nn.Module):
    """LLaMA decoder; parameter names follow Hugging Face (`layers_3/self_attn/q_proj/kernel`)."""

    config: LlamaConfig
    linear: LinearFactory = dense_linear

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        padding_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        segment_ids: jax.Array | None = None,
        routing: Routing | None = None,
        last_logits_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] (or [B, 1, V]) in float32, and the cache with these tokens appended.

        tokens: [B, T] ids. padding_mask: [B, T], False on (left) padding. With a cache, the
        tokens are written at `cache.index` and attend to everything cached before them; a call
        that would run past the cache's end returns NaN logits.
        segment_ids: [B, T] for packed rows (no cache): 1, 2, ... per example, 0 on padding; a token
        attends only within its segment and positions restart at each segment.
        routing: call-time MeteoRA settings (top-k, temperature, strategy, forcing), passed
        unchanged to every projection.
        """
        cfg = self.config
        b, t = tokens.shape
        if segment_ids is not None:
            if cache is not None or padding_mask is not None:
                raise ValueError("segment_ids replaces padding_mask and is for cache-free (training) calls")
            padding_mask = segment_ids > 0
        if padding_mask is None:
            padding_mask = jnp.ones((b, t), bool)
        padding_mask = padding_mask.astype(bool)
        if cache is None:
            if t > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {t} exceeds max_position_embeddings={cfg.max_position_embeddings}")
            index = jnp.zeros((), jnp.int32)
            key_valid = padding_mask
            seen = jnp.zeros((b,), jnp.int32)
        else:
            if t > cache.max_len:
                raise ValueError(f"{t} new tokens do not fit a KV cache of {cache.max_len} slots")
            index = cache.index
            seen = jnp.sum(cache.key_valid, axis=1, dtype=jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.key_valid, padding_mask, (0, index))
        positions = jnp.maximum(seen[:, None] + jnp.cumsum(padding_mask, axis=1, dtype=jnp.int32) - 1, 0)
        query_slot = index + jnp.arange(t)
        key_slot = jnp.arange(key_valid.shape[1])
        mask = key_valid[:, None, :] & (key_slot[None, None, :] <= query_slot[None, :, None])  # [B, T, S]
        if segment_ids is not None:
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
            positions = _positions_in_segments(segment_ids)
        cos, sin = rotary_tables(positions, inverse_frequencies(cfg))

        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=weight_init, param_dtype=cfg.weight_dtype,
            name="embed_tokens",
        )
        x = embed(tokens).astype(cfg.compute_dtype)
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        new_keys, new_values = [], []
        for i in range(cfg.num_hidden_layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer_cls(cfg, i, self.linear, name=f"layers_{i}")(x, cos, sin, mask, kv, index, routing)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        x = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, name="norm")(x)
        if last_logits_only:
            x = x[:, -1:]
        if cfg.tie_word_embeddings:
            head = embed.embedding.T
        else:
            head = self.param("lm_head", weight_init, (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)
        logits = jnp.einsum("BTD,DV->BTV", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
        if cache is not None:
            # index is traced, so an overflow cannot raise; NaN logits make it loud instead of letting
            # dynamic_update_slice shift the write back over earlier tokens.
            logits = jnp.where(index + t > cache.max_len, jnp.nan, logits)
            cache = KVCache(tuple(new_keys), tuple(new_values), key_valid, index + t)
        return logits, cache


def _positions_in_segments(segment_ids: jax.Array) -> jax.Array:
    """0, 1, 2, ... restarting wherever the segment id changes along each row."""
    steps = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return steps - jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)
