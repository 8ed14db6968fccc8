"""Every MeteoRA forward strategy against the `loop` reference, on random shapes (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxpr_tools import equations

from meteora_jax.lora_mixture import lora_mixture, route

FAST = ("bmm", "dense", "grouped", "auto")
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def rel_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


@st.composite
def problems(draw):
    n = draw(st.integers(1, 9))
    return dict(
        m=draw(st.sampled_from([1, 2, 7, 16, 33])), n=n, k=draw(st.integers(1, n)), r=draw(st.integers(1, 8)),
        i=draw(st.integers(1, 24)), o=draw(st.integers(1, 24)), ties=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.5, 1.0, 15.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(p, dtype):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((p["m"], p["i"]))
    a = rng.standard_normal((p["n"], p["i"], p["r"]))
    b = rng.standard_normal((p["n"], p["r"], p["o"]))
    scaling = rng.uniform(0.25, 2.0, p["n"])
    logits = rng.standard_normal((p["m"], p["n"]))
    if p["ties"]:
        logits = np.round(logits)  # many exact ties between adapters
    cast = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    return cast(x), cast(a), cast(b), jnp.asarray(scaling, jnp.float32), jnp.asarray(logits, jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=12, deadline=None)
@given(p=problems())
def test_strategies_equal_loop(dtype, p):
    x, a, b, scaling, logits = make(p, dtype)
    indices, weights = route(logits, p["k"], p["temperature"])
    # The reference sees the same (rounded) inputs in float32.
    ref = lora_mixture(*(v.astype(jnp.float32) for v in (x, a, b)), scaling, indices, weights, "loop")
    for strategy in FAST:
        out = lora_mixture(x, a, b, scaling, indices, weights, strategy)
        assert out.shape == (p["m"], p["o"]) and out.dtype == jnp.float32
        assert rel_error(out, ref) < TOLERANCE[dtype], strategy


@settings(max_examples=6, deadline=None)
@given(p=problems())
def test_gradients_equal_loop(p):
    x, a, b, scaling, logits = make(p, "float32")
    cotangent = jnp.asarray(np.random.default_rng(p["seed"] + 1).standard_normal((p["m"], p["o"])), jnp.float32)

    def loss(strategy, x, logits):
        indices, weights = route(logits, p["k"], p["temperature"])
        return jnp.sum(lora_mixture(x, a, b, scaling, indices, weights, strategy) * cotangent)

    ref = jax.grad(loss, argnums=(1, 2))("loop", x, logits)
    for strategy in FAST:
        grads = jax.grad(loss, argnums=(1, 2))(strategy, x, logits)
        for g, r in zip(grads, ref):
            assert rel_error(g, r) < 1e-5 or np.abs(np.asarray(r)).max() == 0, strategy


def test_route_breaks_ties_towards_lower_index_and_k1_weight_is_one():
    indices, weights = route(jnp.zeros((3, 5)), 2, 1.0)
    np.testing.assert_array_equal(indices, [[0, 1]] * 3)
    np.testing.assert_allclose(weights, 0.5)
    _, weights = route(jnp.asarray(np.random.default_rng(0).standard_normal((4, 6))), 1, 30.0)
    np.testing.assert_array_equal(weights, 1.0)


def test_temperature_flattens_the_weights():
    logits = jnp.asarray([[4.0, 1.0, 0.0]])
    sharp = route(logits, 2, 1.0)[1]
    flat = route(logits, 2, 30.0)[1]
    assert float(sharp[0, 0]) > 0.9 and abs(float(flat[0, 0]) - 0.5) < 0.05


def test_bad_arguments():
    x, a, b, s, logits = make(dict(m=2, n=3, k=1, r=2, i=4, o=5, ties=False, temperature=1.0, seed=0), "float32")
    with pytest.raises(ValueError, match="top_k=4 must be between 1 and the number of adapters"):
        route(logits, 4, 1.0)
    idx, w = route(logits, 2, 1.0)
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        lora_mixture(x, a, b, s, idx, w, "fast")
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_mixture(x[:, :3], a, b, s, idx, w, "dense")


def test_dense_with_gate_matches_float32_gate_and_dense():
    from meteora_jax.lora_mixture import dense_with_gate

    rng = np.random.default_rng(7)
    m, i, o, n, r = 40, 64, 48, 6, 4
    x = jnp.asarray(rng.standard_normal((m, i)), jnp.bfloat16)
    gate = jnp.asarray(rng.standard_normal((i, n)) * 0.1, jnp.float32)
    a = jnp.asarray(rng.standard_normal((n, i, r)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((n, r, o)), jnp.bfloat16)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    delta, logits, indices = dense_with_gate(x, gate, a, b, scaling, 2, 3.0)
    exact = jnp.dot(x.astype(jnp.float32), gate)
    assert rel_error(logits, exact) < 1e-4  # the hi + lo split keeps ~16 mantissa bits
    ref_indices, ref_weights = route(exact, 2, 3.0)
    np.testing.assert_array_equal(indices, ref_indices)
    ref = lora_mixture(*(v.astype(jnp.float32) for v in (x, a, b)), scaling, ref_indices, ref_weights, "loop")
    assert rel_error(delta, ref) < 1e-2


@pytest.mark.parametrize("m", [3, 40])
def test_16_bit_gate_logits_and_their_gradients_match_float32(m):
    from meteora_jax.gate_logits import compute_gate_logits

    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, 64)), jnp.bfloat16)
    gate = jnp.asarray(rng.standard_normal((64, 6)) * 0.1, jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((m, 6)), jnp.float32)

    def exact(x, gate):
        return jnp.dot(x.astype(jnp.float32), gate, precision=jax.lax.Precision.HIGHEST)

    assert rel_error(compute_gate_logits(x, gate), exact(x, gate)) < 1e-4  # the hi + lo split: ~16 mantissa bits
    ours = jax.grad(lambda x, g: jnp.sum(compute_gate_logits(x, g) * cotangent), argnums=(0, 1))(x, gate)
    ref = jax.grad(lambda x, g: jnp.sum(exact(x, g) * cotangent), argnums=(0, 1))(x, gate)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
    assert rel_error(ours[0], ref[0]) < 1e-2
    assert rel_error(ours[1], ref[1]) < 1e-6  # float32, not rounded to the input's 16 bits


def test_split_in_two_keeps_16_mantissa_bits():
    from meteora_jax.gate_logits import split_in_two

    value = jnp.asarray(np.random.default_rng(0).standard_normal(1000) * 0.05, jnp.float32)
    hi, lo = split_in_two(value)
    assert hi.dtype == lo.dtype == jnp.bfloat16
    hi32, lo32 = hi.astype(jnp.float32), lo.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(hi32 + lo32 - value) / jnp.abs(value))) < 2.0**-15
    assert float(jnp.max(jnp.abs(hi32 - value) / jnp.abs(value))) < 2.0**-7


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="checks XLA's GPU compilation of the split")
def test_16_bit_gate_logits_stay_float32_accurate_when_compiled_for_the_gpu():
    from meteora_jax.gate_logits import compute_gate_logits
    from meteora_jax.lora_mixture import dense_with_gate

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 4096)), jnp.bfloat16)
    gate = jnp.asarray(rng.standard_normal((4096, 28)) * 4096**-0.5, jnp.float32)
    a = jnp.asarray(rng.standard_normal((28, 4096, 8)) * 4096**-0.5, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((28, 8, 64)), jnp.bfloat16)
    exact = jnp.dot(x.astype(jnp.float32), gate, precision=jax.lax.Precision.HIGHEST)
    assert rel_error(jax.jit(compute_gate_logits)(x, gate), exact) < 1e-4
    folded = jax.jit(dense_with_gate, static_argnums=(5,))(x, gate, a, b, jnp.ones(28), 2, 1.0)[1]
    assert rel_error(folded, exact) < 1e-4


def gated_problem(seed, m=40, i=64, o=48, n=6, r=4):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, i)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((m, o)), jnp.bfloat16)
    # Logits of spread ~3: no near-ties that the strategies' summation orders could split differently.
    gate = jnp.asarray(rng.standard_normal((i, n)) * 0.4, jnp.bfloat16)
    a = jnp.asarray(rng.standard_normal((n, i, r)) * i**-0.5, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((n, r, o)), jnp.bfloat16)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    return x, y, gate, a, b, scaling


@pytest.mark.parametrize("strategy", ["loop", "bmm", "dense", "grouped", "pallas"])
def test_bfloat16_gate_routes_on_its_own_product_in_every_strategy(strategy):
    from meteora_jax.lora_mixture import gated_output

    x, y, gate, a, b, scaling = gated_problem(seed=11)
    exact = jnp.dot(x.astype(jnp.float32), gate.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    out, logits, indices = gated_output(x, y, gate, a, b, scaling, 2, 1.0, strategy)
    assert logits.dtype == jnp.float32 and rel_error(logits, exact) < 1e-5
    ref_indices, ref_weights = route(exact, 2, 1.0)
    np.testing.assert_array_equal(indices, ref_indices)
    ref = lora_mixture(*(v.astype(jnp.float32) for v in (x, a, b)), scaling, ref_indices, ref_weights, "loop")
    assert rel_error(out.astype(jnp.float32) - y.astype(jnp.float32), ref) < 2e-2


def test_bfloat16_gate_rides_as_one_matmul_part_and_has_a_gradient():
    from meteora_jax.gate_logits import compute_gate_logits
    from meteora_jax.lora_mixture import dense_with_gate

    x, _, gate, a, b, scaling = gated_problem(seed=12)
    n = gate.shape[1]

    def folded_widths(g):
        jaxpr = jax.make_jaxpr(lambda x: dense_with_gate(x, g, a, b, scaling, 2, 1.0))(x).jaxpr
        return {e.outvars[0].aval.shape[-1] for e in equations(jaxpr) if e.primitive.name == "dot_general"}

    # The float32 gate rides as hi + lo columns (2N beside N r), the bfloat16 one whole (N).
    assert n * a.shape[-1] + n in folded_widths(gate)
    assert n * a.shape[-1] + 2 * n in folded_widths(gate.astype(jnp.float32))
    assert n * a.shape[-1] + 2 * n not in folded_widths(gate)
    grad = jax.grad(lambda g: jnp.sum(compute_gate_logits(x, g) ** 2))(gate)
    ref = jax.grad(lambda g: jnp.sum(jnp.dot(x.astype(jnp.float32), g.astype(jnp.float32)) ** 2))(gate)
    assert rel_error(grad, ref) < 1e-2
