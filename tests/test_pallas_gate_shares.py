"""The Pallas gate matmul (meteora_jax/pallas/gate_shares.py) against XLA's shares: interpreted on CPU, full size
on a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax.gate_logits import gate_logit_shares
from meteora_jax.pallas.gate_shares import (
    MAX_SPLITS,
    TARGET_PROGRAMS,
    GateSharesBlockSizes,
    gate_shares_matmul,
    gate_shares_reference,
    input_split_count,
)

ON_GPU = jax.default_backend() == "gpu"
SMALL = GateSharesBlockSizes(block_tokens=16, block_columns=16, block_in=16, num_warps=4, num_stages=2)


def rel_error(ours, ref):
    return float(jnp.linalg.norm(ours - ref) / jnp.linalg.norm(ref))


def problem(seed, t, i, n, gate_dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, i)), jnp.bfloat16)
    gate = jnp.asarray(rng.standard_normal((i, n)) * i**-0.5, gate_dtype)
    return x, gate


def kernel_shares(x, gate, splits, blocks, interpret=not ON_GPU):
    matmul = functools.partial(gate_shares_matmul, blocks=blocks, interpret=interpret)
    return gate_logit_shares(x, gate, splits, matmul)


# 37 tokens and 6 or 20 adapters: blocks of tokens and of columns run past the ends; a float32 gate rides as two
# parts (2N columns); 5 tokens: fewer than the matmul's padding rows.
@pytest.mark.parametrize("t, n, splits", [(37, 6, 1), (37, 20, 2), (5, 6, 4), (64, 16, 2)])
@pytest.mark.parametrize("gate_dtype", [jnp.float32, jnp.bfloat16])
def test_matches_xla_shares_interpreted(t, n, splits, gate_dtype):
    x, gate = problem(t + n, t, 128, n, gate_dtype)
    ours = kernel_shares(x, gate, splits, SMALL)
    ref = gate_shares_reference(x, gate, splits)
    assert ours.shape == ref.shape
    assert rel_error(ours, ref) < 1e-6


def test_gradients_are_the_shares_own():
    x, gate = problem(1, 37, 128, 6, jnp.float32)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((37, 4, 6)), jnp.float32)

    def loss(shares_of):
        return lambda x, g: jnp.sum(shares_of(x, g) * cotangent)

    ours = jax.grad(loss(lambda x, g: kernel_shares(x, g, 2, SMALL)), argnums=(0, 1))(x, gate)
    ref = jax.grad(loss(lambda x, g: gate_shares_reference(x, g, 2)), argnums=(0, 1))(x, gate)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)


def test_bad_operands_name_the_culprit():
    x, gate = problem(3, 16, 128, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="must be bfloat16 and agree on the input features"):
        gate_shares_matmul(x, gate[:64], input_splits=1, blocks=SMALL, interpret=True)
    with pytest.raises(ValueError, match="must be bfloat16"):
        gate_shares_matmul(x.astype(jnp.float32), gate, input_splits=1, blocks=SMALL, interpret=True)
    with pytest.raises(ValueError, match="input_splits=3 slices of 16-input steps must tile the 128 input features"):
        gate_shares_matmul(x, gate, input_splits=3, blocks=SMALL, interpret=True)
    with pytest.raises(ValueError, match="input_splits=0 slices"):
        gate_shares_matmul(x, gate, input_splits=0, blocks=SMALL, interpret=True)
    with pytest.raises(ValueError, match="block_columns=24 must be a power of two"):
        gate_shares_matmul(x, gate, input_splits=1, blocks=GateSharesBlockSizes(block_columns=24), interpret=True)


@pytest.mark.parametrize("tokens, columns, in_features", [
    (1, 28, 4096), (1024, 1024, 4096), (1024, 256, 4096), (2048, 256, 4096), (2048, 2048, 4096), (1024, 256, 192),
])
def test_split_count_fills_the_programs_within_its_limits(tokens, columns, in_features):
    blocks = GateSharesBlockSizes()
    splits = input_split_count(tokens, columns, in_features, blocks)
    tiles = -(-tokens // blocks.block_tokens) * -(-columns // blocks.block_columns)
    assert 1 <= splits <= MAX_SPLITS and in_features % (splits * blocks.block_in) == 0
    assert splits == 1 or tiles * splits <= TARGET_PROGRAMS
    doubled = splits * 2
    assert (doubled > MAX_SPLITS or tiles * doubled > TARGET_PROGRAMS or in_features % (doubled * blocks.block_in))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("t, n", [(1024, 1024), (2048, 256), (1000, 28)])
def test_full_size_on_gpu(t, n):
    for gate_dtype in (jnp.bfloat16, jnp.float32):
        x, gate = problem(n, t, 4096, n, gate_dtype)
        columns = n * (1 if gate_dtype == jnp.bfloat16 else 2)
        splits = input_split_count(t, columns, 4096, GateSharesBlockSizes())
        ours = jax.jit(lambda x, g, s=splits: kernel_shares(x, g, s, GateSharesBlockSizes(), interpret=False))(x, gate)
        # float32 sums over 4096 inputs in another order than cuBLAS: ~3e-6 apart on an H100
        assert rel_error(ours, gate_shares_reference(x, gate, splits)) < 2e-5
