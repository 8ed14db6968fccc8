"""The dense expand kernel (y += H @ B_all in place) against its plain-JAX reference, and in the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax import lora_mixture as mixture_module
from meteora_jax.lora_mixture import gated_output
from meteora_jax.pallas.dense_expand import DenseExpandBlockSizes, dense_expand_add, dense_expand_reference

ON_GPU = jax.default_backend() == "gpu"
SMALL = DenseExpandBlockSizes(block_tokens=16, block_out=16)


def rel_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def operands(m, k, o, dtype, seed):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((m, k), (k, o), (m, o)))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("m, k, o", [(1, 8, 16), (37, 24, 50), (64, 224, 96), (70, 16, 33)])
def test_matches_reference_interpreted(m, k, o, dtype, tolerance):
    h, b, y = operands(m, k, o, dtype, seed=m + k + o)
    before = np.asarray(y, np.float32).copy()
    out = dense_expand_add(h, b, y, blocks=SMALL, interpret=True)
    ref = dense_expand_reference(*(v.astype(jnp.float32) for v in (h, b, y)))
    assert out.dtype == y.dtype and out.shape == y.shape
    assert rel_error(out, ref) < tolerance
    np.testing.assert_array_equal(np.asarray(y, np.float32), before)  # the caller's y is not consumed


def test_gradients_match_reference():
    h, b, y = operands(37, 24, 50, "float32", seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((37, 50)), jnp.float32)
    ours = jax.grad(lambda *v: jnp.sum(dense_expand_add(*v, blocks=SMALL, interpret=True) * cotangent),
                    argnums=(0, 1, 2))(h, b, y)
    ref = jax.grad(lambda *v: jnp.sum(dense_expand_reference(*v) * cotangent), argnums=(0, 1, 2))(h, b, y)
    for name, g, r in zip(("h", "b", "y"), ours, ref):
        assert rel_error(g, r) < 1e-6, name


def test_bad_shapes_and_dtypes():
    h, b, y = operands(8, 16, 16, "float32", seed=0)
    with pytest.raises(ValueError, match=r"shape mismatch: h \(8, 16\) @ b \(16, 16\) must have the shape of y"):
        dense_expand_add(h, b, y[:, :8], interpret=True)
    with pytest.raises(ValueError, match="must share a dtype"):
        dense_expand_add(h.astype(jnp.bfloat16), b, y, interpret=True)
    with pytest.raises(ValueError, match="block_out=24 must be a power of two"):
        dense_expand_add(h, b, y, blocks=DenseExpandBlockSizes(block_out=24), interpret=True)


@pytest.mark.parametrize("kernel", ["dense_expand", "segment"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_pallas_prefill_matches_loop_with_gradients(kernel, dtype, monkeypatch):
    if kernel == "segment":  # N r = 20 would take the dense expand kernel; force the grouped kernels
        monkeypatch.setattr(mixture_module, "DENSE_MAX_TOTAL_RANK", 0)
    m, i, o, n, r = 37, 40, 30, 5, 4
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.standard_normal((m, i)), dtype)
    y = jnp.asarray(rng.standard_normal((m, o)), dtype)
    gate = jnp.asarray(rng.standard_normal((i, n)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((n, i, r)) * i**-0.5, dtype)
    b = jnp.asarray(rng.standard_normal((n, r, o)), dtype)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((m, o)), jnp.float32)

    def loss(strategy, x, y, gate):
        out, logits, _ = gated_output(x, y, gate, a, b, scaling, 2, 2.0, strategy)
        return jnp.sum(out.astype(jnp.float32) * cotangent) + jnp.sum(logits**2)

    ours, ref = (gated_output(x, y, gate, a, b, scaling, 2, 2.0, s) for s in ("pallas", "loop"))
    np.testing.assert_array_equal(ours[2], ref[2])
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    assert rel_error(ours[0], ref[0]) < tolerance
    grads = [jax.grad(loss, argnums=(1, 2, 3))(s, x, y, gate) for s in ("pallas", "loop")]
    for name, g, r in zip(("x", "y", "gate"), *grads):
        assert rel_error(g, r) < tolerance, name


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
def test_repeated_edge_lanes_add_once_on_gpu():
    # 65 tokens and 129 columns: the last tiles are 63 copies of one row and 127 of one column. Each copy
    # stores the value its load saw plus the delta; a copy whose load ran after another's store (other
    # warps) would add the delta twice. Repeated runs, fresh inputs each time.
    for seed in range(20):
        h, b, y = operands(65, 224, 129, "float32", seed=seed)
        out = dense_expand_add(h, b, y)
        np.testing.assert_allclose(out, dense_expand_reference(h, b, y), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("tokens, out", [(17, 4096), (4096, 4096), (37, 30)])  # the last overhangs both edges
def test_full_size_on_gpu(tokens, out):
    h, b, y = operands(tokens, 224, out, "bfloat16", seed=tokens)
    ref = dense_expand_reference(*(v.astype(jnp.float32) for v in (h, b, y)))
    assert rel_error(dense_expand_add(h, b, y), ref) < 1e-2
