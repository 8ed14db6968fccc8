"""Which GPU kernels one MeteoRA layer call launches, and how long each runs: the profiler's view of
`meteora_layer.py`'s variants, to see whether a few-token layer pays for bytes, for one slow kernel or
for the number of kernels.

Each variant runs its program of LAYERS_PER_PROGRAM layer calls (as meteora_layer.py times few-token
cases) under jax.profiler; kernel events of the GPU's streams are summed by name and divided by the
calls. "busy" is the summed kernel time per call, "span" the first kernel's start to the last kernel's
end per call: span - busy is the idle time between kernels (launch latency and dependencies).

Cases of more than MAX_REPEATED_TOKENS tokens run one layer call instead, on inputs routed in runs with
--segment-tokens (as meteora_layer.py feeds them).

Usage (GPU): python bench/kernel_trace.py [--cases 4096x4096x28x16,...] [--variants lora,pallas]
             [--segment-tokens L] [--gate-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from meteora_layer import (  # noqa: E402
    LAYERS,
    LAYERS_PER_PROGRAM,
    MAX_REPEATED_TOKENS,
    Case,
    environment,
    make_params,
    normal,
    repeated,
    segment_inputs,
)
from profile_events import traced_kernel_events  # noqa: E402
from result_path import default_result_path  # noqa: E402

DEFAULT_CASES = "4096x4096x28x1,4096x4096x28x16,4096x4096x1024x16"


def parse_case(text: str) -> Case:
    i, o, n, t = (int(v) for v in text.split("x"))
    return Case(i, o, n, t)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated IN x OUT x N x T")
    parser.add_argument("--variants", default=",".join(LAYERS), help="comma-separated variant names")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--segment-tokens", type=int, help="route cases of > 256 tokens in runs of this many tokens")
    parser.add_argument("--gate-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--hlo-dir", type=Path, help="also write each program's optimized HLO here, to map "
                        "kernel names (XLA's fusion names) to the operations they hold")
    return parser.parse_args(argv)


def trace_variant(variant: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    key = jax.random.key(0)
    calls = LAYERS_PER_PROGRAM if case.tokens <= MAX_REPEATED_TOKENS else 1
    params = tuple(make_params(case, k, args.gate_dtype) for k in jax.random.split(key, calls))
    x = normal(jax.random.fold_in(key, 1), (case.tokens, case.in_features), 1.0)
    if calls == 1 and args.segment_tokens:
        x = segment_inputs(jax.random.fold_in(key, 1), case.tokens, params[0]["gate"], args.segment_tokens)
    compiled = jax.jit(repeated(LAYERS[variant])).lower(x, params).compile()
    hlo_dir = args.hlo_dir
    if hlo_dir:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        name = f"{case.in_features}x{case.out_features}x{case.adapters}x{case.tokens}_{variant}.hlo.txt"
        (hlo_dir / name).write_text(compiled.as_text())
    jax.block_until_ready(compiled(x, params))
    events = traced_kernel_events(lambda: jax.block_until_ready(compiled(x, params)))
    if not events:
        return {"variant": variant, "status": "no GPU kernel events in the trace"}
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, _, duration in events:
        by_name[name].append(duration)
    start = min(s for _, s, _ in events)
    end = max(s + d for _, s, d in events)
    kernels = sorted(
        ({"name": n, "per_call": len(d) / calls, "us_per_call": sum(d) / calls / 1e3} for n, d in by_name.items()),
        key=lambda k: -k["us_per_call"],
    )
    return {
        "variant": variant, "status": "ok",
        "kernels_per_call": len(events) / calls,
        "busy_us": sum(d for _, _, d in events) / calls / 1e3,
        "span_us": (end - start) / calls / 1e3,
        "kernels": kernels,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [parse_case(c) for c in args.cases.split(",")]
    variants = args.variants.split(",")
    out = args.out or default_result_path("kernel_trace.json")
    report: dict[str, Any] = {**environment(), "layers_per_program": LAYERS_PER_PROGRAM, "results": []}
    for case in cases:
        for variant in variants:
            try:
                row = trace_variant(variant, case, args)
            except Exception as error:  # noqa: BLE001 -- one failing variant must not cost the rest of a GPU run
                row = {"variant": variant, "status": f"error: {str(error).splitlines()[0]}"}
            report["results"].append({"case": f"{case.in_features}x{case.out_features}x{case.adapters}x{case.tokens}",
                                      **row})
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    print("| case | variant | kernels/call | busy us | span us | top kernels (us/call) |")
    print("|---|---|---:|---:|---:|---|")
    for r in report["results"]:
        if r["status"] != "ok":
            print(f"| {r['case']} | {r['variant']} | {r['status']} | | | |")
            continue
        top = "; ".join(f"{k['name'][:40]} x{k['per_call']:g} {k['us_per_call']:.1f}" for k in r["kernels"][:8])
        print(f"| {r['case']} | {r['variant']} | {r['kernels_per_call']:.1f} | {r['busy_us']:.1f} | "
              f"{r['span_us']:.1f} | {top} |")
    return 0


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before the profiler
    sys.exit(main())
