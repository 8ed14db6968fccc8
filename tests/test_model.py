"""Our Flax LLaMA against transformers' LlamaForCausalLM on tiny random models (CPU, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import params_from_hf, random_hf_model, tiny_config

from meteora_jax.model import KVCache, LlamaForCausalLM

F32_TOLERANCE = 1e-5


def rel_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def left_padded_batch(rng, vocab, lengths):
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), bool)
    for row, n in enumerate(lengths):
        tokens[row, width - n:] = rng.integers(3, vocab, n)
        mask[row, width - n:] = True
    return tokens, mask


def test_parameter_tree():
    config = tiny_config(layers=1, tied=False)
    params = LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype.name), params)
    linear = lambda i, o: {"kernel": ((i, o), "float32")}  # noqa: E731
    assert shapes == {
        "embed_tokens": {"embedding": ((97, 32), "float32")},
        "layers_0": {
            "input_layernorm": {"scale": ((32,), "float32")},
            "self_attn": {"q_proj": linear(32, 32), "k_proj": linear(32, 16), "v_proj": linear(32, 16),
                          "o_proj": linear(32, 32)},
            "post_attention_layernorm": {"scale": ((32,), "float32")},
            "mlp": {"gate_proj": linear(32, 64), "up_proj": linear(32, 64), "down_proj": linear(64, 32)},
        },
        "norm": {"scale": ((32,), "float32")},
        "lm_head": ((32, 97), "float32"),
    }


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_logits_match_transformers_with_left_padding(rng, heads, kv_heads, tied, rope):
    config = tiny_config(heads=heads, kv_heads=kv_heads, tied=tied, rope=rope)
    hf = random_hf_model(config, seed=int(rng.integers(1 << 30)))
    tokens, mask = left_padded_batch(rng, config.vocab_size, [9, 5, 1])
    ours, _ = LlamaForCausalLM(config).apply({"params": params_from_hf(hf, config)}, tokens, mask)
    # Transformers' plain forward does not derive positions from the mask; generate() does it this way.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(positions)).logits.numpy()
    assert rel_error(np.asarray(ours)[mask], ref[mask]) < F32_TOLERANCE


def test_llama3_rope_changes_the_function(rng):
    tokens = rng.integers(3, 97, (1, 40))
    base = tiny_config()
    hf = random_hf_model(base)
    params = params_from_hf(hf, base)
    plain, _ = LlamaForCausalLM(base).apply({"params": params}, tokens)
    scaled, _ = LlamaForCausalLM(tiny_config(rope="llama3")).apply({"params": params}, tokens)
    assert rel_error(scaled, plain) > 1e-3


def test_bfloat16_compute_stays_close_to_float32(rng):
    config = tiny_config()
    params = params_from_hf(random_hf_model(config), config)
    tokens = rng.integers(3, 97, (2, 12))
    f32, _ = LlamaForCausalLM(config).apply({"params": params}, tokens)
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16, _ = LlamaForCausalLM(config.replace(dtype="bfloat16", param_dtype="bfloat16")).apply(
        {"params": bf16_params}, tokens
    )
    assert bf16.dtype == jnp.float32
    assert rel_error(bf16, f32) < 3e-2


def test_cached_decode_equals_full_forward(rng):
    config = tiny_config()
    model = LlamaForCausalLM(config)
    params = params_from_hf(random_hf_model(config), config)
    tokens, mask = left_padded_batch(rng, config.vocab_size, [7, 4])
    extra = rng.integers(3, config.vocab_size, (2, 5))
    full_tokens = np.concatenate([tokens, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra, bool)], axis=1)
    full, _ = model.apply({"params": params}, full_tokens, full_mask)

    cache = KVCache.empty(config, batch=2, max_len=16)
    step_logits = []
    logits, cache = model.apply({"params": params}, tokens, mask, cache)
    step_logits.append(logits)
    for j in range(extra.shape[1]):
        logits, cache = model.apply({"params": params}, extra[:, j:j + 1], None, cache)
        step_logits.append(logits)
    cached = np.concatenate(step_logits, axis=1)
    assert int(cache.index) == full_tokens.shape[1]
    assert rel_error(cached[full_mask], np.asarray(full)[full_mask]) < F32_TOLERANCE


def test_sequence_longer_than_max_positions_is_refused():
    config = tiny_config(max_position_embeddings=8)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=8"):
        LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))


def test_packed_segments_equal_separate_rows(rng):
    config = tiny_config()
    model = LlamaForCausalLM(config)
    params = params_from_hf(random_hf_model(config), config)
    first, second = rng.integers(3, 97, 5), rng.integers(3, 97, 7)
    packed = np.concatenate([first, second, [0, 0]])[None]
    segments = np.asarray([[1] * 5 + [2] * 7 + [0, 0]])
    ours, _ = model.apply({"params": params}, packed, segment_ids=segments)
    alone = [model.apply({"params": params}, row[None])[0][0] for row in (first, second)]
    assert rel_error(np.asarray(ours)[0, :12], np.concatenate(alone)) < F32_TOLERANCE


def test_writing_past_the_cache_end_gives_nan_not_corruption(rng):
    config = tiny_config()
    model = LlamaForCausalLM(config)
    params = params_from_hf(random_hf_model(config), config)
    cache = KVCache.empty(config, batch=1, max_len=8)
    logits, cache = model.apply({"params": params}, rng.integers(3, 97, (1, 6)), None, cache)
    assert np.isfinite(np.asarray(logits)).all()
    overflow, _ = model.apply({"params": params}, rng.integers(3, 97, (1, 4)), None, cache)
    assert np.isnan(np.asarray(overflow)).all()
