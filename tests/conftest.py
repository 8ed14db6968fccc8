"""Shared fixtures: tiny LLaMA configs and Hugging Face reference models built from them."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng()
