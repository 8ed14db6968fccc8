"""The decode-layer Pallas kernels (gate, routing + shrink, expand into the base output) against their reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_tools import equations

from meteora_jax.lora_mixture import MIXTURE_STRATEGIES, gated_output
from meteora_jax.pallas.decode_layer import DecodeBlockSizes, decode_layer, decode_layer_reference

ON_GPU = jax.default_backend() == "gpu"
# Two 16-row steps per gate program, so that its loop runs.
SMALL = DecodeBlockSizes(gate_block_in=32, gate_block_adapters=16, gate_step_rows=16, block_in=32, block_out=16)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}

# (tokens M, in I, out O, adapters N, rank R, top-k K, temperature): T = 1, dims off the block grid,
# N = 1 with k = 1 and r = 64, k = 3 of an odd N, r = 12, a sharp and a flat temperature, and five
# shrink splits (not a power of two) with k = 6 (the reference then routes with lax.top_k).
CASES = [(1, 40, 24, 3, 4, 2, 1.0), (16, 100, 50, 5, 4, 2, 15.0), (3, 48, 80, 1, 64, 1, 1.0),
         (7, 64, 64, 29, 12, 3, 0.5), (16, 32, 48, 28, 8, 2, 30.0), (2, 160, 40, 9, 8, 6, 2.0)]


def rel_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def problem(case, dtype, seed):
    m, i, o, n, r, _, _ = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, i)), dtype)
    gate = jnp.asarray(rng.standard_normal((i, n)) * i**-0.5, jnp.float32)
    y = jnp.asarray(rng.standard_normal((m, o)), dtype)
    a = jnp.asarray(rng.standard_normal((n, i, r)) * i**-0.5, dtype)
    b = jnp.asarray(rng.standard_normal((n, r, o)) * r**-0.5, dtype)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    return x, gate, y, a, b, scaling


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_decode_layer_matches_reference_interpreted(case, dtype):
    args = problem(case, dtype, seed=sum(case[:6]))
    top_k, temperature = case[5], case[6]
    out, logits, indices, weights = decode_layer(*args, top_k=top_k, temperature=temperature, blocks=SMALL,
                                                 interpret=True)
    x, gate, y, a, b, scaling = args
    ref_args = (x.astype(jnp.float32), gate, y.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32),
                scaling)
    ref, ref_logits, ref_indices, ref_weights = decode_layer_reference(*ref_args, top_k=top_k,
                                                                       temperature=temperature)
    assert out.shape == y.shape and out.dtype == y.dtype
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
    # The delta alone, so that y's own size cannot hide an error in it.
    assert rel_error(out.astype(jnp.float32) - y.astype(jnp.float32), ref - y.astype(jnp.float32)) < TOLERANCE[dtype]


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:5])
def test_decode_layer_with_a_bfloat16_gate_routes_on_its_product(case):
    x, gate, y, a, b, scaling = problem(case, "bfloat16", seed=sum(case[:6]))
    gate = gate.astype(jnp.bfloat16)
    top_k, temperature = case[5], case[6]
    out, logits, indices, weights = decode_layer(x, gate, y, a, b, scaling, top_k=top_k, temperature=temperature,
                                                 blocks=SMALL, interpret=True)
    ref, ref_logits, ref_indices, ref_weights = decode_layer_reference(
        *(v.astype(jnp.float32) for v in (x, gate, y, a, b)), scaling, top_k=top_k, temperature=temperature)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
    assert rel_error(out.astype(jnp.float32) - y.astype(jnp.float32), ref - y.astype(jnp.float32)) < 1e-2


@pytest.mark.parametrize("gate_dtype", ["float32", "bfloat16"])
def test_default_blocks_beyond_256_adapters_interpreted(gate_dtype):
    # Past 256 adapters route_shrink takes wider programs (DecodeBlockSizes.shrink) and the gate's tile follows its
    # dtype (DecodeBlockSizes.gate_step); 300 inputs leave a ragged program and a ragged gate step.
    case = (3, 300, 40, 300, 8, 2, 1.0)
    x, gate, y, a, b, scaling = problem(case, "float32", seed=3)
    gate = gate.astype(gate_dtype)
    assert DecodeBlockSizes().shrink(300)[0] == 256
    out, logits, indices, _ = decode_layer(x, gate, y, a, b, scaling, top_k=2, temperature=1.0, interpret=True)
    ref, ref_logits, ref_indices, _ = decode_layer_reference(x, gate, y, a, b, scaling, top_k=2, temperature=1.0)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(indices, ref_indices)
    assert rel_error(out - y, ref - y) < 1e-5


@pytest.mark.parametrize("gate_dtype", ["float32", "bfloat16"])
def test_decode_gate_kernel_reads_a_bfloat16_gate_as_it_is(gate_dtype):
    x, gate, y, a, b, scaling = problem(CASES[0], "bfloat16", seed=0)
    jaxpr = jax.make_jaxpr(lambda g: decode_layer(x, g, y, a, b, scaling, top_k=2, temperature=1.0, interpret=True))(
        gate.astype(gate_dtype)).jaxpr
    gate_kernel = [e for e in equations(jaxpr) if e.primitive.name == "pallas_call"
                   and "meteora_decode_gate" in str(e.params.get("name", e.params.get("name_and_src_info")))]
    assert len(gate_kernel) == 1 and gate_kernel[0].invars[1].aval.dtype == gate_dtype


def test_ties_go_to_the_lower_adapter_as_in_route():
    x, _, y, a, b, scaling = problem((4, 32, 32, 6, 4, 2, 1.0), "float32", seed=1)
    # One-hot token rows make each token's logits exactly a row of the gate, ties included.
    x = jnp.eye(4, 32, dtype=jnp.float32)
    rows = [[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.0] * 6, [5.0, 5.0, 1.0, 1.0, 1.0, 1.0],
            [-1.0, -2.0, -3.0, -1.0, -4.0, -2.0]]
    gate = jnp.zeros((32, 6), jnp.float32).at[:4].set(jnp.asarray(rows))
    _, _, indices, _ = decode_layer(x, gate, y, a, b, scaling, top_k=2, temperature=1.0, blocks=SMALL, interpret=True)
    _, _, ref_indices, _ = decode_layer_reference(x, gate, y, a, b, scaling, top_k=2, temperature=1.0)
    np.testing.assert_array_equal(indices, [[1, 2], [0, 1], [0, 1], [0, 3]])
    np.testing.assert_array_equal(indices, ref_indices)
    # k = 5 sends the reference through lax.top_k rather than argmax rounds: the same ties.
    _, _, indices, _ = decode_layer(x, gate, y, a, b, scaling, top_k=5, temperature=1.0, blocks=SMALL, interpret=True)
    _, _, ref_indices, _ = decode_layer_reference(x, gate, y, a, b, scaling, top_k=5, temperature=1.0)
    np.testing.assert_array_equal(indices, ref_indices)


def test_a_nan_logit_routes_as_xla_does():
    """A NaN logit counts as the largest, as in XLA's argmax: no index past the adapters (on the GPU Triton's max
    skips NaN, and no lane would equal it). Interpreted, the kernel's max is XLA's: this can fail only on a GPU."""
    x, gate, y, a, b, scaling = problem((3, 32, 32, 6, 4, 2, 1.0), "float32", seed=2)
    gate = gate.at[:, 4].set(jnp.nan)
    blocks = DecodeBlockSizes() if ON_GPU else SMALL
    _, _, indices, weights = decode_layer(x, gate, y, a, b, scaling, top_k=2, temperature=1.0, blocks=blocks,
                                          interpret=not ON_GPU)
    _, _, ref_indices, _ = decode_layer_reference(x, gate, y, a, b, scaling, top_k=2, temperature=1.0)
    np.testing.assert_array_equal(indices, ref_indices)
    assert np.all(np.asarray(indices)[:, 0] == 4) and np.all(np.isnan(np.asarray(weights)))


def test_decode_layer_gradients_match_reference():
    args = problem((5, 40, 30, 4, 8, 2, 2.0), "float32", seed=2)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal((5, 30)), jnp.float32)

    def loss(layer, *args):
        out, logits, _, weights = layer(*args)
        return jnp.sum(out * cotangent) + jnp.sum(weights**2) + jnp.sum(jnp.sin(logits))

    def kernels(*args):
        return decode_layer(*args, top_k=2, temperature=2.0, blocks=SMALL, interpret=True)

    def reference(*args):
        return decode_layer_reference(*args, top_k=2, temperature=2.0)

    ours = jax.grad(loss, argnums=range(1, 7))(kernels, *args)
    ref = jax.grad(loss, argnums=range(1, 7))(reference, *args)
    for name, g, r in zip(("x", "gate", "y", "lora_a", "lora_b", "scaling"), ours, ref):
        assert rel_error(g, r) < 1e-5, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_strategy_of_the_gated_layer_agrees_on_few_tokens(dtype):
    x, _, y, a, b, scaling = problem((3, 40, 24, 5, 8, 2, 1.0), dtype, seed=4)
    gate = jnp.asarray(np.random.default_rng(5).standard_normal((40, 5)), jnp.float32)
    # `fused` needs bfloat16 and tiling dims (tests/test_pallas_fused.py checks it against loop).
    outputs = {s: gated_output(x, y, gate, a, b, scaling, 2, 3.0, s) for s in MIXTURE_STRATEGIES}
    ref_out, ref_logits, ref_indices = outputs.pop("loop")
    delta = ref_out.astype(jnp.float32) - y.astype(jnp.float32)
    for strategy, (out, logits, indices) in outputs.items():
        assert out.dtype == y.dtype, strategy
        assert rel_error(out.astype(jnp.float32) - y.astype(jnp.float32), delta) < TOLERANCE[dtype], strategy
        np.testing.assert_array_equal(indices, ref_indices, err_msg=strategy)
        # bf16 `dense` folds the gate into x @ A as a ~16-bit high + low split (dense_with_gate).
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5 if dtype == "float32" else 1e-4, err_msg=strategy)


def test_bad_blocks_shapes_and_limits_name_the_culprit():
    args = problem((4, 32, 32, 3, 4, 2, 1.0), "float32", seed=0)
    x, gate, y, a, b, scaling = args
    with pytest.raises(ValueError, match="block_out=24 must be a power of two"):
        decode_layer(*args, top_k=2, temperature=1.0, blocks=DecodeBlockSizes(block_out=24), interpret=True)
    with pytest.raises(ValueError, match="shrink_num_warps=3 must be 1, 2, 4, 8 or 16"):
        decode_layer(*args, top_k=2, temperature=1.0, blocks=DecodeBlockSizes(shrink_num_warps=3), interpret=True)
    with pytest.raises(ValueError, match=r"gate has shape \(32, 2\); expected \(32, 3\)"):
        decode_layer(x, gate[:, :2], y, a, b, scaling, top_k=2, temperature=1.0, interpret=True)
    with pytest.raises(ValueError, match=r"y has shape \(4, 31\)"):
        decode_layer(x, gate, y[:, :31], a, b, scaling, top_k=2, temperature=1.0, interpret=True)
    with pytest.raises(ValueError, match="top_k=4 must be between 1 and the number of adapters"):
        decode_layer(*args, top_k=4, temperature=1.0, interpret=True)
    crowd = problem((2, 32, 32, 1025, 4, 2, 1.0), "float32", seed=0)
    with pytest.raises(ValueError, match="adapters=1025 is over the decode kernels' limit of 1024"):
        decode_layer(*crowd, top_k=2, temperature=1.0, interpret=True)
    many = jnp.zeros((17, 32), jnp.float32)
    with pytest.raises(ValueError, match="tokens=17 is over the decode kernels' limit of 16"):
        decode_layer(many, gate, jnp.zeros((17, 32)), a, b, scaling, top_k=2, temperature=1.0, interpret=True)
    with pytest.raises(ValueError, match="x has no tokens"):
        decode_layer(x[:0], gate, y[:0], a, b, scaling, top_k=2, temperature=1.0, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("adapters,out_features,gate_dtype",
                         [(28, 4096, "float32"), (28, 14336, "float32"), (1024, 4096, "float32"),
                          (1024, 4096, "bfloat16")])
def test_decode_layer_full_size_on_gpu(tokens, adapters, out_features, gate_dtype):
    case = (tokens, 4096, out_features, adapters, 8, 2, 1.0)
    x, gate, y, a, b, scaling = problem(case, "bfloat16", seed=tokens + adapters)
    gate = gate.astype(gate_dtype)
    out, logits, indices, weights = decode_layer(x, gate, y, a, b, scaling, top_k=2, temperature=1.0)
    f32 = [v.astype(jnp.float32) for v in (x, gate, y, a, b)]
    ref, ref_logits, ref_indices, ref_weights = decode_layer_reference(*f32, scaling, top_k=2, temperature=1.0)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    # Summation order differs from XLA's: compare the routing where the top-3 logits are not near-ties.
    top3 = np.sort(np.asarray(ref_logits), axis=-1)[:, -3:]
    clear = np.min(np.diff(top3, axis=-1), axis=-1) > 1e-4
    np.testing.assert_array_equal(np.asarray(indices)[clear], np.asarray(ref_indices)[clear])
    np.testing.assert_allclose(np.asarray(weights)[clear], np.asarray(ref_weights)[clear], rtol=1e-4)
    assert rel_error(out.astype(jnp.float32) - f32[2], ref - f32[2]) < 1e-2


def test_gate_rows_grow_with_the_adapters_and_inputs_until_set():
    assert DecodeBlockSizes().gate_rows(4096, 28) == 64
    assert DecodeBlockSizes().gate_rows(4096, 256) == 128
    assert DecodeBlockSizes().gate_rows(4096, 1024) == 512
    assert DecodeBlockSizes().gate_rows(14336, 28) == 256  # at most 64 shares per token
    assert DecodeBlockSizes().gate_rows(40, 1024) == 64  # no more rows than the inputs need
    assert DecodeBlockSizes().gate_rows(65536, 1024) == 512  # never past the largest measured tile
    assert DecodeBlockSizes(gate_block_in=256).gate_rows(4096, 28) == 256


def test_gate_steps_follow_the_adapters_and_the_gate_dtype_until_set():
    for dtype in (jnp.bfloat16, jnp.float32):
        assert DecodeBlockSizes().gate_step(28, dtype) == DecodeBlockSizes().gate_step(256, dtype) == (32, 128)
    assert DecodeBlockSizes().gate_step(1024, jnp.bfloat16) == (64, 128)
    assert DecodeBlockSizes().gate_step(1024, jnp.float32) == (32, 64)
    assert DecodeBlockSizes(gate_block_adapters=16, gate_step_rows=32).gate_step(1024, jnp.bfloat16) == (16, 32)


def test_route_shrink_programs_widen_with_many_adapters_until_set():
    assert DecodeBlockSizes().shrink(28) == DecodeBlockSizes().shrink(256) == (128, 1)
    assert DecodeBlockSizes().shrink(1024) == (256, 4)
    assert DecodeBlockSizes(block_in=64, shrink_num_warps=2).shrink(1024) == (64, 2)


def test_pallas_strategy_beyond_the_decode_kernels_limit_uses_the_mixture_kernels():
    x, _, y, a, b, scaling = problem((2, 16, 8, 1025, 4, 2, 1.0), "float32", seed=6)
    gate = jnp.asarray(np.random.default_rng(7).standard_normal((16, 1025)), jnp.float32)
    out, _, indices = gated_output(x, y, gate, a, b, scaling, 2, 1.0, "pallas")
    ref, _, ref_indices = gated_output(x, y, gate, a, b, scaling, 2, 1.0, "loop")
    np.testing.assert_array_equal(indices, ref_indices)
    assert rel_error(out - y, ref - y) < 1e-5


def test_gated_layer_on_no_tokens_and_auto_past_the_kernels_limits(monkeypatch):
    from meteora_jax import lora_mixture

    x, gate, y, a, b, scaling = problem((1, 16, 8, 3, 4, 2, 1.0), "float32", seed=8)
    out, logits, indices = gated_output(x[:0], y[:0], gate, a, b, scaling, 2, 1.0, "pallas")
    assert out.shape == (0, 8) and logits.shape == (0, 3) and indices.shape == (0, 2)
    monkeypatch.setattr(lora_mixture.jax, "default_backend", lambda: "gpu")
    assert lora_mixture.pick_strategy(28, 8, 16) == "pallas"
    assert lora_mixture.pick_strategy(28, 8, 17) == "dense"
    bf16 = jnp.bfloat16
    assert lora_mixture.pick_strategy(28, 8, 4096, bf16) == "dense"  # ties the kernel, compiles faster
    assert lora_mixture.pick_strategy(28, 8, 8191, bf16) == "dense"
    assert lora_mixture.pick_strategy(28, 8, 8192, bf16) == "pallas"  # the dense expand kernel
    assert lora_mixture.pick_strategy(64, 8, 8192, bf16) == "pallas"  # N r = 512
    assert lora_mixture.pick_strategy(65, 8, 16384, bf16) == "bmm"  # N r = 520
    assert lora_mixture.pick_strategy(28, 8, 8192, jnp.float32) == "dense"  # measured in bfloat16 only
    assert lora_mixture.pick_strategy(256, 8, 16384, bf16) == "bmm"
    assert lora_mixture.pick_strategy(1024, 8, 16384, bf16) == "bmm"  # the grouped kernels lose on prompt-like routing
    assert lora_mixture.pick_strategy(64, 256, 16384, bf16) == "bmm"  # rank past the kernels' 128
    assert lora_mixture.pick_strategy(28, 8) == "dense"  # mixtures alone stay in XLA
    assert lora_mixture.pick_strategy(28, 256, 4) == "bmm"  # rank past the kernels' 128
    assert lora_mixture.pick_strategy(2048, 8, 1) == "bmm"  # adapters past the kernels' 1024
