"""Block-size sweep of the Pallas prefill kernels (shrink + expand) on the GPU, with each kernel's time.

Times the mixture alone (no base matmul, no routing) as `lora_segment_add` runs it inside the layer:
y += sum_j coef * (x A_j) B_j in place, bf16, r = 8, k = 2, 4096 -> 4096, random routing. For every
configuration: the profiler's kernel time per call, split into the shrink kernels, the expand kernels
and the rest (the grouping's sort and scatters in XLA), beside XLA's dense and bmm forms of the same
mixture.

Usage (GPU, about 3 minutes): python bench/segment_tuning.py [--out FILE]
       (GPU, block_tokens alone): python bench/segment_tuning.py --cases 16384x256 --block-tokens 16,32,64
Usage (CPU test with tiny shapes): python bench/segment_tuning.py --smoke --out /tmp/st.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meteora_layer import environment  # noqa: E402
from pallas_tuning import problem as mixture_problem  # noqa: E402
from profile_events import traced_kernel_events  # noqa: E402
from result_path import default_result_path  # noqa: E402

from meteora_jax.lora_mixture import lora_mixture  # noqa: E402
from meteora_jax.pallas import SegmentBlockSizes, lora_segment_add  # noqa: E402

SCALING = 2.0
CALLS = 5


def problem(tokens, adapters, features):
    """pallas_tuning's mixture problem, the coefficients scaled, and a base output y to add into."""
    x, a, b, indices, weights = mixture_problem(tokens, adapters, features)
    y = jax.random.normal(jax.random.key(1), (tokens, features), jnp.bfloat16)
    return x, a, b, indices, weights * SCALING, y


def kernel_us(fn, args) -> dict[str, float | dict[str, float]]:
    """Profiler kernel time per call (us), by kernel family, and by kernel name under "by_name"."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))

    def run():
        for _ in range(CALLS):
            out = compiled(*args)
        jax.block_until_ready(out)

    split = {"shrink": 0.0, "expand": 0.0, "other": 0.0}
    by_name: dict[str, float] = {}
    for name, _, duration in traced_kernel_events(run):
        family = "shrink" if "shrink" in name else "expand" if "expand" in name else "other"
        split[family] += duration / CALLS / 1e3
        by_name[name] = by_name.get(name, 0.0) + duration / CALLS / 1e3
    return {**split, "total": sum(split.values()), "by_name": by_name}


def configs(smoke: bool, block_tokens: list[int] | None = None) -> list[SegmentBlockSizes]:
    if block_tokens:
        # Each block_tokens with the rules' other sizes, at 2 and 4 warps.
        return [SegmentBlockSizes(block_tokens=bt, num_warps=w) for bt in block_tokens for w in (2, 4)]
    if smoke:
        return [SegmentBlockSizes(block_tokens=bt, block_in=16, span_in=32, block_out=16) for bt in (16, None)]
    sweep = [SegmentBlockSizes(block_tokens=bt, block_in=bi, block_out=bo)
             for bt, bi, bo in itertools.product((None, 16, 32, 64), (64, 128), (64, 128))]
    extra = (SegmentBlockSizes(num_stages=3), SegmentBlockSizes(num_warps=8), SegmentBlockSizes(span_in=512),
             SegmentBlockSizes(num_warps=2))
    return sweep + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cases", help="comma-separated TOKENS x ADAPTERS (default: the full sweep's three)")
    parser.add_argument("--block-tokens", help="comma-separated block_tokens to sweep alone")
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    features = 64 if args.smoke else 4096
    cases = [(64, 4)] if args.smoke else [(16384, 28), (4096, 256), (16384, 1024)]
    if args.cases:
        cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    block_tokens = [int(v) for v in args.block_tokens.split(",")] if args.block_tokens else None
    rows = []
    out = args.out or default_result_path("segment_tuning.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for tokens, adapters in cases:
        x, a, b, indices, coef, y = problem(tokens, adapters, features)
        scaling = jnp.ones((adapters,), jnp.float32)
        for strategy in ("dense", "bmm"):
            def xla(x, a, b, i, c, y, s=strategy):
                return y + lora_mixture(x, a, b, scaling, i, c, s).astype(y.dtype)

            rows.append({"kind": strategy, "tokens": tokens, "adapters": adapters, "config": None,
                         "us": kernel_us(xla, (x, a, b, indices, coef, y))})
        for blocks in configs(args.smoke, block_tokens):
            def kernel(x, a, b, i, c, y, bl=blocks):
                return lora_segment_add(x, a, b, i, c, y, blocks=bl, interpret=interpret)

            try:
                us = kernel_us(kernel, (x, a, b, indices, coef, y))
            except Exception as error:  # noqa: BLE001 -- a configuration that fails to compile is skipped
                print(f"{blocks}: {str(error).splitlines()[0][:160]}", flush=True)
                continue
            resolved = blocks.resolve(tokens, adapters)
            config = {f: getattr(resolved, f) if getattr(blocks, f) is not None else f"rule: {getattr(resolved, f)}"
                      for f in blocks.__dataclass_fields__}
            rows.append({"kind": "segment", "tokens": tokens, "adapters": adapters, "config": config, "us": us})
            print(f"T={tokens} N={adapters} {blocks}: {us['total']:.1f} us "
                  f"(shrink {us['shrink']:.1f}, expand {us['expand']:.1f}, other {us['other']:.1f})", flush=True)
        out.write_text(json.dumps({**environment(), "calls": CALLS, "rows": rows}, indent=1) + "\n")
    print("\n| T | N | best configuration | total us | shrink | expand | other | dense us | bmm us |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for tokens, adapters in cases:
        mine = [r for r in rows if (r["tokens"], r["adapters"]) == (tokens, adapters)]
        xla = {r["kind"]: r["us"]["total"] for r in mine if r["kind"] != "segment"}
        best = min((r for r in mine if r["kind"] == "segment"), key=lambda r: r["us"]["total"])
        us = best["us"]
        print(f"| {tokens} | {adapters} | {best['config']} | {us['total']:.1f} | {us['shrink']:.1f} | "
              f"{us['expand']:.1f} | {us['other']:.1f} | {xla['dense']:.1f} | {xla['bmm']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
