"""Per-token gradients of the routed adapters (meteora_jax/pallas/pair_grads.py) against the float32 VJP of the
plain reference: interpreted on CPU, full size on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax.pallas.missed_add import MissedAddBlockSizes, missed_add_reference
from meteora_jax.pallas.pair_grads import pair_adapter_grads, pair_input_grads, pair_input_grads_reference

ON_GPU = jax.default_backend() == "gpu"


def rel_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def pairs(share, t=300, i=48, o=80, n=5, r=4, dtype=jnp.float32, seed=7):
    """Operands where a `share` of the (token, choice) pairs has a nonzero coefficient."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    x, a, b = normal((t, i)), normal((n, i, r), i**-0.5), normal((n, r, o), r**-0.5)
    indices = jnp.asarray(rng.integers(0, n, (t, 2)), jnp.int32)
    coef = jnp.asarray(rng.standard_normal((t, 2)) * (rng.random((t, 2)) < share), jnp.float32)
    return x, a, b, indices, coef, normal((t, o))


# i = 48, o = 80 with 32-feature blocks: the last block of each runs past the edge.
@pytest.mark.parametrize("share, programs", [(0.0, 7), (0.05, 1), (0.05, 64), (0.6, 7)])
def test_nonzero_pairs_match_reference_interpreted(share, programs):
    x, a, b, indices, coef, g = pairs(share)
    blocks = MissedAddBlockSizes(programs=programs, block_in=32, block_out=32)
    dx, dcoef = pair_input_grads(x, a, b, indices, coef, g, blocks=blocks, interpret=not ON_GPU)
    ref_dx, ref_dcoef = pair_input_grads_reference(x, a, b, indices, coef, g)
    visited = np.asarray(coef != 0)
    np.testing.assert_array_equal(np.asarray(dcoef)[~visited], 0)  # pairs of a zero coefficient are not visited
    np.testing.assert_array_equal(np.asarray(dx)[~visited.any(axis=1)], 0)
    if share:
        assert rel_error(dx, ref_dx) < 1e-5
        np.testing.assert_allclose(np.asarray(dcoef)[visited], np.asarray(ref_dcoef)[visited], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t, i, o, r", [(1, 16, 16, 4), (37, 100, 24, 8), (64, 48, 80, 64)])
def test_any_shape_matches_reference_interpreted(t, i, o, r):
    x, a, b, indices, coef, g = pairs(1.0, t=t, i=i, o=o, r=r)
    dx, dcoef = pair_input_grads(x, a, b, indices, coef, g,
                                 blocks=MissedAddBlockSizes(programs=16, block_in=32, block_out=16),
                                 interpret=not ON_GPU)
    ref_dx, ref_dcoef = pair_input_grads_reference(x, a, b, indices, coef, g)
    assert rel_error(dx, ref_dx) < 1e-5
    assert rel_error(dcoef, ref_dcoef) < 1e-5


def test_mismatched_shapes_name_the_operands():
    x, a, b, indices, coef, g = pairs(0.1)
    with pytest.raises(ValueError, match=r"shape mismatch: x \(300, 48\).*g \(300, 79\)"):
        pair_input_grads(x, a, b, indices, coef, g[:, :79], interpret=True)


@pytest.mark.parametrize("share", [0.0, 0.05, 0.6])  # 0.6: 360 of 600 pairs, two steps of the loop
def test_adapter_grads_match_reference_over_the_nonzero_pairs(share):
    x, a, b, indices, coef, g = pairs(share)
    ours = pair_adapter_grads(x, a, b, indices, coef, g)
    _, vjp = jax.vjp(lambda a, b: missed_add_reference(x, a, b, indices, coef, jnp.zeros(g.shape)), a, b)
    for name, got, ref in zip(("lora_a", "lora_b"), ours, vjp(g)):
        if share:
            assert rel_error(got, ref) < 1e-5, name
        else:
            np.testing.assert_array_equal(got, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("t, i, o, programs", [(4096, 4096, 4096, 4096), (4096, 576, 1536, 256)])
def test_full_size_on_gpu(t, i, o, programs):  # 576: edge lanes at the default blocks; 256: 16 tokens a program
    x, a, b, indices, coef, g = pairs(0.05, t=t, i=i, o=o, n=64, r=8, dtype=jnp.bfloat16)
    dx, dcoef = pair_input_grads(x, a, b, indices, coef, g, blocks=MissedAddBlockSizes(programs=programs))
    ref_dx, ref_dcoef = pair_input_grads_reference(x, a, b, indices, coef, g)
    visited = np.asarray(coef != 0)
    assert rel_error(dx, ref_dx) < 1e-2
    assert rel_error(np.asarray(dcoef)[visited], np.asarray(ref_dcoef)[visited]) < 1e-3
