"""Routing kernels against their XLA forms: top-k routing of many tokens (meteora_jax/pallas/route_tokens.py) and
the `fused` strategy's tile slots (tile_routing.py); interpreted on CPU, full size on a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax.pallas.route_tokens import RouteBlockSizes, route_tokens, route_tokens_reference
from meteora_jax.pallas.tile_routing import TileRoutingBlockSizes, route_tiles, route_tiles_reference

ON_GPU = jax.default_backend() == "gpu"


def logits_with_ties(t, n, seed):
    """Small integers: many logits tie, so the order of equal values is checked too."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(-3, 4, (t, n)), jnp.float32)


def assert_routes_alike(logits, top_k, temperature, blocks, interpret):
    indices, weights = route_tokens(logits, top_k, temperature, blocks=blocks, interpret=interpret)
    ref_indices, ref_weights = route_tokens_reference(logits, top_k, temperature)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)


# 37 tokens: the last block is part padding; N = 6 and 100 are no power of two; N = 1 with k = 1.
@pytest.mark.parametrize("t, n, top_k", [(37, 6, 2), (37, 100, 2), (5, 1, 1), (64, 64, 4)])
def test_matches_route_with_ties_interpreted(t, n, top_k):
    blocks = RouteBlockSizes(block_tokens=16, num_warps=4)
    assert_routes_alike(logits_with_ties(t, n, seed=t + n), top_k, 1.0, blocks, interpret=not ON_GPU)
    random = jnp.asarray(np.random.default_rng(n).standard_normal((t, n)), jnp.float32)
    assert_routes_alike(random, top_k, 0.5, blocks, interpret=not ON_GPU)


def test_nan_logits_route_as_xla_does():
    """A NaN counts as the largest logit (XLA's argmax): no index past the adapters, whatever the row holds."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((20, 6)), jnp.float32)
    logits = logits.at[3, 4].set(jnp.nan).at[5].set(jnp.nan).at[7, 1].set(-jnp.inf).at[7, 5].set(jnp.nan)
    indices, weights = route_tokens(logits, 2, 1.0, interpret=not ON_GPU)
    ref_indices, ref_weights = route_tokens_reference(logits, 2, 1.0)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(np.isnan(weights), np.isnan(ref_weights))
    assert int(indices.max()) < 6


def test_gradient_matches_route():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((40, 12)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((40, 2)), jnp.float32)

    def loss(routing):
        return lambda logits: jnp.sum(routing(logits)[1] * cotangent)

    ours = jax.grad(loss(lambda v: route_tokens(v, 2, 0.7, interpret=not ON_GPU)))(logits)
    ref = jax.grad(loss(lambda v: route_tokens_reference(v, 2, 0.7)))(logits)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert int(jnp.sum(ours != 0)) <= 2 * 40  # only the chosen logits get a gradient


@pytest.mark.parametrize("shares", [1, 2, 3])
def test_shares_route_as_their_sum(shares):
    """Shares [T, S, N] of a split gate matmul route as their sum, and each takes the logits' gradient."""
    rng = np.random.default_rng(shares)
    parts = jnp.asarray(rng.standard_normal((37, shares, 20)), jnp.float32)
    blocks = RouteBlockSizes(block_tokens=16, num_warps=4)
    indices, weights = route_tokens(parts, 2, 0.7, blocks=blocks, interpret=not ON_GPU)
    summed = functools.reduce(jnp.add, [parts[:, s] for s in range(shares)])
    ref_indices, ref_weights = route_tokens_reference(summed, 2, 0.7)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
    cotangent = jnp.asarray(rng.standard_normal((37, 2)), jnp.float32)
    grads = jax.grad(lambda v: jnp.sum(route_tokens(v, 2, 0.7, blocks=blocks, interpret=not ON_GPU)[1] * cotangent))(
        parts)
    ref = jax.grad(lambda v: jnp.sum(route_tokens_reference(v, 2, 0.7)[1] * cotangent))(summed)
    for s in range(shares):
        np.testing.assert_allclose(grads[:, s], ref, rtol=1e-5, atol=1e-6)


def test_no_tokens_route_to_nothing():
    indices, weights = route_tokens(jnp.zeros((0, 2, 5)), 2, 1.0, interpret=not ON_GPU)
    assert indices.shape == weights.shape == (0, 2) and indices.dtype == jnp.int32


def test_bad_arguments_name_the_culprit():
    logits = jnp.zeros((8, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"top_k=4 must be between 1 and the number of adapters \(3\)"):
        route_tokens(logits, 4, 1.0, interpret=True)
    with pytest.raises(ValueError, match="pass a Python number"):
        route_tokens(logits, 2, jnp.float32(1.0), interpret=True)
    with pytest.raises(ValueError, match=r"logits \(1, 8, 3, 1\) must be \[tokens, adapters\] or shares"):
        route_tokens(logits[None, ..., None], 2, 1.0, interpret=True)
    with pytest.raises(ValueError, match=r"logits \(8, 0, 3\) must be"):
        route_tokens(jnp.zeros((8, 0, 3)), 2, 1.0, interpret=True)
    with pytest.raises(ValueError, match="block_tokens=12 must be a power of two"):
        route_tokens(logits, 2, 1.0, blocks=RouteBlockSizes(block_tokens=12), interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("n", [28, 256, 1024])
def test_full_size_on_gpu(n):
    assert_routes_alike(logits_with_ties(16384, n, seed=n), 2, 1.0, RouteBlockSizes(), interpret=False)
    random = jax.random.normal(jax.random.key(n), (16384, n), jnp.float32)
    assert_routes_alike(random, 2, 1.0, RouteBlockSizes(), interpret=False)


# N = 3: fewer adapters than slots; N = 300: no power of two. Runs of 24 tokens with every third choice random, and
# some weights exactly 0 (they take no vote), so tiles hold more adapters than slots and counts tie.
# Tiles of 48 tokens: no power of two, so each program's block runs past its tile.
# 5 slots (r = 12).
@pytest.mark.parametrize("n, slots, tile", [(3, 8, 64), (12, 4, 64), (300, 8, 64), (12, 4, 48), (40, 5, 64)])
def test_tile_routing_matches_reference_interpreted(n, slots, tile):
    rng = np.random.default_rng(n)
    t = 4 * tile
    runs = np.repeat(np.stack([rng.choice(n, 2, replace=n < 2) for _ in range(t // 24 + 1)]), 24, axis=0)[:t]
    indices = np.where(rng.random((t, 2)) < 0.3, rng.integers(0, n, (t, 2)), runs)
    indices[:, 1] = np.where(indices[:, 1] == indices[:, 0], (indices[:, 0] + 1) % n, indices[:, 1])
    weights = rng.dirichlet([1, 1], t) * (rng.random((t, 2)) > 0.1)
    indices, weights = jnp.asarray(indices, jnp.int32), jnp.asarray(weights, jnp.float32)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    blocks = TileRoutingBlockSizes(num_warps=4)
    ours = route_tiles(indices, weights, scaling, tile_tokens=tile, slots=slots, blocks=blocks, interpret=not ON_GPU)
    ref = route_tiles_reference(indices, weights, scaling, tile_tokens=tile, slots=slots)
    for field, got, want in zip(ref._fields, ours, ref):
        np.testing.assert_array_equal(got, want, err_msg=field)
    assert n < slots or bool(jnp.any(ref.missed != 0))  # some choices miss their tile's slots
    assert n < slots or 0 < int(ref.tile_misses.sum()) < t

    def loss(routing):
        return lambda w, s: jnp.sum(jnp.sin(routing(w, s)[1])) + jnp.sum(routing(w, s)[2] ** 2)

    ours_grads = jax.grad(loss(lambda w, s: route_tiles(indices, w, s, tile_tokens=tile, slots=slots, blocks=blocks,
                                                         interpret=not ON_GPU)), argnums=(0, 1))(weights, scaling)
    ref_grads = jax.grad(loss(lambda w, s: route_tiles_reference(indices, w, s, tile_tokens=tile, slots=slots)),
                         argnums=(0, 1))(weights, scaling)
    for got, want in zip(ours_grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_tile_routing_padding_rows_take_nothing_from_an_infinite_scaling():
    # Tiles of 12 tokens: each program's block of 16 rows runs past its tile. Adapter 0, which no token chooses,
    # scales by inf: a padding row's 0 x inf is NaN, which must not vote or count as a miss.
    t = 24
    indices = jnp.stack([jnp.full(t, 5), 1 + jnp.arange(t) % 4], axis=1).astype(jnp.int32)
    weights = jnp.full((t, 2), 0.5, jnp.float32)
    scaling = jnp.ones(8, jnp.float32).at[0].set(jnp.inf)
    ours = route_tiles(indices, weights, scaling, tile_tokens=12, slots=1, blocks=TileRoutingBlockSizes(num_warps=4),
                       interpret=not ON_GPU)
    ref = route_tiles_reference(indices, weights, scaling, tile_tokens=12, slots=1)
    for field, got, want in zip(ref._fields, ours, ref):
        np.testing.assert_array_equal(got, want, err_msg=field)
    np.testing.assert_array_equal(ref.tile_misses, [12, 12])


def test_tile_routing_keeps_an_infinite_coefficient_to_its_own_slot():
    """A chosen adapter that scales by inf: its slot's coefficient is inf, the other slots' stay finite, in the
    kernel and the reference alike."""
    indices = jnp.tile(jnp.asarray([[0, 1]], jnp.int32), (16, 1))
    scaling = jnp.asarray([jnp.inf, 1.0], jnp.float32)
    ours = route_tiles(indices, jnp.ones((16, 2), jnp.float32), scaling, tile_tokens=16, slots=2, interpret=not ON_GPU)
    ref = route_tiles_reference(indices, jnp.ones((16, 2), jnp.float32), scaling, tile_tokens=16, slots=2)
    for field, got, want in zip(ref._fields, ours, ref):
        np.testing.assert_array_equal(got, want, err_msg=field)
    np.testing.assert_array_equal(ref.per_slot[0], [jnp.inf, 1.0])


def test_tile_routing_names_bad_shapes():
    indices, weights, scaling = jnp.zeros((100, 2), jnp.int32), jnp.zeros((100, 2)), jnp.ones(4)
    with pytest.raises(ValueError, match="the tokens tile by 64"):
        route_tiles(indices, weights, scaling, tile_tokens=64, slots=8, interpret=True)
    with pytest.raises(ValueError, match="num_warps=3 must be"):
        route_tiles(indices[:64], weights[:64], scaling, tile_tokens=64, slots=8,
                    blocks=TileRoutingBlockSizes(num_warps=3), interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("n", [28, 256, 1024])  # votes counted per adapter at 28 and 256, pairwise at 1024
def test_tile_routing_full_size_on_gpu(n):
    rng = np.random.default_rng(n)
    t = 16384
    runs = np.repeat(rng.integers(0, n, (t // 96 + 1, 2)), 96, axis=0)[:t]  # runs of 96, 5% of choices random
    indices = np.where(rng.random((t, 2)) < 0.05, rng.integers(0, n, (t, 2)), runs)
    indices[:, 1] = np.where(indices[:, 1] == indices[:, 0], (indices[:, 0] + 1) % n, indices[:, 1])
    indices = jnp.asarray(indices, jnp.int32)
    weights = jnp.asarray(rng.dirichlet([1, 1], t), jnp.float32)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    ours = route_tiles(indices, weights, scaling, tile_tokens=128, slots=8)
    ref = route_tiles_reference(indices, weights, scaling, tile_tokens=128, slots=8)
    for field, got, want in zip(ref._fields, ours, ref):
        np.testing.assert_array_equal(got, want, err_msg=field)
