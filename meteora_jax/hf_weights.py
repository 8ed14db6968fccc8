"""Name map between Hugging Face LLaMA tensors and our parameter tree, both ways.

One table of (HF name, parameter path, layout) rows, expanded per layer and checked against
shapes derived from the config, so a missing, extra or mis-shaped tensor is named in the error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from meteora_jax.config import LlamaConfig
from meteora_jax.layers import PROJECTION_PARENT

# Tensors Hugging Face checkpoints may carry that are buffers, not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    path: tuple[str, ...]
    shape: tuple[int, ...]  # our layout
    transpose: bool  # HF Linear weights are [out, in]; our kernels are [in, out]


def projection_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each of the 7 projections."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }


def tensor_specs(config: LlamaConfig) -> list[TensorSpec]:
    d = config.hidden_size
    per_layer = [
        (f"{PROJECTION_PARENT[p]}.{p}", (PROJECTION_PARENT[p], p, "kernel"), shape, True)
        for p, shape in projection_shapes(config).items()
    ] + [
        ("input_layernorm", ("input_layernorm", "scale"), (d,), False),
        ("post_attention_layernorm", ("post_attention_layernorm", "scale"), (d,), False),
    ]
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (config.vocab_size, d), False)]
    for i in range(config.num_hidden_layers):
        for hf, path, shape, transpose in per_layer:
            specs.append(TensorSpec(f"model.layers.{i}.{hf}.weight", (f"layers_{i}", *path), shape, transpose))
    specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (d,), False))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), (d, config.vocab_size), True))
    return specs


def hf_to_params(
    tensors: Iterable[tuple[str, np.ndarray]], config: LlamaConfig, dtype: Any = None
) -> dict[str, Any]:
    """Builds our parameter tree from (HF name, array) pairs; `dtype` casts every tensor if given."""
    specs = {s.hf_name: s for s in tensor_specs(config)}
    params: dict[str, Any] = {}
    seen: set[str] = set()
    for name, array in tensors:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied checkpoint may still store the shared matrix under the head's name
        spec = specs.get(name)
        if spec is None:
            raise ValueError(f"unexpected tensor {name!r} with shape {tuple(array.shape)}: not part of a LLaMA model")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        hf_shape = spec.shape[::-1] if spec.transpose else spec.shape
        if tuple(array.shape) != hf_shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {hf_shape} from config")
        value = np.asarray(array)
        value = value.T if spec.transpose else value
        value = np.ascontiguousarray(value.astype(dtype) if dtype is not None else value)
        _set(params, spec.path, value)
        seen.add(name)
    missing = [n for n in specs if n not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"missing tensors: {shown}")
    return params


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Our parameter tree as a Hugging Face state dict (numpy arrays)."""
    out = {}
    for spec in tensor_specs(config):
        value = np.asarray(_get(params, spec.path))
        out[spec.hf_name] = np.ascontiguousarray(value.T if spec.transpose else value)
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
