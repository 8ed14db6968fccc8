"""The embedded real model: SmolLM2-135M-Instruct from its GGUF, against transformers on the same file."""

import json

import numpy as np
import torch

from meteora_jax.checkpoint import load_model
from meteora_jax.generate import encode_prompts, generate, stop_ids
from meteora_jax.generate import main as generate_main

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]
NEW_TOKENS = 32


def test_greedy_answers_are_token_identical_to_transformers(smollm2_checkpoint, smollm2_hf):
    loaded = load_model(smollm2_checkpoint)
    prompt_ids = encode_prompts(loaded.tokenizer, PROMPTS, chat=True)
    eos = stop_ids(loaded.config, loaded.tokenizer)
    ours = generate(loaded.module, loaded.params, prompt_ids, max_new_tokens=NEW_TOKENS, eos_ids=eos)
    for ids, tokens in zip(prompt_ids, ours.tokens):
        with torch.no_grad():
            ref = smollm2_hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=list(eos))
        assert tokens == ref[0, len(ids):].tolist()
    assert "Paris" in loaded.tokenizer.decode(ours.tokens[0])


def test_prompt_logits_match_transformers(smollm2_checkpoint, smollm2_hf):
    loaded = load_model(smollm2_checkpoint)
    ids = encode_prompts(loaded.tokenizer, PROMPTS[:1], chat=True)[0]
    ours, _ = loaded.module.apply({"params": loaded.params}, np.asarray([ids]))
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits.numpy()
    assert np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref) < 1e-5


def test_generate_cli_prints_json(smollm2_checkpoint, capsys):
    assert generate_main(["--checkpoint", str(smollm2_checkpoint), "--prompt", PROMPTS[0], "--chat",
                          "--max-new-tokens", "8", "--greedy", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt"] == PROMPTS[0]
    assert 1 <= len(row["token_ids"]) <= 8
    assert row["text"].startswith("The capital of France")
