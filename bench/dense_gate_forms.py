"""Time and temporary memory of the bf16 `dense` MeteoRA layer written three ways, at prefill sizes.

The `dense` layer folds the float32 gate into x @ A (one matmul emitting [M, N r + 2N] in float32) and its
final matmul adds into the base output (cuBLAS epilogue). At 4096 -> 4096, T = 16384 its temporaries
were 1.25x a LoRA's. Forms:
    dense      today's lora_mixture.gated_output, strategy "dense"
    two_dots   x @ A emitted in bf16 and x @ [gate_hi | gate_lo] in float32: two reads of x, no
               float32 [M, N r] product
    unfolded   gate logits alone, the mixture's delta in float32, then y + delta (no epilogue fold)
Each is measured with meteora_layer.py's method (median wall time of back-to-back calls, compiled
temp_size_in_bytes), beside the base linear and one LoRA.

Usage (GPU, about 1 minute): python bench/dense_gate_forms.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import meteora_layer as bench  # noqa: E402
from result_path import default_result_path  # noqa: E402

from meteora_jax.lora_mixture import (  # noqa: E402
    _mix_all_adapters,
    compute_gate_logits,
    lora_mixture,
    route,
)


def two_dots(x, p):
    gate, lora_a = p["gate"], p["lora_a"]
    n, i, r = lora_a.shape
    hi = gate.astype(x.dtype)
    lo = (gate - hi.astype(jnp.float32)).astype(x.dtype)
    h = jnp.dot(x, jnp.swapaxes(lora_a, 0, 1).reshape(i, n * r))  # bf16 out, float32 accumulation
    parts = jnp.dot(x, jnp.concatenate([hi, lo], axis=1), preferred_element_type=jnp.float32)
    indices, weights = route(parts[:, :n] + parts[:, n:], bench.TOP_K, bench.TEMPERATURE)
    delta = _mix_all_adapters(h.reshape(-1, n, r).astype(jnp.float32), p["lora_b"], p["scaling"], indices,
                              weights, x.dtype, x.dtype)
    return x @ p["w"] + delta


def unfolded(x, p):
    indices, weights = route(compute_gate_logits(x, p["gate"]), bench.TOP_K, bench.TEMPERATURE)
    delta = lora_mixture(x, p["lora_a"], p["lora_b"], p["scaling"], indices, weights, "dense")
    return x @ p["w"] + delta.astype(x.dtype)


FORMS = {"two_dots": two_dots, "unfolded": unfolded}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    bench.LAYERS.update(FORMS)
    variants = ("base", "lora", "dense", *FORMS)
    cases = bench.grid([(4096, 4096), (4096, 14336)], [28], [4096, 16384])
    plan = bench.Plan(tuple(cases), prefill=cases[1], decode_adapters=28, decode_max_tokens=16, many_adapters=256,
                      decode_many_adapters=1024, prefill_min_tokens=4096, seconds_per_variant=0.5,
                      sample_seconds=2e-3, variants=variants)
    rows = []
    for shape in ((4096, 4096), (4096, 14336)):
        group = [c for c in cases if (c.in_features, c.out_features) == shape]
        rows += bench.measure_group(group, plan, jax.random.key(0))
    out = args.out or default_result_path("dense_gate_forms.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**bench.environment(), "results": rows}, indent=1) + "\n")
    print("| in->out | T | form | ms | temp MiB | time / lora | temp / lora |\n|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] == "ok":
            shape = f"{r['in_features']}->{r['out_features']}"
            print(f"| {shape} | {r['tokens']} | {r['variant']} | {r['median_ms']:.4g} | "
                  f"{r['temp_bytes'] / 2**20:.1f} | {r['time_vs_lora']:.3f} | {r['temp_vs_lora']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
