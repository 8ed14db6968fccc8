"""The whole MeteoRA training path on one GPU: a LoRA per BIG-bench task, stacking, gate training.

Runs the project's own command lines in order and collects what they report:
  1. python -m train.lora --each        one adapter per task (PEFT format)
  2. convert/hf_lora_to_orbax.py         the adapters stacked into one MeteoRA checkpoint
  3. python -m train.gates               the gates trained on all tasks
Then writes JSON (time per step, tokens/s, peak device memory, held-out gate accuracy, also with the gates held
in bfloat16) and prints a markdown table last.

Usage: python bench/train_pipeline.py --base CKPT --bigbench DIR --work DIR [--tasks t1,t2,...]
       [--lora-steps 100] [--gate-steps 200] [--batch-size 16] [--max-length 256] [--dtype bfloat16]
       [--gate-strategy auto] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from result_path import default_result_path

REPO = Path(__file__).resolve().parents[1]
TEN_TASKS = ("object_counting", "cs_algorithms", "epistemic_reasoning", "winowhy", "strategyqa", "logical_deduction",
             "reasoning_about_colored_objects", "linguistics_puzzles", "question_selection", "goal_step_wikihow")


def run(command: list[str]) -> float:
    """Runs one stage, streaming its output; returns its wall seconds."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--bigbench", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--tasks", default=",".join(TEN_TASKS))
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--gate-steps", type=int, default=300)
    p.add_argument("--gate-lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gate-strategy", default="auto", help="MeteoRA forward strategy while the gates train")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    work = Path(args.work)
    common = ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--dtype", args.dtype]

    lora = [sys.executable, "-m", "train.lora", "--base", args.base, "--out", str(work / "adapters"), "--each",
            "--steps", str(args.lora_steps), "--lr", "1e-3", "--overwrite", *common]
    for task in tasks:
        lora += ["--task", f"bigbench:{args.bigbench}/{task}"]
    stages = {"lora": run(lora)}
    stack = [sys.executable, "convert/hf_lora_to_orbax.py", "--base", args.base, "--out", str(work / "meteora"),
             "--overwrite"]
    for task in tasks:
        stack += ["--adapter", f"{task}={work / 'adapters' / task}"]
    stages["stack"] = run(stack)
    stages["gates"] = run([sys.executable, "-m", "train.gates", "--base", args.base, "--meteora", str(work / "meteora"),
                           "--data", f"bigbench:{args.bigbench}", "--out", str(work / "gates"),
                           "--steps", str(args.gate_steps), "--lr", str(args.gate_lr),
                           "--eval-every", str(args.gate_steps), "--eval-rows", "256",
                           "--save-every", str(args.gate_steps), "--task-balanced",
                           "--strategy", args.gate_strategy, *common])

    import jax  # after the stages, so this process holds no GPU memory while they run

    adapters = {t: json.loads((work / "adapters" / t / "training_summary.json").read_text()) for t in tasks}
    gates = json.loads((work / "gates" / "summary.json").read_text())
    validation = json.loads((work / "gates" / "validation.json").read_text())
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
        "settings": vars(args) | {"out": str(args.out)}, "stage_wall_s": stages, "adapters": adapters,
        "gates": gates, "gate_validation_mean": validation["mean_gate_accuracy"],
        "gate_validation_bfloat16": validation["bfloat16_gates"],
        "gate_validation_fused_strategy": validation["fused_strategy"],
    }
    out = args.out or default_result_path("train_pipeline.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\n| stage | what | median step ms | tokens/s | peak memory GiB | result |")
    print("|---|---|---:|---:|---:|---|")
    for task, s in adapters.items():
        memory = (s["peak_memory_bytes"] or 0) / 2**30
        print(f"| lora | {task} ({s['examples']} examples) | {s['median_step_s'] * 1e3:.1f} | "
              f"{s['tokens_per_s']:.0f} | {memory:.2f} | final LM loss {s['final_loss']:.3f} |")
    print(f"| gates | {len(tasks)} tasks, {gates['train_rows']} rows | {gates['median_step_s'] * 1e3:.1f} | "
          f"{gates['tokens_per_s']:.0f} | {(gates['peak_memory_bytes'] or 0) / 2**30:.2f} | held-out gate accuracy "
          f"{validation['mean_gate_accuracy']:.3f} |")
    bf16 = validation["bfloat16_gates"]
    print(f"| gates in bfloat16 | the same, cast | - | - | - | held-out gate accuracy "
          f"{bf16['mean_gate_accuracy']:.3f}, same adapters for {bf16['mean_routing_agreement']:.1%} of tokens |")
    print(f"stage wall seconds: {', '.join(f'{k} {v:.0f}' for k, v in stages.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
