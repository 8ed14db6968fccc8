"""The `fused` strategy's kernels (routed GEMM, tile shrink, missed add) against their plain-JAX references, and the
whole strategy against `loop`: interpreted on CPU (Mosaic GPU's and Triton's interpret modes), full size on a GPU."""

import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meteora_jax.lora_mixture import gated_output, lora_mixture, mixture_loop
from meteora_jax.meteora import MeteoraConfig, MeteoraDense
from meteora_jax.pallas.fused_linear import fused_linear
from meteora_jax.pallas.missed_add import (
    MissedAddBlockSizes,
    missed_add,
    missed_add_reference,
    missed_expand_add,
    missed_token_list,
)
from meteora_jax.pallas.routed_gemm import RoutedGemmBlockSizes, routed_gemm, routed_gemm_reference
from meteora_jax.pallas.tile_routing import slot_count, tile_slots
from meteora_jax.pallas.tile_shrink import (
    MissedChoices,
    TileShrinkBlockSizes,
    tile_shrink,
    tile_shrink_reference,
    tile_shrink_with_misses,
)
from meteora_jax.routing import Routing

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
# The smallest tiles the GEMM takes: 64 tokens (split over outputs) x 128 outputs x 64 inputs.
SMALL_GEMM = RoutedGemmBlockSizes(tile_m=64, tile_n=64, stages=2, split="n", grid_tile_width=2)


def rel_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def normal(rng, shape, scale=1.0, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def layer_operands(rng, t, i, o, n, r):
    return (normal(rng, (t, i)), normal(rng, (i, o), i**-0.5), normal(rng, (n, i, r), i**-0.5),
            normal(rng, (n, r, o), r**-0.5), jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32))


def runs_of_adapters(rng, t, n, run):
    """Top-2 routing in runs of `run` tokens, each run on one random pair, with softmax weights."""
    pairs = np.stack([rng.choice(n, 2, replace=False) for _ in range(-(-t // run))])
    indices = jnp.asarray(np.repeat(pairs, run, axis=0)[:t], jnp.int32)
    return indices, jnp.asarray(rng.dirichlet([1, 1], t), jnp.float32)


def reference_layer(x, w, a, b, scaling, indices, weights):
    f32 = [v.astype(jnp.float32) for v in (x, w, a, b)]
    return f32[0] @ f32[1] + mixture_loop(*f32[:1], *f32[2:], scaling, indices, weights)


# A bank of 8-row slots (the adapters' B at r = 8) and of one 64-row slot per tile (B_tile gathered by XLA).
@pytest.mark.parametrize("rows, bank_size", [(8, 5), (64, 2)])
@pytest.mark.parametrize("split", ["m", "n"])
def test_routed_gemm_matches_reference_interpreted(split, rows, bank_size):
    blocks = RoutedGemmBlockSizes(tile_m=64, tile_n=64, stages=2, split=split, grid_tile_width=2)
    rng = np.random.default_rng(0)
    t, i, o = 2 * blocks.tile_tokens, 192, 2 * blocks.tile_outputs  # more K steps than stages, 2 x 2 tiles
    x, w, h = normal(rng, (t, i)), normal(rng, (i, o), i**-0.5), normal(rng, (t, 64))
    bank = normal(rng, (bank_size, rows, o), 0.125)
    slots = jnp.asarray(rng.integers(0, bank_size, (2, 64 // rows)), jnp.int32)
    ours = routed_gemm(x, w, h, bank, slots, blocks=blocks, interpret=INTERPRET)
    assert ours.dtype == jnp.bfloat16 and ours.shape == (t, o)
    f32 = [v.astype(jnp.float32) for v in (x, w, h, bank)]
    assert rel_error(ours, routed_gemm_reference(*f32, slots)) < 4e-3  # bfloat16 rounding of the output
    delta_only = routed_gemm(jnp.zeros_like(x), w, h, bank, slots, blocks=blocks, interpret=INTERPRET)
    expected = routed_gemm_reference(jnp.zeros_like(f32[0]), *f32[1:], slots)
    assert rel_error(delta_only, expected) < 4e-3  # each tile's own slots, in order


# The persistent programs' shares of 6 tiles: 4 programs take 2, 2, 1 and 1 (the copy warpgroup's last waits then
# differ by program), 8 leave two programs with none; 3 stages outnumber a one-step K loop's steps per tile.
@pytest.mark.parametrize("programs, stages, inputs", [(4, 2, 128), (8, 3, 64)])
def test_routed_gemm_programs_with_unequal_or_no_tiles(programs, stages, inputs, monkeypatch):
    routed = importlib.import_module("meteora_jax.pallas.routed_gemm")
    monkeypatch.setattr(routed, "program_count", lambda interpret: programs)
    blocks = RoutedGemmBlockSizes(tile_m=64, tile_n=64, stages=stages, split="n", grid_tile_width=2)
    rng = np.random.default_rng(programs)
    t, o = 3 * blocks.tile_tokens, 2 * blocks.tile_outputs
    x, w, h = normal(rng, (t, inputs)), normal(rng, (inputs, o), inputs**-0.5), normal(rng, (t, 64))
    bank = normal(rng, (4, 8, o), 0.125)
    slots = jnp.asarray(rng.integers(0, 4, (3, 8)), jnp.int32)
    ours = routed_gemm(x, w, h, bank, slots, blocks=blocks, interpret=INTERPRET)
    f32 = [v.astype(jnp.float32) for v in (x, w, h, bank)]
    assert rel_error(ours, routed_gemm_reference(*f32, slots)) < 4e-3


def test_routed_gemm_rejects_bad_operands():
    rng = np.random.default_rng(1)
    x, w, h, b_tile = normal(rng, (64, 64)), normal(rng, (64, 128)), normal(rng, (64, 64)), normal(rng, (1, 64, 128))
    one_slot = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="does not tile by 64 tokens x 128 outputs x 64 inputs"):
        routed_gemm(x[:48], w, h[:48], b_tile, one_slot, blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"h \(64, 32\) must be \[64, 64\]"):
        routed_gemm(x, w, h[:, :32], b_tile, one_slot, blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"slots \(1, 2\) must be \[1, 64 // rows\] with the bank's rows \(64\)"):
        routed_gemm(x, w, h, b_tile, jnp.zeros((1, 2), jnp.int32), blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"the bank's rows \(0\) a multiple of 8 that divides 64"):
        routed_gemm(x, w, h, b_tile[:, :0], one_slot, blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"the bank's rows \(12\) a multiple of 8 that divides 64"):
        routed_gemm(x, w, h, b_tile[:, :12], jnp.zeros((1, 5), jnp.int32), blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match="must all be bfloat16"):
        routed_gemm(x.astype(jnp.float32), w, h, b_tile, one_slot, blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"x \(64,\) and w \(64, 128\) must be matrices"):
        routed_gemm(x[0], w, h, b_tile, one_slot, blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match="got float32 slots into a bank"):
        routed_gemm(x, w, h, b_tile, one_slot.astype(jnp.float32), blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"bank of at least one entry; got int32 slots into a bank \(0, 64, 128\)"):
        routed_gemm(x, w, h, b_tile[:0], one_slot, blocks=SMALL_GEMM, interpret=True)
    empty = routed_gemm(x[:0], w, h[:0], b_tile, one_slot[:0], blocks=SMALL_GEMM, interpret=True)
    assert empty.shape == (0, 128) and empty.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="tile_n=96 must be a multiple of 64"):
        RoutedGemmBlockSizes(tile_n=96)
    with pytest.raises(ValueError, match="tile_n=320 must be at most 256, one wgmma's widest output"):
        RoutedGemmBlockSizes(tile_n=320, stages=2)
    with pytest.raises(ValueError, match="split='k'"):
        RoutedGemmBlockSizes(split="k")
    with pytest.raises(ValueError, match="needs 278528 bytes of shared memory; a Hopper program has 232448"):
        RoutedGemmBlockSizes(stages=5)


def test_routed_gemm_names_the_gpu_it_needs(monkeypatch):
    monkeypatch.setattr(importlib.import_module("meteora_jax.pallas.routed_gemm"), "on_hopper", lambda: False)
    rng = np.random.default_rng(2)
    # Shapes no other test compiles, so the check runs at this trace.
    x, w, h, b_tile = normal(rng, (128, 64)), normal(rng, (64, 128)), normal(rng, (128, 64)), normal(rng, (2, 64, 128))
    with pytest.raises(ValueError, match=r"runs on a Hopper GPU \(compute capability 9.0: H100, H200\).*found"):
        routed_gemm(x, w, h, b_tile, jnp.arange(2)[:, None], blocks=SMALL_GEMM, interpret=False)


# Ranks 12, 13 and 24 are no powers of two: their lanes are padded (13 and 24 to 64 lanes, as many as h's columns).
@pytest.mark.parametrize("rank, in_features, splits", [(8, 96, 4), (8, 96, 1), (12, 64, 1), (13, 64, 2), (24, 48, 1),
                                                        (4, 72, 2), (64, 40, 2), (40, 64, 1), (32, 64, 1)])
def test_tile_shrink_matches_reference_interpreted(rank, in_features, splits):
    rng = np.random.default_rng(rank)
    t, n, tile = 128, 10, 64
    slots = max(1, 64 // rank)
    x, a = normal(rng, (t, in_features)), normal(rng, (n, in_features, rank))
    adapters = jnp.asarray(rng.integers(0, n, (t // tile, slots)), jnp.int32)
    coef = jnp.asarray(rng.standard_normal((t, slots)), jnp.float32)
    blocks = TileShrinkBlockSizes(block_tokens=32, block_in=32, splits=splits)
    ours = tile_shrink(x, a, adapters, coef, tile_tokens=tile, blocks=blocks, interpret=INTERPRET)
    ref = tile_shrink_reference(x, a, adapters, coef)
    assert ours.shape == (t, 64) and rel_error(ours, ref) < 1e-2
    np.testing.assert_array_equal(np.asarray(ours[:, slots * rank:], np.float32), 0)


def test_tile_shrink_splits_fill_the_gpu_until_set():
    blocks = TileShrinkBlockSizes()
    assert [blocks.split_count(t, 4096) for t in (1024, 4096, 8192, 16384, 65536)] == [4, 4, 2, 1, 1]
    assert blocks.split_count(4096, 256) == 2  # no more splits than input steps of 128
    assert TileShrinkBlockSizes(splits=3).split_count(4096, 4096) == 3
    with pytest.raises(ValueError, match="num_stages=0 must be >= 1"):
        TileShrinkBlockSizes(num_stages=0).check(128)


def test_tile_shrink_gradients_match_reference():
    rng = np.random.default_rng(6)
    t, n, i, rank, tile = 128, 4, 48, 12, 64  # 5 slots of 12: columns 60-63 are padding
    x, a = normal(rng, (t, i)), normal(rng, (n, i, rank))
    adapters = jnp.asarray([[0, 2, 2, 3, 1], [3, 0, 1, 1, 2]], jnp.int32)  # repeats: their A gradients add up
    coef = jnp.asarray(rng.standard_normal((t, 5)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((t, 64)), jnp.float32)
    blocks = TileShrinkBlockSizes(block_tokens=32, block_in=16)

    def loss(shrink, x, a, coef):
        return jnp.sum(shrink(x, a, coef).astype(jnp.float32) * cotangent)

    grads = jax.grad(loss, argnums=(1, 2, 3))(
        lambda x, a, c: tile_shrink(x, a, adapters, c, tile_tokens=tile, blocks=blocks, interpret=INTERPRET), x, a,
        coef)
    refs = jax.grad(loss, argnums=(1, 2, 3))(lambda x, a, c: tile_shrink_reference(x, a, adapters, c), x, a, coef)
    for name, g, ref, dtype in zip(("x", "lora_a", "coef"), grads, refs, (jnp.bfloat16, jnp.bfloat16, jnp.float32)):
        assert g.dtype == dtype and rel_error(g, ref) < 1e-2, name


# 4 and 8 programs (one and two splits of 4 blocks) walk 20-odd listed tokens of two tiles; rank 12 pads its lanes.
@pytest.mark.parametrize("rank, splits", [(8, 1), (8, 2), (12, 1)])
def test_tile_shrink_with_misses_adds_the_missed_pairs_shrink(rank, splits):
    rng = np.random.default_rng(10 + rank + splits)
    t, i, o, n, tile = 128, 64, 128, 10, 64
    slots = 64 // rank
    x, a = normal(rng, (t, i)), normal(rng, (n, i, rank))
    b, y = normal(rng, (n, rank, o)), normal(rng, (t, o))
    adapters = jnp.asarray(rng.integers(0, n, (t // tile, slots)), jnp.int32)
    coef = jnp.asarray(rng.standard_normal((t, slots)), jnp.float32)
    indices = jnp.asarray(rng.integers(0, n, (t, 2)), jnp.int32)
    missed = jnp.asarray(rng.standard_normal((t, 2)) * (rng.random((t, 2)) < 0.15), jnp.float32)
    missed = missed.at[70].set(jnp.asarray([0.5, -2.0]))  # both choices of one token missed
    misses = MissedChoices(indices, missed, *missed_token_list(missed, tile))
    blocks = TileShrinkBlockSizes(block_tokens=32, block_in=32, splits=splits)
    h, h_missed = tile_shrink_with_misses(x, a, adapters, coef, misses, tile_tokens=tile, missed_block_in=16,
                                          blocks=blocks, interpret=INTERPRET)
    np.testing.assert_array_equal(h, tile_shrink(x, a, adapters, coef, tile_tokens=tile, blocks=blocks,
                                                 interpret=INTERPRET))
    pairs = np.nonzero(np.asarray(missed))
    ref = (missed[..., None] * jnp.einsum("TI,TKIR->TKR", x.astype(jnp.float32), a[indices].astype(jnp.float32)))
    assert rel_error(h_missed[pairs][:, :rank], ref[pairs]) < 1e-5
    # The expand pass takes them as its own shrink pass would have written them.
    expand_blocks = MissedAddBlockSizes(programs=4, expand_programs=3, span_out=64, block_in=32, block_out=32)
    added = missed_expand_add(b, indices, missed, h_missed, y, misses[2:], blocks=expand_blocks, interpret=INTERPRET)
    assert rel_error(added - y, missed_add_reference(x, a, b, indices, missed, y) - y) < 1e-2
    with pytest.raises(ValueError, match=r"h \(128, 2, 8\) must be \(128, 2, 16\)"):
        missed_expand_add(b, indices, missed, h_missed[..., :8], y, misses[2:], blocks=expand_blocks, interpret=True)


def test_tile_shrink_with_misses_gives_h_gradients_and_none_to_the_missed_pairs():
    rng = np.random.default_rng(9)
    t, i, n, rank, tile = 128, 32, 4, 16, 64
    x, a = normal(rng, (t, i)), normal(rng, (n, i, rank))
    adapters = jnp.asarray([[0, 2, 3, 1], [3, 0, 1, 2]], jnp.int32)
    coef = jnp.asarray(rng.standard_normal((t, 4)), jnp.float32)
    missed = jnp.zeros((t, 2), jnp.float32).at[5, 1].set(1.0)
    misses = MissedChoices(jnp.zeros((t, 2), jnp.int32), missed, *missed_token_list(missed, tile))
    cotangent = jnp.asarray(rng.standard_normal((t, 64)), jnp.float32)
    blocks = TileShrinkBlockSizes(block_tokens=32, block_in=16)

    def loss(x, coef, with_misses):
        if not with_misses:
            return jnp.sum(tile_shrink(x, a, adapters, coef, tile_tokens=tile, blocks=blocks,
                                       interpret=INTERPRET).astype(jnp.float32) * cotangent)
        h, h_missed = tile_shrink_with_misses(x, a, adapters, coef, misses, tile_tokens=tile, missed_block_in=16,
                                              blocks=blocks, interpret=INTERPRET)
        return jnp.sum(h.astype(jnp.float32) * cotangent) + jnp.sum(h_missed[5, 1])

    for g, ref in zip(jax.grad(loss, argnums=(0, 1))(x, coef, True), jax.grad(loss, argnums=(0, 1))(x, coef, False)):
        np.testing.assert_array_equal(g, ref)
    with pytest.raises(ValueError, match=r"per_tile \(3,\), tokens \(128,\)\) must be .* \[2\] and \[128\]"):
        tile_shrink_with_misses(x, a, adapters, coef, misses._replace(per_tile=jnp.zeros(3, jnp.int32)),
                                tile_tokens=tile, missed_block_in=16, blocks=blocks, interpret=True)
    for block_in in (8, 24, 64):  # below Triton's tile rule, no power of two, past the 32 input features
        with pytest.raises(ValueError, match=f"missed_block_in={block_in} must be a power of two >= 16 that divides"):
            tile_shrink_with_misses(x, a, adapters, coef, misses, tile_tokens=tile, missed_block_in=block_in,
                                    blocks=blocks, interpret=True)


def test_tile_slots_keep_most_chosen_adapters_and_mark_misses():
    indices = jnp.asarray([[3, 1], [1, 0], [5, 2], [7, 4], [6, 6], [1, 2], [0, 2], [2, 0]], jnp.int32)
    adapters, slot = tile_slots(indices, num_adapters=8, tile_tokens=4, slots=3)
    # tile 0 chose 1 twice, 0,2,3,4,5,7 once (ties to the lower index); tile 1 chose 2 three times, 0 and 6 twice
    np.testing.assert_array_equal(adapters, [[1, 0, 2], [2, 0, 6]])
    np.testing.assert_array_equal(slot, [[3, 0], [0, 1], [3, 2], [3, 3], [2, 2], [3, 0], [1, 0], [0, 1]])
    only_token_4 = jnp.zeros((8, 2), bool).at[4].set(True)  # only token 4 votes: its adapter; unvoted slots hold 0
    adapters, slot = tile_slots(indices, 8, 4, 3, counted=only_token_4)
    np.testing.assert_array_equal(adapters, [[0, 0, 0], [6, 0, 0]])
    np.testing.assert_array_equal(slot[4:], [[0, 0], [3, 3], [3, 3], [3, 3]])  # slots of adapter 0 take no choice
    few_adapters, few_slot = tile_slots(indices % 2, 2, 8, 3)  # fewer adapters than slots: adapter 0 repeats
    np.testing.assert_array_equal(few_adapters, [[0, 1, 0]])
    assert int(few_slot.max()) == 1  # every choice found its slot


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), adapters=st.integers(1, 12), slots=st.integers(1, 6), top_k=st.integers(1, 3))
def test_tile_slots_hold_each_tile_s_most_chosen_and_point_at_them(seed, adapters, slots, top_k):
    rng = np.random.default_rng(seed)
    tiles, tile_tokens = 3, 8
    indices = rng.integers(0, adapters, (tiles * tile_tokens, top_k))
    kept, slot = map(np.asarray, tile_slots(jnp.asarray(indices, jnp.int32), adapters, tile_tokens, slots))
    for tile in range(tiles):
        rows = slice(tile * tile_tokens, (tile + 1) * tile_tokens)
        counts = np.bincount(indices[rows].ravel(), minlength=adapters)
        held = slot[rows] < slots
        # every choice in a slot points at its own adapter; the rest name adapters the tile does not keep
        np.testing.assert_array_equal(kept[tile][slot[rows][held]], indices[rows][held])
        assert not np.isin(indices[rows][~held], kept[tile][: min(slots, adapters)]).any()
        # no other choice of slots holds more of the tile's choices
        assert held.sum() == np.sort(counts)[::-1][:slots].sum()


# Programs past the listed tokens find nothing; tiles of 16 tokens (3 tiles) as the routing kernel lists them.
@pytest.mark.parametrize("programs, expand_programs, tile", [(1, 1, None), (20, 7, 16), (64, 48, None), (3, 5, 16)])
def test_missed_add_matches_reference_interpreted(programs, expand_programs, tile):
    rng = np.random.default_rng(2)
    t, i, o, n, r = 48, 64, 128, 6, 8
    x, a, b = normal(rng, (t, i), dtype=jnp.float32), normal(rng, (n, i, r), dtype=jnp.float32), normal(
        rng, (n, r, o), dtype=jnp.float32)
    indices = jnp.asarray(rng.integers(0, n, (t, 2)), jnp.int32)
    coef = jnp.asarray(rng.standard_normal((t, 2)) * (rng.random((t, 2)) < 0.3), jnp.float32).at[:8].set(0)
    coef = coef.at[9].set(1.5)  # both choices of one token: its program adds them one after the other
    y = normal(rng, (t, o), dtype=jnp.float32)
    blocks = MissedAddBlockSizes(programs=programs, expand_programs=expand_programs, span_out=64, block_in=32,
                                 block_out=32)
    listed = None if tile is None else missed_token_list(coef, tile)
    ours = missed_add(x, a, b, indices, coef, y, listed, blocks=blocks, interpret=INTERPRET)
    assert rel_error(ours - y, missed_add_reference(x, a, b, indices, coef, y) - y) < 1e-5
    np.testing.assert_array_equal(ours[:8], y[:8])  # tokens with no misses are left as they were
    nothing = missed_add(x, a, b, indices, jnp.zeros_like(coef), y, blocks=blocks, interpret=INTERPRET)
    np.testing.assert_array_equal(nothing, y)
    with pytest.raises(ValueError, match="does not tile by 32 inputs and spans of 64 outputs"):
        missed_add(x, a, b[:, :, :96], indices, coef, y[:, :96], blocks=blocks, interpret=True)
    with pytest.raises(ValueError, match=r"per_tile \(5,\) and tokens \(48,\), must count whole tiles"):
        missed_add(x, a, b, indices, coef, y, (jnp.zeros(5, jnp.int32), jnp.arange(48)), blocks=blocks,
                   interpret=True)


def test_missed_token_list_puts_each_tile_s_missed_tokens_first():
    coef = jnp.zeros((8, 2)).at[1, 1].set(0.5).at[3, 0].set(-1.0).at[6, 0].set(2.0)
    per_tile, tokens = missed_token_list(coef, 4)
    np.testing.assert_array_equal(per_tile, [2, 1])
    np.testing.assert_array_equal(tokens, [1, 3, 0, 2, 6, 4, 5, 7])


# r = 16: 4 slots per tile, whose B rows the GEMM gathers; r = 12 and 24: 5 and 2 slots, B_tile gathered by XLA
@pytest.mark.parametrize("case, r", [("runs", 16), ("runs past the slots", 16), ("runs past the slots", 12),
                                     ("runs past the slots", 24)])
def test_fused_linear_matches_loop_with_gradients(case, r):
    rng = np.random.default_rng(3)
    t, i, o, n = 100, 128, 128, 12  # 100 tokens: padded to 128
    x, w, a, b, scaling = layer_operands(rng, t, i, o, n, r)
    indices, weights = runs_of_adapters(rng, t, n, run=32)
    if case == "runs past the slots":  # tile 1 chooses from 8 adapters or more: its extras take missed_add
        indices = indices.at[64:, 1].set(jnp.asarray(rng.integers(0, n, t - 64), jnp.int32))
    slots = slot_count(r)
    adapters, slot = tile_slots(jnp.pad(indices, ((0, 28), (0, 0))), n, SMALL_GEMM.tile_tokens, slots)
    assert bool(jnp.any(slot >= slots)) == (case == "runs past the slots")

    def fused(x, weights, w, a, b):
        return fused_linear(x, w, a, b, scaling, indices, weights, blocks=SMALL_GEMM, interpret=INTERPRET)

    operands = (x, weights, w, a, b)
    ours = fused(*operands)
    assert ours.shape == (t, o) and ours.dtype == jnp.bfloat16
    assert rel_error(ours, reference_layer(x, w, a, b, scaling, indices, weights)) < 1e-2
    cotangent = jnp.asarray(rng.standard_normal((t, o)), jnp.float32)
    # Gate training needs x's and the weights' gradients; LoRA training (forced routing) the adapters'.
    grads = jax.grad(lambda *v: jnp.sum(fused(*v).astype(jnp.float32) * cotangent), argnums=range(5))(*operands)
    refs = jax.grad(lambda x, wt, w, a, b: jnp.sum(reference_layer(x, w, a, b, scaling, indices, wt) * cotangent),
                    argnums=range(5))(*operands)
    for name, g, ref in zip(("x", "weights", "w", "lora_a", "lora_b"), grads, refs):
        assert rel_error(g, ref) < 2e-2, name


def test_fused_runs_the_adapters_gradient_kernel_only_where_they_train():
    """Gate training differentiates x and the routing weights alone: the miss path's backward then leaves out the
    kernel of the adapters' gradients, which LoRA training needs."""
    rng = np.random.default_rng(8)
    x, w, a, b, scaling = layer_operands(rng, 128, 128, 128, 12, 8)
    indices, weights = runs_of_adapters(rng, 128, 12, run=1)

    def loss(x, weights, a, b):
        y = fused_linear(x, w, a, b, scaling, indices, weights, blocks=SMALL_GEMM, interpret=INTERPRET)
        return jnp.sum(y.astype(jnp.float32))

    def kernels(argnums):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(x, weights, a, b))
        return {name for name in ("meteora_pair_grads", "meteora_pair_adapter_grads") if name in jaxpr}

    assert kernels((0, 1)) == {"meteora_pair_grads"}
    assert kernels((0, 1, 2, 3)) == kernels((3,)) == {"meteora_pair_grads", "meteora_pair_adapter_grads"}


def test_fused_takes_no_cotangent_from_a_custom_vjp_downstream():
    rng = np.random.default_rng(9)
    x, w, a, b, scaling = layer_operands(rng, 128, 128, 128, 12, 8)
    indices, weights = runs_of_adapters(rng, 128, 12, run=1)

    @jax.custom_vjp
    def blocked(y):
        return y

    blocked.defvjp(lambda y: (y, None), lambda _, g: (None,))

    def loss(x, a):
        y = fused_linear(x, w, a, b, scaling, indices, weights, blocks=SMALL_GEMM, interpret=INTERPRET)
        return jnp.sum(blocked(y).astype(jnp.float32)) + jnp.sum(x.astype(jnp.float32))

    dx, da = jax.grad(loss, argnums=(0, 1))(x, a)
    np.testing.assert_array_equal(dx, jnp.ones_like(x))
    np.testing.assert_array_equal(da, jnp.zeros_like(a))


def test_fused_linear_names_the_callers_shapes():
    rng = np.random.default_rng(11)
    x, w, a, b, scaling = layer_operands(rng, 100, 64, 128, 4, 8)
    indices, weights = runs_of_adapters(rng, 100, 4, run=32)
    with pytest.raises(ValueError, match=r"indices \(90, 2\) and weights \(90, 2\) \[100, K\] for x \(100, 64\)"):
        fused_linear(x, w, a, b, scaling, indices[:90], weights[:90], blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"scaling \(3,\) must be \[4\]"):
        fused_linear(x, w, a, b, scaling[:3], indices, weights, blocks=SMALL_GEMM, interpret=True)
    with pytest.raises(ValueError, match=r"w \(64, 128\) does not tile by 64 inputs x 256 outputs"):
        fused_linear(x, w, a, b, scaling, indices, weights, interpret=True)
    empty = fused_linear(x[:0], w, a, b, scaling, indices[:0], weights[:0], blocks=SMALL_GEMM, interpret=True)
    assert empty.shape == (0, 128) and empty.dtype == jnp.bfloat16


@pytest.mark.parametrize("n, run", [(16, 96), (128, 96), (128, 1)])  # N r past 512; run 1: every choice random
def test_fused_gradients_keep_no_per_token_copy_of_the_adapters(n, run):
    rng = np.random.default_rng(5)
    t, i, o, r = 2048, 512, 512, 8
    x, w, a, b, scaling = layer_operands(rng, t, i, o, n, r)
    indices, weights = runs_of_adapters(rng, t, n, run=run)

    def loss(x, weights, w, a, b, scaling, indices):
        y = fused_linear(x, w, a, b, scaling, indices, weights, blocks=SMALL_GEMM, interpret=INTERPRET)
        return jnp.sum(y.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, weights, w, a, b, scaling, indices).compile()
    # The bound: one [T, K, I, r] float32 copy of A. The miss path's backward once differentiated a per-token
    # gather of A and B and held 4.4x it here; now 0.56-0.65x on CPU, whatever N and the share of misses.
    per_token_a = t * 2 * i * r * 4
    assert grads.memory_analysis().temp_size_in_bytes < per_token_a


def test_fused_rejects_what_it_cannot_run():
    rng = np.random.default_rng(4)
    x, w, a, b, scaling = layer_operands(rng, 8, 64, 128, 3, 128)
    indices, weights = runs_of_adapters(rng, 8, 3, run=8)
    with pytest.raises(ValueError, match="ranks up to 64; the adapters have rank 128"):
        fused_linear(x, w, a, b, scaling, indices, weights, interpret=True)
    with pytest.raises(ValueError, match="needs the base weight"):
        gated_output(x, x @ w, jnp.zeros((64, 3)), a, b, scaling, 2, 1.0, "fused")
    with pytest.raises(ValueError, match="use gated_output or MeteoraDense"):
        lora_mixture(x, a, b, scaling, indices, weights, "fused")


def test_meteora_dense_fused_matches_loop_gated_and_forced():
    rng = np.random.default_rng(5)
    config = MeteoraConfig(num_adapters=6, rank=8, targets=("q_proj",), strategy="loop")
    layer = MeteoraDense(256, config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = normal(rng, (2, 40, 64))  # 80 tokens: one padded tile of the default 128
    params = flax.core.unfreeze(layer.init(jax.random.key(0), x))
    bank = params["params"]["meteora"]
    bank["lora_b"] = jnp.asarray(rng.standard_normal(bank["lora_b"].shape), jnp.float32)
    assignment = jnp.asarray(rng.integers(-1, 6, (2, 40)))
    for routing in ({}, {"force_adapter": 4}, {"assignment": assignment}):
        ours = layer.apply(params, x, routing=Routing(strategy="fused", **routing))
        ref = layer.apply(params, x, routing=Routing(strategy="loop", **routing))
        assert rel_error(ours, ref) < 1e-2, routing


def test_auto_takes_fused_for_long_bfloat16_prompts_where_its_tiles_fit(monkeypatch):
    from meteora_jax import lora_mixture
    from meteora_jax.pallas.routed_gemm import LANE

    blocks = RoutedGemmBlockSizes()
    fused_limits = (lora_mixture.FUSED_INPUT_MULTIPLE, lora_mixture.FUSED_OUTPUT_MULTIPLE, lora_mixture.FUSED_MAX_RANK)
    assert fused_limits == (blocks.tile_k, blocks.tile_outputs, LANE)
    assert lora_mixture.FUSED_TILE_TOKENS == blocks.tile_tokens  # train.gates reports the GEMM's own tiles
    monkeypatch.setattr(lora_mixture.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(lora_mixture, "on_hopper", lambda: True)
    pick, bf16, square = lora_mixture.pick_strategy, jnp.bfloat16, (4096, 4096)
    long = lora_mixture.FUSED_MIN_TOKENS
    assert pick(256, 8, long, bf16, square) == "fused"
    assert pick(28, 8, long, bf16, (4096, 14336)) == "fused"
    assert pick(28, 64, long, bf16, square) == "fused"
    assert pick(256, 8, long - 1, bf16, square) == "bmm"
    assert pick(256, 8, long, bf16) == "bmm"  # no base weight at hand
    assert pick(256, 8, long, jnp.float32, square) == "bmm"
    assert pick(256, 8, long, bf16, (576, 576)) == "bmm"  # 576 outputs are not whole 256-output tiles
    assert pick(256, 8, long, bf16, (4000, 4096)) == "bmm"
    assert pick(8, 128, long, bf16, square) == "bmm"  # rank past the GEMM's 64 columns
    assert pick(28, 8, 16, bf16, square) == "pallas"  # the decode kernels
    monkeypatch.setattr(lora_mixture, "on_hopper", lambda: False)
    assert pick(256, 8, long, bf16, square) == "bmm"  # the routed GEMM needs Hopper's wgmma and TMA


def test_meteora_dense_auto_offers_fused_only_to_calls_marked_inference(monkeypatch):
    from meteora_jax import meteora

    shapes = []

    def pick_fused(num_adapters, rank, tokens=None, dtype=None, fused_shape=None):
        shapes.append((tokens, fused_shape))
        return "fused"

    monkeypatch.setattr(meteora, "pick_strategy", pick_fused)
    rng = np.random.default_rng(6)
    layer = MeteoraDense(256, MeteoraConfig(num_adapters=4, rank=8, targets=("q_proj",)), dtype=jnp.bfloat16)
    x = normal(rng, (1, 40, 64))
    params = layer.init(jax.random.key(0), x)
    for routing in ({}, {"force_adapter": 2}):
        auto = layer.apply(params, x, routing=Routing(strategy="auto", inference=True, **routing))
        np.testing.assert_array_equal(auto, layer.apply(params, x, routing=Routing(strategy="fused", **routing)))
        layer.apply(params, x, routing=Routing(strategy="auto", **routing))  # may be differentiated: no offer
    assert shapes == [(40, (64, 256))] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size kernel tests need a GPU")
@pytest.mark.parametrize("tokens, out_features, random_routing", [(4096, 4096, False), (1000, 1024, True)])
def test_fused_full_size_on_gpu(tokens, out_features, random_routing):
    rng = np.random.default_rng(tokens)
    n, r = 64, 8
    x, w, a, b, scaling = layer_operands(rng, tokens, 4096, out_features, n, r)
    indices, weights = runs_of_adapters(rng, tokens, n, run=1 if random_routing else 256)
    ours = fused_linear(x, w, a, b, scaling, indices, weights)
    assert rel_error(ours, reference_layer(x, w, a, b, scaling, indices, weights)) < 1e-2


def test_fused_missed_share_counts_the_choices_past_the_slots():
    from meteora_jax.training import fused_missed_share


    # Two tiles of 4 tokens, rank 21: 3 slots; tile 0 keeps 1, 0, 2 (3, 4, 5, 7 miss), tile 1 keeps 2, 0, 6 (1 misses).
    indices = jnp.asarray([[3, 1], [1, 0], [5, 2], [7, 4], [6, 6], [1, 2], [0, 2], [2, 0]], jnp.int32)
    share = fused_missed_share(indices.reshape(2, 4, 2), num_adapters=8, rank=21, tile_tokens=4)
    assert float(share) == pytest.approx(5 / 16)
    # 3 tokens padded to a tile of 4: the padding neither votes for adapter 0 nor counts as a pair
    assert float(fused_missed_share(jnp.asarray([[3, 4], [5, 3], [4, 5]]), 8, 21, tile_tokens=4)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="auto takes fused only on a GPU")
def test_model_prompt_takes_fused_under_auto_and_matches_loop_on_gpu(monkeypatch):
    from hf_reference import tiny_config

    from meteora_jax import lora_mixture, meteora
    from meteora_jax.lora_mixture import fused_output
    from meteora_jax.meteora import MeteoraLinear
    from meteora_jax.model import LlamaForCausalLM

    calls = []

    def counted_fused_output(*args):
        calls.append(args[1].shape)
        return fused_output(*args)

    monkeypatch.setattr(lora_mixture, "fused_output", counted_fused_output)  # gated_output's
    monkeypatch.setattr(meteora, "fused_output", counted_fused_output)  # forced routing's
    # Every projection's in/out features fit the GEMM's tiles (64 inputs, 256 outputs: k and v have 2 heads of 128);
    # 4 x 1024 prompt tokens.
    config = tiny_config(hidden_size=512, intermediate_size=1024, vocab_size=128, max_position_embeddings=1024,
                         dtype="bfloat16")
    model = LlamaForCausalLM(config, linear=MeteoraLinear(MeteoraConfig(num_adapters=8, rank=8)))
    tokens = jnp.asarray(np.random.default_rng(7).integers(3, 128, (4, 1024)), jnp.int32)
    params = model.init(jax.random.key(0), tokens[:, :4])["params"]
    for routing, b_scale in (({"force_adapter": 3}, 0.3), ({}, 0.03)):
        # Random B makes the adapters matter. Under gated routing, bfloat16 rounding (which differs between
        # strategies) flips some near-tied top-2 choices in the second layer, so B is smaller there.
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, x: jax.random.normal(jax.random.key(len(path)), x.shape, x.dtype) * b_scale
            if path[-1].key == "lora_b" else x, params)
        calls.clear()
        ours, _ = model.apply({"params": scaled}, tokens, routing=Routing(inference=True, **routing))
        assert len(calls) == 7 * config.num_hidden_layers, routing  # every projection of every layer took fused
        ref, _ = model.apply({"params": scaled}, tokens, routing=Routing(strategy="loop", **routing))
        assert rel_error(ours, ref) < 2e-2, routing
