"""End-to-end demo on the embedded default model: convert SmolLM2-135M-Instruct, then answer chat prompts.

python -m meteora_jax.demo [--prompt TEXT ...] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import sys
import time

from meteora_jax.checkpoint import load_model
from meteora_jax.embedded import smollm2_checkpoint
from meteora_jax.generate import encode_prompts, generate, stop_ids

DEFAULT_PROMPTS = ("What is the capital of France?", "Name three primary colors.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meteora_jax.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", help="chat prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    prompts = args.prompt or list(DEFAULT_PROMPTS)

    checkpoint = smollm2_checkpoint()
    loaded = load_model(checkpoint)
    print(f"model: {checkpoint} ({loaded.config.num_hidden_layers} layers, hidden {loaded.config.hidden_size})")
    start = time.perf_counter()
    result = generate(
        loaded.module, loaded.params, encode_prompts(loaded.tokenizer, prompts, chat=True),
        max_new_tokens=args.max_new_tokens, eos_ids=stop_ids(loaded.config, loaded.tokenizer),
        pad_id=loaded.config.pad_token_id or 0,
    )
    elapsed = time.perf_counter() - start
    for prompt, tokens in zip(prompts, result.tokens):
        print(f"\nQ: {prompt}\nA: {loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()}")
    print(f"\n{sum(map(len, result.tokens))} tokens in {elapsed:.1f} s (including compilation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
