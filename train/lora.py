"""Trains one LoRA adapter in JAX and writes it in Hugging Face PEFT format (peft loads it).

python -m train.lora --base BASE_CKPT --task bigbench:DIR/TASK [--task ...] --out DIR [--rank 8] [--alpha 16]
    [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj] [--steps 200] [--batch-size 8]
    [--max-length 512] [--lr 2e-4] [--warmup 20] [--dtype bfloat16] [--chat-template] [--each] [--overwrite]
    [--seed 0]

Several --task flags train one adapter on their union: the paper's "LoRA-B" baseline; with --each,
one adapter per --task (OUT/<task name>/), sharing one compiled training step. The adapter is a
one-adapter MeteoRA bank with every token forced to it, so training reuses the MeteoRA layer; the
LM loss alone drives it. --task also takes jsonl:NAME=FILE.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from meteora_jax.checkpoint import LoadedModel, atomic_directory, load_model
from meteora_jax.data import batch_stream, load_task_records, read_jsonl_records, split_records, tokenize_records
from meteora_jax.hf_weights import projection_shapes
from meteora_jax.layers import PROJECTIONS
from meteora_jax.meteora import MeteoraConfig, MeteoraLinear
from meteora_jax.meteora_checkpoint import split_banks
from meteora_jax.model import LlamaForCausalLM
from meteora_jax.peft_io import export_peft_adapter, put_bank
from meteora_jax.routing import Routing
from meteora_jax.trainable import merge_params, split_trainable
from meteora_jax.training import TrainConfig, committed, lm_loss, make_optimizer, peak_memory_bytes, step_summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.lora", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--task", action="append", required=True, help="bigbench:TASK_DIR or jsonl:NAME=FILE")
    p.add_argument("--out", required=True, help="PEFT adapter directory to write")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=",".join(PROJECTIONS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--each", action="store_true", help="one adapter per --task, written to OUT/<task name>")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_task(spec: str):
    kind, _, value = spec.partition(":")
    if kind == "bigbench":
        return split_records(load_task_records(Path(value)))[0]
    if kind == "jsonl":
        name, _, path = value.partition("=")
        if not name or not path:
            raise ValueError(f"--task {spec}: expected jsonl:NAME=FILE")
        return split_records(read_jsonl_records(path, name))[0]
    raise ValueError(f"--task {spec}: unknown kind {kind!r}; use bigbench:TASK_DIR or jsonl:NAME=FILE")


def init_adapter(base: LoadedModel, targets, rank: int, alpha: float, seed: int):
    """Base parameters plus a one-adapter bank per target: A normal, B zero (the base function
    unchanged at step 0), scaling alpha / r; the gate is unused (every token is forced to it)."""
    rng = np.random.default_rng(seed)
    banks: dict = {}
    for layer in range(base.config.num_hidden_layers):
        for proj in targets:
            in_dim, out_dim = projection_shapes(base.config)[proj]
            put_bank(banks, layer, proj, {
                "lora_a": (rng.standard_normal((1, in_dim, rank)) * in_dim**-0.5).astype(np.float32),
                "lora_b": np.zeros((1, rank, out_dim), np.float32),
                "scaling": np.full((1,), alpha / rank, np.float32),
                "gate": np.zeros((in_dim, 1), np.float32),
            })
    return merge_params(banks, base.params)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


@functools.partial(jax.jit, static_argnames=("module", "optimizer"), donate_argnums=(0, 1))
def train_step(trainable, opt_state, frozen, batch, *, module, optimizer):
    def loss_fn(t):
        logits, _ = module.apply({"params": merge_params(t, frozen)}, batch["tokens"],
                                 segment_ids=batch["segment_ids"], routing=Routing(force_adapter=0))
        return lm_loss(logits, batch)[0]

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def fit(base: LoadedModel, module, optimizer, arrays, targets, args) -> tuple[dict, dict]:
    """Trains one adapter on `arrays`; returns (its banks as numpy, a timing summary)."""
    params = init_adapter(base, targets, args.rank, args.alpha, args.seed)
    trainable, frozen = split_trainable(params, ("lora_a", "lora_b"))
    trainable, opt_state = committed((trainable, optimizer.init(trainable)))
    step_seconds, step_tokens = [], []
    stream = batch_stream(arrays, args.batch_size, args.seed)
    bar = tqdm(range(args.steps), desc="lora", unit="step")
    for i in bar:
        batch = next(stream)
        started = time.perf_counter()
        trainable, opt_state, loss = train_step(trainable, opt_state, frozen,
                                                {k: jnp.asarray(v) for k, v in batch.items()},
                                                module=module, optimizer=optimizer)
        loss = float(loss)
        if not np.isfinite(loss):
            raise ValueError(f"loss became {loss} at step {i + 1}; stopped, nothing written")
        step_seconds.append(time.perf_counter() - started)
        step_tokens.append(int(np.sum(batch["segment_ids"] > 0)))
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{step_tokens[-1] / step_seconds[-1]:.0f}")
    summary = {"steps": args.steps, "final_loss": loss, **step_summary(step_seconds, step_tokens)}
    return jax.tree.map(np.asarray, split_banks(merge_params(trainable, frozen))), summary


def train(args) -> int:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    base = load_model(args.base, dtype=args.dtype)
    if base.tokenizer is None:
        raise ValueError(f"base checkpoint {args.base} has no tokenizer")
    config = MeteoraConfig(num_adapters=1, rank=args.rank, targets=targets, top_k=1)
    module = LlamaForCausalLM(base.config, linear=MeteoraLinear(config))
    optimizer = make_optimizer(TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.steps))
    groups = [[spec] for spec in args.task] if args.each else [args.task]
    data = [[r for spec in specs for r in read_task(spec)] for specs in groups]
    if args.each:
        names = [sorted({r["task"] for r in records})[0] for records in data]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"--each: tasks {duplicates} come from more than one --task; each needs its own name")
    for records in data:
        names = sorted({r["task"] for r in records})
        out = Path(args.out) / names[0] if args.each else Path(args.out)
        arrays = tokenize_records(records, tokenizer=base.tokenizer, task_names=names, max_length=args.max_length,
                                  chat_template=args.chat_template, pack=False)
        banks, summary = fit(base, module, optimizer, arrays, targets, args)
        summary.update(peak_memory_bytes=peak_memory_bytes(), tasks=names, examples=len(records))
        modules = [[layer, proj] for layer in range(base.config.num_hidden_layers) for proj in targets]
        peft_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.rank, "lora_alpha": args.alpha,
            "target_modules": list(targets), "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
            "lora_dropout": 0.0, "base_model_name_or_path": str(Path(args.base).absolute()), "inference_mode": True,
        }
        with atomic_directory(out, args.overwrite) as staging:
            export_peft_adapter(banks, 0, {"peft_config": peft_config, "modules": modules}, staging)
            (staging / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}: LoRA r={args.rank} on {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
