"""Gradients through the MeteoRA layer (bench/meteora_layer.py's layer: gate, routing, mixture), `fused` against
`bmm` (what `auto` trains with at N r > 512): wall and device time of one jitted gradient, bf16, r = 8, 4096 ->
4096, inputs routed in runs. Two trainings: "gates" (gradients in x and the gate; adapters frozen) and "adapters"
(in x, A and B). Wall time counts what device time does not, such as an XLA loop's host round trips. It uses only
the layer's public entry point, so the same script times an older tree for an A/B (bench/NOTES.md, session 17).

Usage: python bench/fused_backward.py [--out FILE] [--smoke]   (GPU; --smoke: tiny shapes, interpreted on a CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meteora_layer import (  # noqa: E402
    LAYERS,
    Case,
    environment,
    full_plan,
    make_params,
    routing_spread,
    segment_inputs,
    time_compiled,
    traced_kernel_ms,
)
from result_path import default_result_path  # noqa: E402

CASES = (Case(4096, 4096, 256, 4096), Case(4096, 4096, 256, 16384))
SMOKE_CASES = (Case(128, 256, 32, 256),)
# Runs of 96 tokens: no choice misses its tile's slots (N = 256, 4096 tokens), as under trained gates; of 24: 24%.
RUNS = (96, 24)
VARIANTS = ("fused", "bmm")
TRAINED = {"gates": ("gate",), "adapters": ("lora_a", "lora_b")}


def gradient(variant: str, trained: tuple[str, ...]):
    """d/d(x, trained params) of sum(layer * cotangent), the other params held fixed."""

    def loss(x, chosen, fixed, cotangent):
        y = LAYERS[variant](x, {**fixed, **chosen})
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    def run(x, params, cotangent):
        chosen = {k: params[k] for k in trained}
        fixed = {k: v for k, v in params.items() if k not in trained}
        return jax.grad(loss, argnums=(0, 1))(x, chosen, fixed, cotangent)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and short timing, for a CPU test")
    args = parser.parse_args(argv)
    plan = dataclasses.replace(full_plan(), sample_seconds=1e-3 if args.smoke else 0.02,
                               seconds_per_variant=0.01 if args.smoke else 1.0)
    rows = []
    for case, run in itertools.product(SMOKE_CASES if args.smoke else CASES, RUNS):
        params = make_params(case, jax.random.key(case.adapters), "bfloat16")
        x = segment_inputs(jax.random.key(case.tokens), case.tokens, params["gate"], run)
        cotangent = jax.random.normal(jax.random.key(2), (case.tokens, case.out_features), jnp.float32)
        missed = routing_spread(x, params)["fused_missed_share"]
        operands = (x, params, cotangent)
        for training, variant in itertools.product(TRAINED, VARIANTS):
            compiled = jax.jit(gradient(variant, TRAINED[training])).lower(*operands).compile()
            # One executable: its first output is ready when all are.
            timing = time_compiled(lambda *a, c=compiled: c(*a)[0], [operands], plan)
            rows.append({"tokens": case.tokens, "adapters": case.adapters, "run_tokens": run, "missed_share": missed,
                         "training": training, "variant": variant, "wall_ms": timing["median_ms"],
                         "kernel_ms": traced_kernel_ms(compiled, operands), "samples_ms": timing["samples_ms"]})
            print(rows[-1], flush=True)
    out = args.out or default_result_path("fused_backward.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2))
    print("\n| T | runs of | missed | training | variant | wall ms | kernel ms |")
    print("|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['run_tokens']} | {r['missed_share']:.2%} | {r['training']} | {r['variant']} | "
              f"{r['wall_ms']:.3f} | {r['kernel_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
