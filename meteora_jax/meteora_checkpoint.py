"""MeteoRA checkpoints: the stacked adapters and gates of every layer, plus a manifest, beside a base checkpoint.

Layout of a MeteoRA checkpoint directory:
    params/        orbax tree {layers_i: {self_attn|mlp: {proj: {meteora: {lora_a, lora_b, scaling, gate}}}}}
    meteora.json   manifest: adapter names and order (= gate index), PEFT configs, rank, targets, defaults
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from meteora_jax.checkpoint import LoadedModel, atomic_directory, load_model, read_params, write_params
from meteora_jax.config import LlamaConfig
from meteora_jax.meteora import MeteoraConfig, MeteoraLinear
from meteora_jax.model import LlamaForCausalLM
from meteora_jax.peft_io import LoraAdapter, stack_adapters
from meteora_jax.trainable import merge_params

MANIFEST = "meteora.json"
FORMAT = "meteora-jax/1"
# How the gates may be held: float32 as trained and saved, bfloat16 for inference (cast_gates).
GATE_DTYPES = ("float32", "bfloat16")
_BASE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")


def build_banks(
    adapters: Sequence[LoraAdapter], base: LlamaConfig, *, gate_init_std: float = 0.02, seed: int = 0,
    gates_from: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stacks adapters and adds gates (normal init, or copied from `gates_from`). Returns (tree, manifest)."""
    tree, rank, targets = stack_adapters(adapters, base)
    rng = np.random.default_rng(seed)
    for path, bank in _banks(tree):
        in_dim = bank["lora_a"].shape[1]
        if gates_from is None:
            bank["gate"] = (rng.standard_normal((in_dim, len(adapters))) * gate_init_std).astype(np.float32)
            continue
        try:
            gate = np.asarray(_get(gates_from, path)["gate"], np.float32)
        except KeyError as e:
            raise ValueError(f"the gates checkpoint has no gate for {'/'.join(path)}") from e
        if gate.shape != (in_dim, len(adapters)):
            raise ValueError(f"gate for {'/'.join(path)} has shape {gate.shape}, expected {(in_dim, len(adapters))}")
        bank["gate"] = gate
    manifest = {
        "format": FORMAT,
        "num_adapters": len(adapters),
        "rank": rank,
        "targets": list(targets),
        "top_k": min(2, len(adapters)),
        "temperature": 1.0,
        "base": {k: getattr(base, k) for k in _BASE_KEYS},
        "adapters": [
            {"name": a.name, "source": a.source, "peft_config": a.config, "modules": sorted(map(list, a.a))}
            for a in adapters
        ],
    }
    return tree, manifest


def save_meteora(out: str | os.PathLike, tree: dict[str, Any], manifest: dict[str, Any], *, overwrite=False) -> Path:
    for key, value in traverse_util.flatten_dict(tree).items():
        if _is_gate(key) and jnp.dtype(value.dtype) != jnp.float32:
            raise ValueError(f"the gate at {'/'.join(key[:-2])} is {jnp.dtype(value.dtype).name}: checkpoints keep "
                             "the float32 gates (load with gate_dtype='float32'); bfloat16 copies are for inference")
    with atomic_directory(out, overwrite) as staging:
        write_params(staging, tree)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out)


def read_meteora(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bank tree, manifest) of a MeteoRA checkpoint directory."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"not a MeteoRA checkpoint: {path / MANIFEST} is missing")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown MeteoRA checkpoint format {manifest.get('format')!r}")
    return read_params(path), manifest


def meteora_config(manifest: dict[str, Any], **overrides) -> MeteoraConfig:
    fields = dict(
        num_adapters=manifest["num_adapters"], rank=manifest["rank"], targets=tuple(manifest["targets"]),
        top_k=manifest["top_k"], temperature=manifest["temperature"],
    )
    return MeteoraConfig(**{**fields, **overrides})


def load_meteora(base: str | os.PathLike, meteora: str | os.PathLike, *, dtype: str | None = None,
                 remat: bool = False, gate_dtype: str = "float32", **meteora_overrides) -> LoadedModel:
    """The base model with the MeteoRA banks of `meteora` in every targeted projection.

    gate_dtype: how the gates are held (see `cast_gates`); "bfloat16" is for inference only.
    meteora_overrides: MeteoraConfig fields (top_k, temperature, strategy) replacing the manifest's.
    """
    _check_gate_dtype(gate_dtype)
    loaded = load_model(base, dtype=dtype, remat=remat)
    tree, manifest = read_meteora(meteora)
    mismatched = {k: (v, getattr(loaded.config, k)) for k, v in manifest["base"].items()
                  if getattr(loaded.config, k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: adapters {a} vs base {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"MeteoRA checkpoint {meteora} was built for another base model ({detail})")
    config = meteora_config(manifest, **meteora_overrides)
    module = LlamaForCausalLM(loaded.config, linear=MeteoraLinear(config))
    return LoadedModel(loaded.config, module, merge_params(cast_gates(tree, gate_dtype), loaded.params),
                       loaded.tokenizer)


def cast_gates(params: dict[str, Any], dtype: str) -> dict[str, Any]:
    """`params` with every MeteoRA gate held in `dtype`; the other leaves are untouched.

    The layers compute in the gate's own precision: float32 gates (as trained and saved) give float32-accurate
    logits; bfloat16 gates halve the gate's bytes and give logits of the bfloat16 product, for inference with
    many adapters, where the gate is the largest read of a decode step (bench/NOTES.md). Near-ties between
    adapters may then route differently; train and save gates in float32.
    """
    _check_gate_dtype(dtype)
    flat = traverse_util.flatten_dict(params)
    if not any(map(_is_gate, flat)):
        raise ValueError("no MeteoRA gates (meteora/gate leaves) in the tree: is it a MeteoRA model?")
    gate_dtype = jnp.dtype(dtype)
    return traverse_util.unflatten_dict(
        {key: value.astype(gate_dtype) if _is_gate(key) else value for key, value in flat.items()}
    )


def _is_gate(key: tuple[str, ...]) -> bool:
    return key[-2:] == ("meteora", "gate")


def _check_gate_dtype(dtype: str) -> None:
    if dtype not in GATE_DTYPES:
        raise ValueError(f"gate_dtype={dtype!r}; choose one of {GATE_DTYPES}")


def split_banks(params: dict[str, Any]) -> dict[str, Any]:
    """The `meteora` subtrees of a full parameter tree (what a MeteoRA checkpoint stores)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "meteora":
            out[key] = value
        elif isinstance(value, dict):
            sub = split_banks(value)
            if sub:
                out[key] = sub
    return out


def _banks(tree: dict[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if key == "meteora":
            yield prefix, value
        elif isinstance(value, dict):
            yield from _banks(value, (*prefix, key))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree["meteora"]
