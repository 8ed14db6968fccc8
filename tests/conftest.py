"""Shared fixtures: tiny LLaMA configs and Hugging Face reference models built from them."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# Mosaic GPU's interpret mode (the fused strategy's GEMM) runs each simulated warpgroup as a CPU computation that
# waits on the others at barriers, and its callbacks dispatch JAX ops; under async dispatch those computations
# share the CPU client's small pool on a 2-core machine, and one CI run deadlocked there. Inline execution gives
# each its own thread.
jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng()


@pytest.fixture(scope="session")
def smollm2_gguf():
    from meteora_jax.embedded import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"real-model test needs the embedded SmolLM2 wheel: {e}")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own float32 load of the same GGUF: the reference for the real-model tests."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory):
    from meteora_jax.convert_llama import convert_llama

    return convert_llama(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "ckpt", progress=False)
