"""Model checkpoints on disk: an orbax parameter tree, config.json and the tokenizer, written atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from meteora_jax.config import LlamaConfig
from meteora_jax.model import LlamaForCausalLM

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


@dataclasses.dataclass
class LoadedModel:
    config: LlamaConfig
    module: LlamaForCausalLM
    params: dict[str, Any]
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint has none


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh directory beside `out` that replaces `out` only if the block succeeds."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                staging.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_params(directory: Path, params: dict[str, Any]) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory.absolute() / PARAMS_DIR, params)
    checkpointer.wait_until_finished()


def read_params(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"no parameter checkpoint at {path}")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    # Restore onto the default device with the stored dtypes, whatever devices saved it.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    return checkpointer.restore(path, target)


def save_model(
    out: str | os.PathLike,
    params: dict[str, Any],
    config: LlamaConfig,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes a checkpoint directory readable by `load_model`; nothing appears at `out` on failure."""
    with atomic_directory(out, overwrite) as staging:
        write_params(staging, params)
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(out)


def load_model(path: str | os.PathLike, *, dtype: str | None = None, **config_overrides) -> LoadedModel:
    """Reads a checkpoint written by `save_model` or the converters.

    dtype: compute dtype ("float32", "bfloat16"); parameters keep their stored dtype.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    params = read_params(path)
    stored_dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name
    overrides = {"param_dtype": stored_dtype, "dtype": dtype or stored_dtype, **config_overrides}
    config = LlamaConfig.from_json_file(path / CONFIG_FILE, **overrides)
    return LoadedModel(config, LlamaForCausalLM(config), params, _load_tokenizer(path))


def _load_tokenizer(path: Path):
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))
