"""Trains the MeteoRA gates (base model and adapters frozen) on task-labelled data.

python -m train.gates --base BASE_CKPT --meteora METEORA_CKPT --data bigbench:DIR [--data jsonl:TASK=FILE ...]
    --out DIR [--steps 200] [--batch-size 8] [--grad-accum 1] [--max-length 512] [--lr 1e-3] [--warmup 20]
    [--gate-loss-weight 50] [--train-adapters] [--dtype bfloat16] [--remat] [--strategy S] [--task-balanced]
    [--chat-template] [--pack] [--save-every 50] [--keep 3] [--eval-every 50] [--resume] [--seed 0]

Each adapter of the MeteoRA checkpoint is a task: its gate index is the target for every token of
that task's examples. `--data bigbench:DIR` reads DIR/<adapter name>/task.json for every adapter;
`--data jsonl:NAME=FILE` gives one task's {prompt, response} lines. Writes to DIR: checkpoints/
(orbax, every --save-every steps, last --keep kept; --resume continues exactly), metrics.jsonl,
validation.json (per-layer gate top-1 accuracy on held-out examples; the same with the gates held in bfloat16,
and how often those choose the same adapters), summary.json (step time,
tokens/s, peak memory), run_settings.json and meteora/, a MeteoRA checkpoint with the trained gates
that load_meteora and generate read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from meteora_jax.data import batch_stream, load_task_records, read_jsonl_records, split_records, tokenize_records
from meteora_jax.lora_mixture import FUSED_TILE_TOKENS, STRATEGIES
from meteora_jax.meteora_checkpoint import cast_gates, load_meteora, read_meteora, save_meteora, split_banks
from meteora_jax.trainable import GATES, GATES_AND_ADAPTERS, merge_params, split_trainable
from meteora_jax.training import (
    TrainConfig,
    committed,
    compare_routing,
    gate_logits_by_layer,
    layer_gate_accuracy,
    make_optimizer,
    peak_memory_bytes,
    step_summary,
    train_step,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.gates", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base checkpoint (convert/hf_llama_to_orbax.py)")
    p.add_argument("--meteora", required=True, help="MeteoRA checkpoint (convert/hf_lora_to_orbax.py)")
    p.add_argument("--data", action="append", required=True, help="bigbench:DIR or jsonl:TASK=FILE")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--gate-loss-weight", type=float, default=50.0, help="lambda: LM loss + lambda x gate CE")
    p.add_argument("--train-adapters", action="store_true", help="fine-tune the adapters' A and B too")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--strategy", choices=STRATEGIES, help="MeteoRA forward strategy (default: auto)")
    p.add_argument("--task-balanced", action="store_true", help="sample every task equally often")
    p.add_argument("--chat-template", action="store_true", help="format examples with the chat template")
    p.add_argument("--pack", action="store_true", help="pack several examples per row")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-rows", type=int, default=64, help="held-out rows for the gate accuracy")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "max_length", "save_every", "eval_every", "eval_rows", "keep"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def task_records(specs: list[str], tasks: list[str]):
    """(train, test) record lists for the adapters' tasks, from the --data specs."""
    found: dict[str, tuple] = {}
    for spec in specs:
        kind, _, value = spec.partition(":")
        if kind == "bigbench":
            root = Path(value)
            if not root.is_dir():
                raise FileNotFoundError(f"--data {spec}: directory not found")
            for task in tasks:
                if (root / task).is_dir():
                    _claim(found, task, spec)
                    found[task] = split_records(load_task_records(root / task))
        elif kind == "jsonl":
            task, _, path = value.partition("=")
            if not task or not path:
                raise ValueError(f"--data {spec}: expected jsonl:TASK=FILE")
            _claim(found, task, spec)
            found[task] = split_records(read_jsonl_records(path, task))
        else:
            raise ValueError(f"--data {spec}: unknown kind {kind!r}; use bigbench:DIR or jsonl:TASK=FILE")
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ValueError(f"no data for adapters {missing}; every adapter of the MeteoRA checkpoint needs its task")
    train = [r for t in tasks for r in found[t][0]]
    # Held-out records interleaved task by task, so the first --eval-rows cover every task evenly.
    test = [r for group in itertools.zip_longest(*(found[t][1] for t in tasks)) for r in group if r is not None]
    return train, test


def _claim(found: dict, task: str, spec: str) -> None:
    if task in found:
        raise ValueError(f"--data {spec}: task {task!r} already has data from an earlier --data")


def checkpoint_manager(out: Path, args) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True)
    return ocp.CheckpointManager(out.absolute() / "checkpoints", options=options)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        return train(args, out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def train(args, out: Path) -> int:
    overrides = {"strategy": args.strategy} if args.strategy else {}
    loaded = load_meteora(args.base, args.meteora, dtype=args.dtype, remat=args.remat, **overrides)
    _, manifest = read_meteora(args.meteora)
    tasks = [a["name"] for a in manifest["adapters"]]
    if loaded.tokenizer is None:
        raise ValueError(f"base checkpoint {args.base} has no tokenizer")
    train_records, test_records = task_records(args.data, tasks)
    encode = dict(tokenizer=loaded.tokenizer, task_names=tasks, max_length=args.max_length,
                  chat_template=args.chat_template, pack=args.pack)
    train_arrays = tokenize_records(train_records, **encode)
    eval_arrays = {k: v[: args.eval_rows] for k, v in tokenize_records(test_records, **encode).items()}
    rows = len(train_arrays["tokens"])

    trainable, frozen = split_trainable(loaded.params, GATES_AND_ADAPTERS if args.train_adapters else GATES)
    config = TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                         weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                         gate_loss_weight=args.gate_loss_weight)
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(trainable)

    checkpoints = out / "checkpoints"
    if checkpoints.exists() and not args.resume:
        raise FileExistsError(f"{checkpoints} exists: pass --resume to continue it, or choose another --out")
    manager = checkpoint_manager(out, args)
    start = 0
    if args.resume and manager.latest_step() is not None:
        start = manager.latest_step()
        state = manager.restore(start, args=ocp.args.StandardRestore({"trainable": trainable, "opt_state": opt_state}))
        trainable, opt_state = state["trainable"], state["opt_state"]
    trainable, opt_state = committed((trainable, opt_state))

    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "out")}
    settings_file = out / "run_settings.json"
    if start and settings_file.is_file():
        before = json.loads(settings_file.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            print(f"warning: resuming with changed settings {changed}: the run no longer matches an uninterrupted "
                  "one", file=sys.stderr)
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    layer_names = _layer_names(loaded, eval_arrays)
    _truncate_metrics(out / "metrics.jsonl", start)
    metrics_file = open(out / "metrics.jsonl", "a")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="gates", unit="step")
    step_seconds, step_tokens = [], []
    stream = batch_stream(train_arrays, args.batch_size, args.seed, task_balanced=args.task_balanced,
                          start=start * args.grad_accum)
    for step in bar:
        started = time.perf_counter()
        micro = [next(stream) for _ in range(args.grad_accum)]
        batch = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        trainable, opt_state, metrics = train_step(
            loaded.module, trainable, opt_state, frozen, {k: jnp.asarray(v) for k, v in batch.items()},
            optimizer=optimizer, gate_loss_weight=config.gate_loss_weight,
        )
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            bar.close()
            last = manager.latest_step()
            raise ValueError(f"loss became {loss} at step {step + 1}; stopped. The last good checkpoint is "
                             f"{'step ' + str(last) if last is not None else 'none'} in {checkpoints}")
        tokens = int(np.sum(batch["segment_ids"] > 0))
        step_seconds.append(time.perf_counter() - started)
        step_tokens.append(tokens)
        row = {"step": step + 1, **{k: float(v) for k, v in metrics.items() if np.ndim(v) == 0},
               "tokens_per_s": tokens / step_seconds[-1]}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            accuracy = layer_gate_accuracy(loaded.module, merge_params(trainable, frozen), eval_arrays)
            row["val_gate_accuracy"] = float(np.mean(accuracy))
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{loss:.3f}", gate_acc=f"{row['gate_accuracy']:.3f}",
                        tok_s=f"{row['tokens_per_s']:.0f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            manager.save(step + 1, args=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}))
    manager.wait_until_finished()
    metrics_file.close()

    params = merge_params(trainable, frozen)
    validation = held_out_validation(loaded.module, params, eval_arrays, layer_names)
    (out / "validation.json").write_text(json.dumps(validation, indent=2) + "\n")
    summary = {**step_summary(step_seconds, step_tokens), "peak_memory_bytes": peak_memory_bytes(),
               "train_rows": rows, "tasks": tasks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    manifest = {**manifest, "trained": {"steps": args.steps, "gate_loss_weight": args.gate_loss_weight,
                                        "train_adapters": args.train_adapters, "data": args.data}}
    save_meteora(out / "meteora", jax.tree.map(np.asarray, split_banks(params)), manifest, overwrite=True)
    bf16 = validation["bfloat16_gates"]
    print(f"wrote {out / 'meteora'}; held-out gate accuracy {validation['mean_gate_accuracy']:.3f} "
          f"({bf16['mean_gate_accuracy']:.3f} with bfloat16 gates, which choose the same adapters for "
          f"{bf16['mean_routing_agreement']:.1%} of the tokens)")
    return 0


def held_out_validation(module, params, arrays, layer_names) -> dict:
    """Held-out gate accuracy per layer, and how the trained gates route when held in bfloat16 for inference
    (meteora_checkpoint.cast_gates): their accuracy, and the share of tokens per layer whose chosen adapters stay
    the same; and the share of choices that would miss the `fused` strategy's tile slots (its slow path). One
    pass of each tree."""
    found = jax.tree.map(np.asarray, compare_routing(module, params, cast_gates(params, "bfloat16"), arrays))
    accuracy, agreement, missed = found["gate_accuracy"], found["routing_agreement"], found["fused_missed_share"]
    return {"mean_gate_accuracy": float(accuracy.mean()), "layers": dict(zip(layer_names, map(float, accuracy))),
            "bfloat16_gates": {"mean_gate_accuracy": float(found["other_gate_accuracy"].mean()),
                               "mean_routing_agreement": float(agreement.mean()),
                               "layers_routing_agreement": dict(zip(layer_names, map(float, agreement)))},
            "fused_strategy": {"tile_tokens": FUSED_TILE_TOKENS, "mean_missed_share": float(missed.mean()),
                               "max_layer_missed_share": float(missed.max()),
                               "layers_missed_share": dict(zip(layer_names, map(float, missed)))}}


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops rows past the checkpoint a run resumes from: a killed run may have logged steps it lost."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in rows))


def _layer_names(loaded, arrays) -> list[str]:
    """Layer names in the order layer_gate_accuracy reports them (sorted)."""
    batch = {k: jnp.asarray(v[:1]) for k, v in arrays.items()}
    shapes = jax.eval_shape(
        lambda p: loaded.module.apply({"params": p}, batch["tokens"], segment_ids=batch["segment_ids"],
                                      mutable=["intermediates"])[1],
        loaded.params,
    )
    return sorted(gate_logits_by_layer(shapes["intermediates"]))


if __name__ == "__main__":
    sys.exit(main())
