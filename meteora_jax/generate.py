"""Jitted batched generation with a KV cache: one prefill, then a decode loop inside `lax.while_loop`.

CLI: python -m meteora_jax.generate --checkpoint DIR --prompt TEXT [--chat] [--max-new-tokens N]
     [--greedy | --temperature T --top-p P --seed S] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from meteora_jax.model import KVCache
from meteora_jax.routing import Routing
from meteora_jax.sampling import Sampling, next_token

# Prompt lengths are rounded up to a multiple of this, so nearby lengths share one compiled program.
PROMPT_BUCKET = 32


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # per prompt, new tokens up to and including the first EOS
    finished: list[bool]  # per prompt, whether it stopped on EOS


@struct.dataclass
class _DecodeState:
    cache: KVCache
    out: jax.Array  # [B, max_new_tokens] generated ids, pad after EOS
    last: jax.Array  # [B] latest token
    done: jax.Array  # [B] reached EOS
    step: jax.Array  # int32 scalar: tokens generated so far
    key: jax.Array


def generate(
    module: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    seed: int = 0,
    pad_id: int = 0,
    routing: Routing | None = None,
) -> Generation:
    """Generates up to `max_new_tokens` for each token-id prompt; prompts may differ in length.

    routing: MeteoRA call-time settings (top-k, temperature, forced adapter); per-token
    `assignment` is not available here since generated tokens have no assignment yet. Generation is never
    differentiated, so its calls run with `inference` set (see Routing).
    """
    if routing is not None and routing.assignment is not None:
        raise ValueError("generate() takes no per-token routing assignment; use force_adapter")
    routing = dataclasses.replace(routing or Routing(), inference=True)
    config = module.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True
    out, steps, done = _generate_jit(
        module, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
        max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), sampling=sampling, pad_id=pad_id, routing=routing,
    )
    out, done = np.asarray(out), np.asarray(done)
    eos = np.isin(out, list(eos_ids))
    lengths = [int(np.argmax(eos[r])) + 1 if done[r] else int(steps) for r in range(len(prompts))]
    return Generation([out[r, :n].tolist() for r, n in enumerate(lengths)], done.tolist())


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "eos_ids", "sampling", "pad_id", "routing"))
def _generate_jit(module, params, tokens, mask, key, *, max_new_tokens, eos_ids, sampling, pad_id, routing):
    batch, width = tokens.shape
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    cache = KVCache.empty(module.config, batch, width + max_new_tokens)
    logits, cache = module.apply({"params": params}, tokens, mask, cache, routing=routing, last_logits_only=True)
    key, sub = jax.random.split(key)
    first = next_token(logits[:, -1], sub, sampling)
    state = _DecodeState(
        cache=cache,
        out=jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
        last=first,
        done=jnp.isin(first, eos),
        step=jnp.ones((), jnp.int32),
        key=key,
    )

    def running(s: _DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def decode_one(s: _DecodeState) -> _DecodeState:
        logits, cache = module.apply(
            {"params": params}, s.last[:, None], None, s.cache, routing=routing, last_logits_only=True
        )
        key, sub = jax.random.split(s.key)
        token = jnp.where(s.done, pad_id, next_token(logits[:, -1], sub, sampling))
        out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
        return _DecodeState(cache, out, token, s.done | jnp.isin(token, eos), s.step + 1, key)

    state = jax.lax.while_loop(running, decode_one, state)
    return state.out, state.step, state.done


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m meteora_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model directory written by convert/hf_llama_to_orbax.py")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless --temperature)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype")
    parser.add_argument("--json", action="store_true", help="print token ids and text as JSON")
    args = parser.parse_args(argv)
    if args.greedy and args.temperature:
        parser.error("--greedy and --temperature exclude each other")
    return args


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    if chat:
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            for p in prompts
        ]
    return [tokenizer.encode(p) for p in prompts]


def stop_ids(config, tokenizer) -> tuple[int, ...]:
    ids = set(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def main(argv: Sequence[str] | None = None) -> int:
    from meteora_jax.checkpoint import load_model

    args = _parse_args(argv)
    loaded = load_model(args.checkpoint, dtype=args.dtype)
    if loaded.tokenizer is None:
        sys.exit(f"error: checkpoint {args.checkpoint} has no tokenizer files")
    prompt_ids = encode_prompts(loaded.tokenizer, args.prompt, args.chat)
    result = generate(
        loaded.module, loaded.params, prompt_ids,
        max_new_tokens=args.max_new_tokens,
        eos_ids=stop_ids(loaded.config, loaded.tokenizer),
        sampling=Sampling(temperature=args.temperature, top_p=args.top_p),
        seed=args.seed,
        pad_id=loaded.config.pad_token_id or 0,
    )
    texts = [loaded.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    if args.json:
        rows = [{"prompt": p, "token_ids": t, "text": x} for p, t, x in zip(args.prompt, result.tokens, texts)]
        print(json.dumps(rows if len(rows) > 1 else rows[0], ensure_ascii=False))
    else:
        print("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
