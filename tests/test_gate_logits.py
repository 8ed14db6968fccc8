"""The gate's logits as shares (meteora_jax/gate_logits.py): their sum, their gradients, the split rule, and the
Pallas strategies' routing on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax.gate_logits import (
    MAX_INPUT_SPLITS,
    SPLIT_MIN_TOKENS,
    SPLIT_TARGET_PROGRAMS,
    SPLIT_TILE,
    compute_gate_logits,
    gate_input_splits,
    gate_logit_shares,
    split_in_two,
    summed_shares,
)
from meteora_jax.lora_mixture import route


def rel_error(ours, ref):
    return float(jnp.linalg.norm(jnp.asarray(ours, jnp.float32) - ref) / jnp.linalg.norm(ref))


def problem(seed, m=24, i=256, n=6, gate_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, i)), jnp.bfloat16)
    gate = jnp.asarray(rng.standard_normal((i, n)) * i**-0.5, gate_dtype)
    return x, gate


def exact(x, gate):
    return jnp.dot(x.astype(jnp.float32), gate.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize("gate_dtype", [jnp.float32, jnp.bfloat16])
def test_shares_add_up_to_the_logits(splits, gate_dtype):
    x, gate = problem(splits, gate_dtype=gate_dtype)
    shares = gate_logit_shares(x, gate, splits)
    parts = 1 if gate_dtype == jnp.bfloat16 else 2  # a float32 gate rides as hi and lo bfloat16 parts
    assert shares.shape == (x.shape[0], splits * parts, gate.shape[1]) and shares.dtype == jnp.float32
    assert rel_error(summed_shares(shares), exact(x, gate)) < 1e-5
    # Each share is one slice of the inputs times one part.
    width = x.shape[1] // splits
    first_slice = exact(x[:, :width], gate[:width])
    assert rel_error(summed_shares(shares[:, :parts]), first_slice) < 1e-5


def test_float32_inputs_make_one_exact_share():
    x, gate = problem(0)
    shares = gate_logit_shares(x.astype(jnp.float32), gate, 4)
    assert shares.shape == (x.shape[0], 1, gate.shape[1])
    assert rel_error(shares[:, 0], exact(x, gate)) < 1e-6


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_each_share_takes_its_own_cotangent_in_float32(splits):
    """Any cotangent per share, not only the equal ones the routing kernel gives: share (s, p) is slice s of x times
    part p of the gate, and only the lo part (gate - hi) varies with the gate."""
    x, gate = problem(10 + splits, m=5)  # fewer tokens than the matmul's padding rows
    cotangent = jnp.asarray(np.random.default_rng(splits).standard_normal((5, splits, 2, 6)), jnp.float32)
    ours = jax.grad(lambda x, g: jnp.sum(gate_logit_shares(x, g, splits) * cotangent.reshape(5, -1, 6)),
                    argnums=(0, 1))(x, gate)
    width = x.shape[1] // splits
    hi = jax.lax.stop_gradient(split_in_two(gate)[0].astype(jnp.float32))

    def reference(x, g):
        parts = (hi, g - hi)
        return sum(jnp.sum(exact(x[:, s * width:(s + 1) * width], part[s * width:(s + 1) * width]) * cotangent[:, s, p])
                   for s in range(splits) for p, part in enumerate(parts))

    ref = jax.grad(reference, argnums=(0, 1))(x.astype(jnp.float32), gate)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
    assert rel_error(ours[0], ref[0]) < 1e-2
    assert rel_error(ours[1], ref[1]) < 1e-6


def test_compute_gate_logits_is_the_sum_of_one_slice():
    x, gate = problem(3)
    np.testing.assert_array_equal(compute_gate_logits(x, gate), summed_shares(gate_logit_shares(x, gate)))


def test_bad_operands_and_splits_are_named():
    x, gate = problem(4)
    with pytest.raises(ValueError, match="input_splits=3 must be >= 1 and divide the 256 input features"):
        gate_logit_shares(x, gate, 3)
    with pytest.raises(ValueError, match="input_splits=0 must be >= 1"):
        gate_logit_shares(x, gate, 0)
    with pytest.raises(ValueError, match=r"x \(24, 256\) must be \[tokens, inputs\] and the gate \(64, 6\)"):
        gate_logit_shares(x, gate[:64], 2)
    with pytest.raises(ValueError, match=r"x \(24, 256, 1\) must be"):
        gate_logit_shares(x[..., None], gate)


@pytest.mark.parametrize("tokens, adapters, in_features", [
    (1, 256, 4096), (SPLIT_MIN_TOKENS - 1, 256, 4096), (1024, 256, 4096), (2048, 256, 4096), (4096, 256, 4096),
    (8192, 256, 4096), (1024, 1024, 4096), (4096, 28, 4096), (16384, 1024, 4096), (4096, 256, 384), (4096, 256, 100),
])
def test_split_rule_fills_the_programs_within_its_limits(tokens, adapters, in_features):
    splits = gate_input_splits(tokens, adapters, in_features)
    tiles = -(-tokens // SPLIT_TILE) * -(-adapters // SPLIT_TILE)
    assert 1 <= splits <= MAX_INPUT_SPLITS
    assert splits == 1 or in_features % (splits * SPLIT_TILE) == 0
    if tokens < SPLIT_MIN_TOKENS or tiles >= SPLIT_TARGET_PROGRAMS:
        assert splits == 1
    else:
        assert tiles * splits <= SPLIT_TARGET_PROGRAMS
        doubled = splits * 2
        assert (doubled > MAX_INPUT_SPLITS or tiles * doubled > SPLIT_TARGET_PROGRAMS
                or in_features % (doubled * SPLIT_TILE) != 0)


@pytest.mark.parametrize("m", [1024, 4096])
@pytest.mark.parametrize("gate_dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_strategies_route_on_the_shares_as_xla_on_the_logits(m, gate_dtype):
    """Up to PALLAS_GATE_MAX_TOKENS the Pallas gate kernel makes the shares, beyond it XLA's matmul over split
    inputs; the routing kernel adds them and chooses as `route` does on their sum, the logits the layer returns."""
    from meteora_jax.lora_mixture import PALLAS_GATE_MAX_TOKENS, _gate_and_route

    x, gate = problem(5, m=m, i=512, n=12, gate_dtype=gate_dtype)
    assert (m <= PALLAS_GATE_MAX_TOKENS) == (m == 1024) and gate_input_splits(4096, 12, 512) > 1
    logits, indices, weights = _gate_and_route("fused", x, gate, 2, 0.8)
    assert rel_error(logits, exact(x, gate)) < 1e-5
    ref_indices, ref_weights = route(logits, 2, 0.8)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
