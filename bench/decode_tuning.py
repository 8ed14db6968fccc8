"""Block-size sweep of the decode-layer Pallas kernels (gate, route_shrink, expand_add) on the GPU.

Each configuration runs as 32 chained calls with their own gates and adapters in one program (as
kernel_trace.py), and the profiler's time of each kernel is reported per call. The gate tile is swept
with the other kernels at their defaults, then the shrink and expand blocks with the gate at its
default; each kernel's best is read off separately, and the gate tiles
by the sum of gate and route_shrink (route_shrink sums one logit share per gate program).

Usage (GPU): python bench/decode_tuning.py [--out FILE] [--gate-dtype bfloat16] [--cases T:N:O,...]
                [--gate-tiles ROWSxADAPTERS,...] [--gate-steps ROWS,...] [--gate-warps W,...] [--gate-stages S,...]
                [--blocks INxOUT,...] [--warps W,...]
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

from meteora_layer import RANK, TOP_K, environment  # noqa: E402
from profile_events import kernel_us_per_call  # noqa: E402
from result_path import default_result_path  # noqa: E402
from results_tables import decode_tuning_section  # noqa: E402

from meteora_jax.pallas.decode_layer import DecodeBlockSizes, decode_layer  # noqa: E402

CALLS = 32
IN_FEATURES = 4096
KERNELS = ("gate", "route_shrink", "expand_add")
CASES = [(1, 28, 4096), (16, 28, 4096), (1, 1024, 4096), (16, 1024, 4096)]  # (T, N, out)
# (rows, adapters) per gate program; the first run swept (64-512, 32), (128-256, 64), (128, 128) at 2 and 4
# warps without steps (results/decode_tuning.json).
GATE_TILES = [(64, 32), (128, 32), (256, 32), (512, 32), (1024, 32), (2048, 32), (512, 64), (1024, 64)]
GATE_STEPS = (32, 64)
GATE_WARPS = (4,)
GATE_STAGES = (2,)
BLOCKS = [(128, 128), (128, 256), (256, 128)]  # (block_in, block_out); the first run swept these wider
WARPS = (1,)

def configs(gate_tiles: Sequence[tuple[int, int]] = GATE_TILES, blocks: Sequence[tuple[int, int]] = BLOCKS,
            warps: Sequence[int] = WARPS, gate_steps: Sequence[int] = GATE_STEPS,
            gate_warps: Sequence[int] = GATE_WARPS, gate_stages: Sequence[int] = GATE_STAGES) -> list[DecodeBlockSizes]:
    default = DecodeBlockSizes()
    gate = [dataclasses.replace(default, gate_block_in=i, gate_block_adapters=n, gate_step_rows=step, gate_num_warps=w,
                                gate_num_stages=stages)
            for (i, n), step, w, stages in itertools.product(gate_tiles, gate_steps, gate_warps, gate_stages)
            if step <= i]
    # Each config sets both kernels' warps; each kernel's best is read off separately.
    rest = [dataclasses.replace(default, block_in=i, block_out=o, shrink_num_warps=w, num_warps=w)
            for (i, o), w in itertools.product(blocks, warps)]
    return list(dict.fromkeys([default, *gate, *rest]))


def weights(tokens: int, adapters: int, out_features: int, gate_dtype: str = "float32"):
    keys = jax.random.split(jax.random.key(tokens + adapters), 3 * CALLS + 1)
    x = jax.random.normal(keys[0], (tokens, IN_FEATURES), jnp.bfloat16)
    sets = []
    for c in range(CALLS):
        ka, kb, kg = keys[1 + 3 * c : 4 + 3 * c]
        sets.append({
            "a": (jax.random.normal(ka, (adapters, IN_FEATURES, RANK)) * IN_FEATURES**-0.5).astype(jnp.bfloat16),
            "b": (jax.random.normal(kb, (adapters, RANK, out_features)) * RANK**-0.5).astype(jnp.bfloat16),
            "gate": (jax.random.normal(kg, (IN_FEATURES, adapters)) * IN_FEATURES**-0.5).astype(gate_dtype),
            "scaling": jnp.full((adapters,), 2.0, jnp.float32),
        })
    return x, tuple(sets)


def kernel_us(blocks: DecodeBlockSizes, x, sets, out_features: int) -> dict[str, float]:
    def program(x, sets):
        for p in sets:
            y = jnp.zeros((x.shape[0], out_features), x.dtype) + x[:, :1]
            y, _, _, _ = decode_layer(x, p["gate"], y, p["a"], p["b"], p["scaling"], top_k=TOP_K, temperature=1.0,
                                      blocks=blocks)
            x = y[:, : x.shape[1]]
        return x

    totals: dict[str, float] = collections.defaultdict(float)
    for name, us in kernel_us_per_call(program, (x, sets), CALLS).items():
        for kernel in KERNELS:
            if name.startswith(f"meteora_decode_{kernel}"):
                totals[kernel] += us
    return dict(totals)


def int_list(separator: str = "", size: int | None = None):
    """An argparse type: comma-separated items of `size` integers joined by `separator` (plain integers if None)."""

    def parse(text: str) -> list:
        items = []
        for item in text.split(","):
            parts = item.split(separator) if size else [item]
            if (size and len(parts) != size) or not all(p.strip().isdigit() for p in parts):
                form = separator.join(["N"] * size) if size else "N"
                raise argparse.ArgumentTypeError(f"{item!r} is not of the form {form}")
            items.append(tuple(map(int, parts)) if size else int(parts[0]))
        return items

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--gate-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the gates as held (meteora_checkpoint.cast_gates)")
    parser.add_argument("--cases", type=int_list(":", 3), default=CASES, help="comma-separated T:N:out cases "
                        "(default: %s)" % ",".join(":".join(map(str, c)) for c in CASES))
    parser.add_argument("--gate-tiles", type=int_list("x", 2), default=GATE_TILES,
                        help="comma-separated ROWSxADAPTERS gate tiles to sweep")
    parser.add_argument("--gate-steps", type=int_list(), default=GATE_STEPS, help="comma-separated gate_step_rows")
    parser.add_argument("--gate-warps", type=int_list(), default=GATE_WARPS, help="comma-separated gate_num_warps")
    parser.add_argument("--gate-stages", type=int_list(), default=GATE_STAGES,
                        help="comma-separated gate_num_stages (steps' loads in flight)")
    parser.add_argument("--blocks", type=int_list("x", 2), default=BLOCKS,
                        help="comma-separated INxOUT route_shrink / expand_add blocks to sweep")
    parser.add_argument("--warps", type=int_list(), default=WARPS,
                        help="comma-separated warps of route_shrink and expand_add to sweep")
    args = parser.parse_args(argv)
    out = args.out or default_result_path("decode_tuning.json")
    rows = []
    for tokens, adapters, out_features in args.cases:
        x, sets = weights(tokens, adapters, out_features, args.gate_dtype)
        for config in configs(args.gate_tiles, args.blocks, args.warps, args.gate_steps, args.gate_warps,
                              args.gate_stages):
            rows.append({"tokens": tokens, "adapters": adapters, "out_features": out_features,
                         **dataclasses.asdict(config), **kernel_us(config, x, sets, out_features)})
        del sets
        out.parent.mkdir(parents=True, exist_ok=True)  # after each case, so that a run cut short keeps it
        report = {**environment(), "calls_per_program": CALLS, "gate_dtype": args.gate_dtype,
                  "defaults": dataclasses.asdict(DecodeBlockSizes()), "results": rows}
        out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(decode_tuning_section(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
