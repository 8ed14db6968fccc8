"""Block-size sweep of the Pallas gather kernel (few tokens) on the GPU, beside XLA's `dense` and `bmm` mixtures.

Times the mixture alone (no base matmul, no routing): delta = sum_j coef * (x A_j) B_j, bf16, r = 8,
k = 2, 4096 -> 4096. Each timing is the median of several samples of back-to-back calls inside one
program. The prefill kernels have their own sweep, segment_tuning.py.

Usage: python bench/pallas_tuning.py [--out FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from result_path import default_result_path  # noqa: E402

from meteora_jax.lora_mixture import lora_mixture, route  # noqa: E402
from meteora_jax.pallas import GatherBlockSizes, lora_gather  # noqa: E402

RANK, TOP_K = 8, 2


def problem(tokens, adapters, features, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (tokens, features), jnp.bfloat16)
    a = (jax.random.normal(k[1], (adapters, features, RANK)) * features**-0.5).astype(jnp.bfloat16)
    b = (jax.random.normal(k[2], (adapters, RANK, features)) * RANK**-0.5).astype(jnp.bfloat16)
    indices, weights = route(jax.random.normal(k[3], (tokens, adapters)), TOP_K, 1.0)
    return x, a, b, indices, weights


def median_ms(fn, args, repeats_in_program):
    if repeats_in_program > 1:
        inner = fn

        def fn(x, *rest):  # noqa: F811 -- the repeated form of the same call
            def body(_, x):
                return x + (inner(x, *rest)[:, :1] * 0).astype(x.dtype)

            return jax.lax.fori_loop(0, repeats_in_program, body, x)

    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(5):
            out = compiled(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / 5 / repeats_in_program * 1e3)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    features = 64 if args.smoke else 4096
    cases = [(1, 28), (16, 28), (16, 1024)] if not args.smoke else [(1, 4)]
    rows = []

    def record(kind, tokens, adapters, config, ms):
        rows.append({"kind": kind, "tokens": tokens, "adapters": adapters, "config": config, "ms": ms})
        print(f"{kind:8s} T={tokens:5d} N={adapters:4d} {config:40s} {ms:.4f} ms", flush=True)

    for tokens, adapters in cases:
        x, a, b, indices, weights = problem(tokens, adapters, features)
        coef = weights * 2.0
        repeats = 50
        scaling = jnp.full((adapters,), 2.0, jnp.float32)
        for strategy in ("dense", "bmm"):
            fn = lambda x, a, b, i, w, s=strategy: lora_mixture(x, a, b, scaling, i, w, s)  # noqa: E731
            record(strategy, tokens, adapters, "-", median_ms(fn, (x, a, b, indices, weights), repeats))
        for bi, bo, warps in itertools.product((128, 256, 512, 1024), (64, 128, 256), (4, 8)):
            blocks = GatherBlockSizes(block_in=bi, block_out=bo, num_warps=warps)
            fn = lambda x, a, b, i, c, bl=blocks: lora_gather(x, a, b, i, c, blocks=bl, interpret=interpret)  # noqa: E731
            record("gather", tokens, adapters, str(blocks), median_ms(fn, (x, a, b, indices, coef), repeats))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}
    out = args.out or default_result_path("pallas_tuning.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("\n| kind | T | N | best config | ms | dense ms | bmm ms |\n|---|---|---|---|---|---|---|")
    for (tokens, adapters) in cases:
        mine = [r for r in rows if r["tokens"] == tokens and r["adapters"] == adapters]
        best = min((r for r in mine if r["kind"] == "gather"), key=lambda r: r["ms"])
        xla = {r["kind"]: r["ms"] for r in mine if r["kind"] in ("dense", "bmm")}
        print(f"| {best['kind']} | {tokens} | {adapters} | {best['config']} | {best['ms']:.4f} | "
              f"{xla['dense']:.4f} | {xla['bmm']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
