"""Block sizes of the `fused` strategy's routed shrink (meteora_jax/pallas/tile_shrink.py): device (kernel) time
on inputs routed in runs of 256 tokens (meteora_layer.py --segment-tokens), bf16, r = 8, with each run's error
against the plain reference; XLA's form (gather A per tile, batched matmul) for comparison. kernel_ms counts the
whole call (with the XLA sum of the splits where there are several); shrink_kernel_ms the shrink kernel alone.

Usage: python bench/tile_shrink_tuning.py [--out FILE]   (GPU)
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_sweep import fastest, output_path, sweep, write_rows  # noqa: E402
from meteora_layer import (  # noqa: E402
    TOP_K,
    Case,
    kernel_ms_per_call,
    make_params,
    route,
    segment_inputs,
    traced_kernel_ms,
)

from meteora_jax.lora_mixture import compute_gate_logits  # noqa: E402
from meteora_jax.pallas.routed_gemm import RoutedGemmBlockSizes  # noqa: E402
from meteora_jax.pallas.tile_routing import slot_coefficients, slot_count, tile_slots  # noqa: E402
from meteora_jax.pallas.tile_shrink import TileShrinkBlockSizes, tile_shrink, tile_shrink_reference  # noqa: E402

CASES = (Case(4096, 4096, 256, 16384), Case(4096, 4096, 256, 4096), Case(4096, 4096, 1024, 4096))
TILE_TOKENS = RoutedGemmBlockSizes().tile_tokens


def block_grid():
    # The first sweep with A gathered in 16-byte pieces (results/tile_shrink_tuning_gathered.json) chose 128-token
    # blocks over 64, and one split lost there (76 against 68 us at 16384 tokens, 2 loads in flight); here: more
    # loads in flight, with which one split (no sum by XLA) may pay.
    yield TileShrinkBlockSizes(block_tokens=64, block_in=128, num_warps=4, num_stages=3, splits=4)  # session 10's tiles
    for block_in, warps, splits, stages in itertools.product((64, 128), (4, 8), (1, 2, 4), (2, 3, 4)):
        yield TileShrinkBlockSizes(block_tokens=128, block_in=block_in, num_warps=warps, splits=splits,
                                   num_stages=stages)


def main() -> None:
    out = output_path("tile_shrink_tuning.json")
    rows = []
    for case in CASES:
        p = make_params(case, jax.random.key(case.adapters), "bfloat16")
        x = segment_inputs(jax.random.key(case.tokens), case.tokens, p["gate"], 256)
        indices, weights = route(compute_gate_logits(x, p["gate"]), TOP_K, 1.0)
        slots = slot_count(p["lora_a"].shape[-1])
        adapters, slot = tile_slots(indices, case.adapters, TILE_TOKENS, slots)
        coef = slot_coefficients(weights * p["scaling"][indices], slot, slots)
        args = (x, p["lora_a"], adapters, coef)
        ref = tile_shrink_reference(*args)
        xla_ms = kernel_ms_per_call(jax.jit(tile_shrink_reference).lower(*args).compile(), args, 1)
        rows.append({"case": case.shape, "adapters": case.adapters, "tokens": case.tokens, "form": "xla",
                     "kernel_ms": xla_ms})

        def measure(blocks):
            fn = jax.jit(lambda *a: tile_shrink(*a, tile_tokens=TILE_TOKENS, blocks=blocks))
            got = fn(*args).astype(jnp.float32)
            compiled = fn.lower(*args).compile()
            return {"rel_err": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
                    "kernel_ms": kernel_ms_per_call(compiled, args, 1),
                    "shrink_kernel_ms": traced_kernel_ms(compiled, args, "meteora_tile_shrink")}

        configs = sweep({"adapters": case.adapters, "tokens": case.tokens, "form": "tile_shrink"}, "blocks",
                        block_grid(), measure)
        rows += configs
        best = fastest(configs)
        summary = f"best {best['kernel_ms'] * 1e3:.1f} us err {best['rel_err']:.1e} {best['blocks']}" if best else ""
        print(f"N={case.adapters} T={case.tokens}: xla {xla_ms * 1e3:.1f} us; tile_shrink {summary}")
        write_rows(out, rows)


if __name__ == "__main__":
    main()
