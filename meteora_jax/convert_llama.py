"""Imports a Hugging Face LLaMA directory (safetensors) or a GGUF file into our checkpoint format."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from meteora_jax.checkpoint import save_model
from meteora_jax.config import LlamaConfig
from meteora_jax.hf_weights import hf_to_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def convert_llama(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts `src` (HF model directory or .gguf file) into a checkpoint directory at `out`.

    dtype: parameter dtype to store ("float32", "bfloat16"); default keeps the source's
    (float32 for GGUF, which is dequantized).
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"source model not found: {src}")
    if src.is_file() and src.suffix == ".gguf":
        try:
            from meteora_jax.gguf_import import read_gguf
        except ImportError as e:
            raise ImportError("reading GGUF needs the gguf package: pip install 'meteora-jax[gguf]'") from e

        hf_config, state = read_gguf(src)
        tensors, count = iter(state.items()), len(state)
        tokenizer = _tokenizer(src.parent, gguf_file=src.name)
    elif src.is_dir():
        hf_config = _read_json(src / "config.json")
        files = _safetensors_files(src)
        tensors, count = _iter_safetensors(files), _count_tensors(files)
        tokenizer = _tokenizer(src) if any((src / f).exists() for f in TOKENIZER_FILES) else None
    else:
        raise ValueError(f"{src} is neither a Hugging Face model directory nor a .gguf file")
    config = LlamaConfig.from_hf_dict(hf_config)
    bar = tqdm(tensors, total=count, desc=f"converting {src.name}", unit="tensor", disable=not progress)
    params = hf_to_params(bar, config, dtype=np.dtype(dtype) if dtype else None)
    stored = next(iter(params["norm"].values())).dtype
    config = config.replace(param_dtype=str(stored), dtype=str(stored))
    return save_model(out, params, config, tokenizer, overwrite=overwrite)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    with open(path) as f:
        return json.load(f)


def _safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        files = [src / n for n in names]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} named in {index.name} is missing from {src}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        if any(src.glob("*.bin")):
            raise ValueError(
                f"{src} holds PyTorch .bin weights only; convert them to safetensors first "
                "(e.g. model.save_pretrained(dir, safe_serialization=True) in transformers)"
            )
        raise FileNotFoundError(f"no *.safetensors weights in {src}")
    return files


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError for truncated or corrupt files
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e


def _count_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        with _open(path) as f:
            total += len(list(f.keys()))
    return total


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                try:
                    yield name, f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from e


def _tokenizer(directory: Path, **kwargs):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)
