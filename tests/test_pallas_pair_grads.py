"""Per-token gradients of the routed adapters (meteora_jax/pallas/pair_grads.py) against the float32 VJP of the
plain reference: interpreted on CPU, full size on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax.pallas.missed_add import MissedAddBlockSizes, missed_add_reference, missed_token_list
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


def adapter_grads_reference(x, a, b, indices, coef, g):
    _, vjp = jax.vjp(lambda a, b: missed_add_reference(x, a, b, indices, coef, jnp.zeros(g.shape)), a, b)
    return vjp(g.astype(jnp.float32))


# r = 6: the gradients' rank lanes padded to 8; 7 programs over 300 tokens, 64 with most of them idle
@pytest.mark.parametrize("share, r, programs", [(0.0, 4, 7), (0.05, 4, 1), (0.05, 6, 64), (0.6, 4, 7), (0.6, 6, 7)])
def test_adapter_grads_match_reference_over_the_nonzero_pairs(share, r, programs):
    x, a, b, indices, coef, g = pairs(share, r=r)
    blocks = MissedAddBlockSizes(programs=programs, block_in=16, block_out=16)
    ours = pair_adapter_grads(x, a, b, indices, coef, g, blocks=blocks, interpret=not ON_GPU)
    for name, got, ref in zip(("lora_a", "lora_b"), ours, adapter_grads_reference(x, a, b, indices, coef, g)):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        if share:
            assert rel_error(got, ref) < 1e-5, name
        else:
            np.testing.assert_array_equal(got, 0)


def test_both_kernels_walk_the_routing_kernel_s_list():
    """Given the list of missed tokens per tile, as fused passes it: the same gradients as the references."""
    x, a, b, indices, coef, g = pairs(0.1, t=256)
    listed = missed_token_list(coef, 64)
    dx, dcoef = pair_input_grads(x, a, b, indices, coef, g, listed, interpret=not ON_GPU)
    ref_dx, ref_dcoef = pair_input_grads_reference(x, a, b, indices, coef, g)
    assert rel_error(dx, ref_dx) < 1e-5
    visited = np.asarray(coef != 0)
    np.testing.assert_allclose(np.asarray(dcoef)[visited], np.asarray(ref_dcoef)[visited], rtol=1e-4, atol=1e-4)
    ours = pair_adapter_grads(x, a, b, indices, coef, g, listed, interpret=not ON_GPU)
    for got, ref in zip(ours, adapter_grads_reference(x, a, b, indices, coef, g)):
        assert rel_error(got, ref) < 1e-5


def test_no_tokens_give_zero_gradients():
    x, a, b, indices, coef, g = (v[:0] if v.ndim == 2 else v for v in pairs(0.1, i=48, o=80))
    dx, dcoef = pair_input_grads(x, a, b, indices, coef, g, interpret=True)
    da, db = pair_adapter_grads(x, a, b, indices, coef, g, interpret=True)
    assert dx.shape == (0, 48) and dcoef.shape == (0, 2)
    np.testing.assert_array_equal(da, 0)
    np.testing.assert_array_equal(db, 0)
    assert da.shape == a.shape and db.shape == b.shape


def test_an_infinite_coefficient_gives_the_reference_s_infinities():
    """Padded rank lanes must not turn inf x 0 into NaN."""
    x, a, b, indices, coef, g = pairs(0.1, t=16)
    coef = coef.at[3, 0].set(jnp.inf)
    dx, _ = pair_input_grads(x, a, b, indices, coef, g, interpret=not ON_GPU)
    ref_dx, _ = pair_input_grads_reference(x, a, b, indices, coef, g)
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(ref_dx))
    np.testing.assert_array_equal(np.isinf(dx), np.isinf(ref_dx))
    assert np.isinf(ref_dx).any()


def test_adapter_grads_name_what_they_cannot_take():
    x, a, b, indices, coef, g = pairs(0.1)
    with pytest.raises(ValueError, match=r"shape mismatch: x \(300, 48\).*lora_b \(5, 3, 80\)"):
        pair_adapter_grads(x, a, b[:, :3], indices, coef, g, interpret=True)
    with pytest.raises(ValueError, match=r"x \(300, 40\) and g \(300, 80\): .* multiples of 16"):
        pair_adapter_grads(x[:, :40], a[:, :40], b, indices, coef, g, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
# 4096 programs: more than the ~400 listed tokens; 576: edge lanes; r = 2: atomic tiles of fewer elements than a
# program has threads
@pytest.mark.parametrize("t, i, o, r, programs", [(4096, 4096, 4096, 8, 4096), (4096, 576, 1536, 8, 256),
                                                  (512, 64, 64, 2, 256)])
def test_full_size_on_gpu(t, i, o, r, programs):
    x, a, b, indices, coef, g = pairs(0.05, t=t, i=i, o=o, n=64, r=r, dtype=jnp.bfloat16)
    listed = missed_token_list(coef, 128)  # per 128-token tile, as the routing kernel lists them
    dx, dcoef = pair_input_grads(x, a, b, indices, coef, g, listed, blocks=MissedAddBlockSizes(programs=programs))
    ref_dx, ref_dcoef = pair_input_grads_reference(x, a, b, indices, coef, g)
    visited = np.asarray(coef != 0)
    assert rel_error(dx, ref_dx) < 1e-2
    assert rel_error(np.asarray(dcoef)[visited], np.asarray(ref_dcoef)[visited]) < 1e-3
    da, db = pair_adapter_grads(x, a, b, indices, coef, g, listed)
    for got, ref in zip((da, db), adapter_grads_reference(x, a, b, indices, coef, g)):
        assert rel_error(got, ref) < 1e-2
