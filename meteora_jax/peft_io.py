"""Hugging Face PEFT LoRA adapters: read them into stacked MeteoRA banks, and write one back out."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meteora_jax.config import LlamaConfig
from meteora_jax.hf_weights import projection_shapes
from meteora_jax.layers import PROJECTION_PARENT, PROJECTIONS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight"
)


@dataclasses.dataclass
class LoraAdapter:
    """One PEFT LoRA adapter, per (layer, projection): A [in, r], B [r, out] in our layout, and its scaling."""

    name: str
    source: str
    config: dict[str, Any]
    a: dict[tuple[int, str], np.ndarray]
    b: dict[tuple[int, str], np.ndarray]
    scaling: dict[tuple[int, str], float]

    @property
    def max_rank(self) -> int:
        return max(a.shape[1] for a in self.a.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(p for p in PROJECTIONS if any(proj == p for _, proj in self.a))


def read_peft_adapter(name: str, path: str | Path, base: LlamaConfig) -> LoraAdapter:
    """Reads and checks one adapter directory against the base model; errors name adapter and tensor."""
    path = Path(path)
    where = f"adapter {name!r} ({path})"
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: directory not found")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{where}: missing {ADAPTER_CONFIG}")
    config = json.loads(config_path.read_text())
    _check_lora_config(config, where)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ValueError(
                f"{where}: only adapter_model.bin found; convert it to safetensors first "
                "(PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
            )
        raise FileNotFoundError(f"{where}: missing {ADAPTER_WEIGHTS}")
    tensors = _read_safetensors(weights, where)

    a, b = {}, {}
    for key, value in tensors.items():
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{where}: tensor {key!r} is a DoRA magnitude; only plain LoRA is supported")
        match = _KEY.fullmatch(key)
        if match is None or match[3] not in PROJECTIONS or PROJECTION_PARENT[match[3]] != match[2]:
            raise ValueError(f"{where}: tensor {key!r} targets a module MeteoRA's LLaMA model does not have")
        layer, proj = int(match[1]), match[3]
        if layer >= base.num_hidden_layers:
            raise ValueError(f"{where}: tensor {key!r} is for layer {layer}; the base has {base.num_hidden_layers}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: tensor {key!r} contains NaN or Inf")
        # PEFT stores nn.Linear weights [out, in]; our kernels are [in, out].
        (a if match[4] == "A" else b)[(layer, proj)] = np.ascontiguousarray(value.astype(np.float32).T)

    if not a:
        raise ValueError(f"{where}: no LoRA tensors found in {ADAPTER_WEIGHTS}")
    if set(a) != set(b):
        lonely = sorted(set(a) ^ set(b))[0]
        raise ValueError(f"{where}: layer {lonely[0]} {lonely[1]} has only one of lora_A / lora_B")
    scaling = {}
    for (layer, proj), a_mat in a.items():
        module = f"model.layers.{layer}.{PROJECTION_PARENT[proj]}.{proj}"
        in_dim, out_dim = projection_shapes(base)[proj]
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        b_mat = b[(layer, proj)]
        if a_mat.shape != (in_dim, rank) or b_mat.shape != (rank, out_dim):
            raise ValueError(
                f"{where}: {module} has lora_A {a_mat.shape[::-1]} and lora_B {b_mat.shape[::-1]} (PEFT layout); "
                f"the base model and r={rank} need lora_A {(rank, in_dim)} and lora_B {(out_dim, rank)}"
            )
        scaling[(layer, proj)] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraAdapter(name, str(path), config, a, b, scaling)


def stack_adapters(adapters: Sequence[LoraAdapter], base: LlamaConfig) -> tuple[dict[str, Any], int, tuple[str, ...]]:
    """Stacks adapters (order = gate index) into per-projection banks, zero-padded to the largest rank.

    Returns (bank tree without gates, rank, targets). A projection some adapter does not target is
    zero for it (scaling 0) and it stays a routing candidate there.
    """
    names = [a.name for a in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate adapter names: {duplicates}")
    if not adapters:
        raise ValueError("no adapters given")
    rank = max(a.max_rank for a in adapters)
    targets = tuple(p for p in PROJECTIONS if any(p in a.targets for a in adapters))
    n = len(adapters)
    tree: dict[str, Any] = {}
    for layer in range(base.num_hidden_layers):
        for proj in targets:
            in_dim, out_dim = projection_shapes(base)[proj]
            lora_a = np.zeros((n, in_dim, rank), np.float32)
            lora_b = np.zeros((n, rank, out_dim), np.float32)
            scaling = np.zeros((n,), np.float32)
            for j, adapter in enumerate(adapters):
                if (layer, proj) in adapter.a:
                    r = adapter.a[(layer, proj)].shape[1]
                    lora_a[j, :, :r] = adapter.a[(layer, proj)]
                    lora_b[j, :r, :] = adapter.b[(layer, proj)]
                    scaling[j] = adapter.scaling[(layer, proj)]
            put_bank(tree, layer, proj, {"lora_a": lora_a, "lora_b": lora_b, "scaling": scaling})
    return tree, rank, targets


def put_bank(tree: dict[str, Any], layer: int, proj: str, bank: dict[str, Any]) -> None:
    """Places one projection's bank where the model keeps it: layers_i/<parent>/<proj>/meteora."""
    tree.setdefault(f"layers_{layer}", {}).setdefault(PROJECTION_PARENT[proj], {})[proj] = {"meteora": bank}


def export_peft_adapter(banks: Mapping[str, Any], index: int, adapter_entry: Mapping[str, Any], out: Path) -> None:
    """Writes adapter `index` of the banks as a PEFT LoRA directory (its own rank, not the padded one)."""
    from safetensors.numpy import save_file

    config = dict(adapter_entry["peft_config"])
    tensors = {}
    for layer, proj in map(tuple, adapter_entry["modules"]):
        bank = banks[f"layers_{layer}"][PROJECTION_PARENT[proj]][proj]["meteora"]
        module = f"model.layers.{layer}.{PROJECTION_PARENT[proj]}.{proj}"
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        prefix = f"base_model.model.{module}"
        a = np.asarray(bank["lora_a"][index, :, :rank], np.float32)
        b = np.asarray(bank["lora_b"][index, :rank, :], np.float32)
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, out / ADAPTER_WEIGHTS)


def _check_lora_config(config: dict[str, Any], where: str) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters")
    if config.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters (use_dora=true) are not supported; only plain LoRA")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} adapters train biases, which MeteoRA cannot mix")
    if config.get("lora_bias"):
        raise ValueError(f"{where}: lora_bias=true adds a bias to lora_B, which MeteoRA does not mix")
    if config.get("layer_replication"):
        raise ValueError(f"{where}: layer_replication changes the base model's layers; unsupported")
    if config.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save={config['modules_to_save']} fully fine-tunes modules; unsupported")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{where}: {ADAPTER_CONFIG} has no {key!r}")


def _read_safetensors(path: Path, where: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{where}: cannot read {path.name}: {e}") from e


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module name by suffix regex.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
