"""Pallas MeteoRA kernels against their plain-JAX reference: interpret mode on CPU, full size on GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax.lora_mixture import lora_mixture, route
from meteora_jax.pallas import (
    GatherBlockSizes,
    SegmentBlockSizes,
    group_by_adapter,
    lora_gather,
    lora_gather_reference,
    lora_segment,
    lora_segment_add,
    mixture_pallas_add,
)

ON_GPU = jax.default_backend() == "gpu"
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
SMALL_GATHER = GatherBlockSizes(block_in=32, block_out=16)
SMALL_SEGMENT = SegmentBlockSizes(block_tokens=16, block_in=16, span_in=32, block_out=16)

# (tokens M, in I, out O, adapters N, rank R, top-k K): T = 1, dims off the block grid, empty groups,
# N = 1 with k = 1 and r = 64, ragged groups with r = 12.
CASES = [(1, 40, 24, 3, 4, 2), (37, 100, 50, 5, 4, 2), (20, 64, 64, 30, 16, 2), (33, 48, 80, 1, 64, 1),
         (50, 32, 48, 6, 12, 2)]


def rel_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def problem(case, dtype, seed, skew=False):
    m, i, o, n, r, k = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, i)), dtype)
    a = jnp.asarray(rng.standard_normal((n, i, r)) * i**-0.5, dtype)
    b = jnp.asarray(rng.standard_normal((n, r, o)) * r**-0.5, dtype)
    logits = rng.standard_normal((m, n))
    if skew:
        logits[:, 0] += 100.0  # every token's first choice is adapter 0: one full group, the rest sparse
    indices, weights = route(jnp.asarray(logits, jnp.float32), k, 2.0)
    coef = weights * jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)[indices]
    return x, a, b, indices, coef


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference_interpreted(case, dtype):
    x, a, b, indices, coef = problem(case, dtype, seed=sum(case))
    ref = lora_gather_reference(x.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), indices, coef)
    gathered = lora_gather(x, a, b, indices, coef, blocks=SMALL_GATHER, interpret=True)
    segmented = lora_segment(x, a, b, indices, coef, blocks=SMALL_SEGMENT, interpret=True)
    assert gathered.shape == segmented.shape == ref.shape and segmented.dtype == jnp.float32
    assert rel_error(gathered, ref) < TOLERANCE[dtype]
    assert rel_error(segmented, ref) < TOLERANCE[dtype]


def test_segment_handles_one_crowded_adapter():
    x, a, b, indices, coef = problem((40, 32, 32, 5, 8, 2), "float32", seed=3, skew=True)
    assert int(jnp.sum(indices[:, 0] == 0)) == 40
    ref = lora_gather_reference(x, a, b, indices, coef)
    assert rel_error(lora_segment(x, a, b, indices, coef, blocks=SMALL_SEGMENT, interpret=True), ref) < 1e-5


@pytest.mark.parametrize("case", [(3, 40, 30, 3, 8, 2), (37, 100, 50, 5, 4, 2)], ids=["decode", "prefill"])
def test_pallas_strategy_gradients_match_loop(case):
    m, i, o, n, r, k = case
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, i)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((n, i, r)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, r, o)), jnp.float32)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    logits = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((m, o)), jnp.float32)

    def loss(strategy, x, logits, a, b):
        indices, weights = route(logits, k, 2.0)
        return jnp.sum(lora_mixture(x, a, b, scaling, indices, weights, strategy) * cotangent)

    indices, weights = route(logits, k, 2.0)
    forward = [lora_mixture(x, a, b, scaling, indices, weights, s) for s in ("pallas", "loop")]
    assert rel_error(*forward) < 1e-5
    args = (x, logits, a, b)
    ours = jax.grad(loss, argnums=(1, 2, 3, 4))("pallas", *args)
    ref = jax.grad(loss, argnums=(1, 2, 3, 4))("loop", *args)
    for name, g, r in zip(("x", "gate logits", "lora_a", "lora_b"), ours, ref):
        assert rel_error(g, r) < 1e-5, name


def test_grouping_covers_every_pair_in_blocks_of_one_slot_and_adapter():
    m, n, k, block = 37, 5, 2, 16
    x, a, b, indices, coef = problem((m, 8, 8, n, 4, k), "float32", seed=5, skew=True)
    rows, padded_coef, block_adapter = group_by_adapter(indices, coef, n, block)
    rows, padded_coef, block_adapter = map(np.asarray, (rows, padded_coef, block_adapter))
    per_slot = len(block_adapter) // k
    assert per_slot == -(-m // block) + n and rows.shape == padded_coef.shape == (k * per_slot * block,)
    seen = set()
    for g, adapter in enumerate(block_adapter):
        lanes = rows[g * block:(g + 1) * block]
        if adapter < 0:
            assert (lanes == -1).all()
            continue
        slot = g // per_slot
        assert (np.asarray(indices)[lanes, slot] == adapter).all()  # padding lanes repeat a real pair
        np.testing.assert_allclose(padded_coef[g * block:(g + 1) * block], np.asarray(coef)[lanes, slot])
        seen |= {(int(t), slot) for t in lanes}
    assert seen == {(t, s) for t in range(m) for s in range(k)}


def test_block_size_rules_follow_the_mean_group_size():
    def resolved(blocks, tokens, adapters):
        r = blocks.resolve(tokens, adapters)
        return r.block_tokens, r.block_out, r.num_warps

    assert resolved(SegmentBlockSizes(), 16384, 28) == (64, 64, 4)
    assert resolved(SegmentBlockSizes(), 4096, 256) == (16, 128, 2)
    assert resolved(SegmentBlockSizes(), 700, 20) == (32, 128, 4)
    assert resolved(SegmentBlockSizes(block_tokens=128, num_warps=8), 4096, 256) == (128, 64, 8)


def test_bad_block_sizes_and_shapes():
    x, a, b, indices, coef = problem((4, 32, 32, 3, 4, 2), "float32", seed=0)
    with pytest.raises(ValueError, match="block_in=24 must be a power of two"):
        lora_gather(x, a, b, indices, coef, blocks=GatherBlockSizes(block_in=24), interpret=True)
    with pytest.raises(ValueError, match="block_tokens=8 must be a power of two >= 16"):
        lora_segment(x, a, b, indices, coef, blocks=SegmentBlockSizes(block_tokens=8), interpret=True)
    with pytest.raises(ValueError, match="span_in=32 must be at least block_in=64"):
        lora_segment(x, a, b, indices, coef, blocks=SegmentBlockSizes(span_in=32), interpret=True)
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_segment(x[:, :16], a, b, indices, coef, interpret=True)
    with pytest.raises(ValueError, match="must share a dtype"):
        lora_segment(x.astype(jnp.bfloat16), a, b, indices, coef, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("tokens", [1, 16, 4096])
@pytest.mark.parametrize("adapters", [28, 256])
def test_kernels_full_size_on_gpu(tokens, adapters):
    x, a, b, indices, coef = problem((tokens, 4096, 4096, adapters, 8, 2), "bfloat16", seed=tokens + adapters)
    ref = lora_gather_reference(x.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), indices, coef)
    assert rel_error(lora_gather(x, a, b, indices, coef), ref) < 1e-2
    assert rel_error(lora_segment(x, a, b, indices, coef), ref) < 1e-2
    y = jnp.ones((tokens, 4096), jnp.bfloat16)
    assert rel_error(np.asarray(lora_segment_add(x, a, b, indices, coef, y), np.float32) - 1.0, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
def test_pallas_gradients_full_size_on_gpu():
    rng = np.random.default_rng(0)
    m, i, o, n, r = 512, 4096, 4096, 28, 8
    x = jnp.asarray(rng.standard_normal((m, i)), jnp.bfloat16)
    a = jnp.asarray(rng.standard_normal((n, i, r)) * i**-0.5, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((n, r, o)) * r**-0.5, jnp.bfloat16)
    scaling = jnp.full((n,), 2.0, jnp.float32)
    logits = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((m, o)), jnp.float32)

    def loss(strategy, x, logits):
        indices, weights = route(logits, 2, 2.0)
        return jnp.sum(lora_mixture(x, a, b, scaling, indices, weights, strategy) * cotangent)

    ours = jax.grad(loss, argnums=(1, 2))("pallas", x, logits)
    ref = jax.grad(loss, argnums=(1, 2))("bmm", x, logits)
    for g, r in zip(ours, ref):
        assert rel_error(g, r) < 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_segment_adds_into_the_base_output_in_place(dtype):
    # out = 50 is off the 16-column tile grid; 37 tokens over 5 adapters leave padding lanes in most blocks.
    x, a, b, indices, coef = problem((37, 100, 50, 5, 4, 2), dtype, seed=11)
    y = jnp.asarray(np.random.default_rng(12).standard_normal((37, 50)), dtype)
    before = np.asarray(y, np.float32).copy()
    out = lora_segment_add(x, a, b, indices, coef, y, blocks=SMALL_SEGMENT, interpret=True)
    delta = lora_gather_reference(x.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), indices, coef)
    assert out.dtype == y.dtype and out.shape == y.shape
    np.testing.assert_array_equal(np.asarray(y, np.float32), before)  # the caller's y is not consumed
    assert rel_error(np.asarray(out, np.float32) - before, delta) < TOLERANCE[dtype]
    with pytest.raises(ValueError, match=r"y has shape \(1, 50\)"):  # the few-token path checks y too
        mixture_pallas_add(x[:5], a, b, jnp.ones(5), indices[:5], coef[:5], y[:1], interpret=True)
    with pytest.raises(ValueError, match=r"y has shape \(37, 49\)"):
        lora_segment_add(x, a, b, indices, coef, y[:, :49], blocks=SMALL_SEGMENT, interpret=True)
