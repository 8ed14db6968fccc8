"""generate(): batching, EOS handling, sampling, and greedy parity with transformers' generate()."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import params_from_hf, random_hf_model, tiny_config

from meteora_jax.generate import generate
from meteora_jax.model import LlamaForCausalLM
from meteora_jax.sampling import Sampling, top_p_filter


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    hf = random_hf_model(config, seed=3)
    return config, hf, LlamaForCausalLM(config), params_from_hf(hf, config)


def random_prompts(rng, lengths):
    return [rng.integers(3, 97, n).tolist() for n in lengths]


def test_greedy_matches_transformers_generate(rng, tiny):
    config, hf, model, params = tiny
    for prompt in random_prompts(rng, [6, 1, 11]):
        ours = generate(model, params, [prompt], max_new_tokens=16, eos_ids=(2,)).tokens[0]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()[: len(ours)]
        assert len(ours) == 16 or ours[-1] == 2


def test_batched_equals_one_prompt_at_a_time(rng, tiny):
    _, _, model, params = tiny
    prompts = random_prompts(rng, [3, 9, 5, 1])
    batched = generate(model, params, prompts, max_new_tokens=10)
    for prompt, tokens in zip(prompts, batched.tokens):
        assert generate(model, params, [prompt], max_new_tokens=10).tokens[0] == tokens


def test_stops_at_eos_and_reports_it(rng, tiny):
    _, _, model, params = tiny
    prompt = random_prompts(rng, [5])[0]
    free = generate(model, params, [prompt], max_new_tokens=8).tokens[0]
    stop = free[3]
    stopped = generate(model, params, [prompt, prompt], max_new_tokens=8, eos_ids=(stop,))
    first = free.index(stop)
    assert stopped.tokens == [free[: first + 1]] * 2
    assert stopped.finished == [True, True]


def test_sampling_is_seeded(rng, tiny):
    _, _, model, params = tiny
    prompts = random_prompts(rng, [4, 6])
    hot = Sampling(temperature=5.0, top_p=0.95)
    a = generate(model, params, prompts, max_new_tokens=12, sampling=hot, seed=7).tokens
    b = generate(model, params, prompts, max_new_tokens=12, sampling=hot, seed=7).tokens
    c = generate(model, params, prompts, max_new_tokens=12, sampling=hot, seed=8).tokens
    assert a == b
    assert a != c


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    filtered = np.asarray(top_p_filter(jnp.log(jnp.asarray(probs)), 0.7))
    assert np.isfinite(filtered).tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(top_p_filter(jnp.log(jnp.asarray(probs)), 0.01))).sum() == 1


def test_tiny_top_p_is_greedy(rng, tiny):
    _, _, model, params = tiny
    prompt = random_prompts(rng, [6])
    greedy = generate(model, params, prompt, max_new_tokens=8).tokens
    assert generate(model, params, prompt, max_new_tokens=8, sampling=Sampling(temperature=1.0, top_p=1e-6),
                    seed=1).tokens == greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": [[]]}, "at least one token"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"prompts": [[5] * 250], "max_new_tokens": 10}, "exceeds max_position_embeddings=256"),
    ],
)
def test_bad_requests(tiny, kwargs, message):
    _, _, model, params = tiny
    call = {"prompts": [[5, 6]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, params, call.pop("prompts"), **call)


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
