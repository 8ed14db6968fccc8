"""The decode layer's two plans on the GPU: three kernels reading only the chosen adapters, or two kernels
reading every adapter's A (few adapters), with a sweep of the two-kernel plan's gate_shrink tile.

Each configuration runs as 32 chained calls with their own gates and adapters in one program (as
decode_tuning.py); the profiler's time of each kernel is reported per call, with the program's compiled
temporary bytes.

Usage (GPU): python bench/decode_plans.py [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_tuning import CALLS, weights  # noqa: E402
from meteora_layer import TOP_K, environment  # noqa: E402
from profile_events import traced_kernel_events  # noqa: E402
from result_path import default_result_path  # noqa: E402

from meteora_jax.pallas.decode_layer import DecodeBlockSizes, decode_layer  # noqa: E402

CASES = [(1, 28, 4096), (16, 28, 4096), (1, 28, 14336), (16, 28, 14336), (1, 64, 4096)]  # (T, N, out)
TILES = [(64, 16), (128, 16), (256, 16), (128, 32)]  # (all_block_in, all_block_adapters)
WARPS = (2, 4)


def configs() -> dict[str, DecodeBlockSizes]:
    default = DecodeBlockSizes()
    out = {"three kernels": dataclasses.replace(default, all_adapters_max_total_rank=0)}
    for (block_in, adapters), warps in itertools.product(TILES, WARPS):
        out[f"two kernels {block_in}x{adapters} w{warps}"] = dataclasses.replace(
            default, all_block_in=block_in, all_block_adapters=adapters, gate_num_warps=warps)
    return out


def measure(blocks: DecodeBlockSizes, x, sets, out_features: int) -> dict[str, object]:
    def program(x, sets):
        for p in sets:
            y = jnp.zeros((x.shape[0], out_features), x.dtype) + x[:, :1]
            y, _, _, _ = decode_layer(x, p["gate"], y, p["a"], p["b"], p["scaling"], top_k=TOP_K, temperature=1.0,
                                      blocks=blocks)
            x = y[:, : x.shape[1]]
        return x

    compiled = jax.jit(program).lower(x, sets).compile()
    jax.block_until_ready(compiled(x, sets))
    runs = []
    for _ in range(3):
        per_kernel: dict[str, float] = collections.defaultdict(float)
        for name, _, duration in traced_kernel_events(lambda: jax.block_until_ready(compiled(x, sets))):
            if name.startswith("meteora_decode_"):
                per_kernel[name.removeprefix("meteora_decode_").split(".")[0]] += duration / CALLS / 1e3
        runs.append(dict(per_kernel))
    best = min(runs, key=lambda r: sum(r.values()))
    memory = compiled.memory_analysis()
    return {"kernel_us": best, "total_us": sum(best.values()),
            "temp_bytes": memory.temp_size_in_bytes if memory is not None else None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or default_result_path("decode_plans.json")
    rows = []
    for tokens, adapters, out_features in CASES:
        x, sets = weights(tokens, adapters, out_features)
        for name, blocks in configs().items():
            rows.append({"tokens": tokens, "adapters": adapters, "out_features": out_features, "config": name,
                         **dataclasses.asdict(blocks), **measure(blocks, x, sets, out_features)})
        del sets
        out.parent.mkdir(parents=True, exist_ok=True)  # after each case, so that a run cut short keeps it
        out.write_text(json.dumps({**environment(), "calls_per_program": CALLS, "results": rows}, indent=1) + "\n")
    print("| T | N | out | config | kernels us | total us | program temp B |")
    print("|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        kernels = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["kernel_us"].items()))
        print(f"| {r['tokens']} | {r['adapters']} | {r['out_features']} | {r['config']} | {kernels} | "
              f"{r['total_us']:.2f} | {r['temp_bytes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
