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

# At 16384 tokens one split of 128-token blocks already gives ~128 programs; the open question is 4096 tokens.
CASES = (Case(4096, 4096, 256, 4096), Case(4096, 4096, 1024, 4096))
TILE_TOKENS = RoutedGemmBlockSizes().tile_tokens


def block_grid():
    # Since the product is transposed (h^T = A^T x^T, session 13), each program waits on one chain of wgmmas whose
    # width is its tokens: smaller blocks or more splits put more chains on each multiprocessor, fewer splits
    # leave XLA less of a sum. Session 11's sweeps (128 x 128 blocks, 4 warps, 3 stages, 4 splits at 4096 tokens)
    # ran the untransposed product.
    for block_tokens, splits, warps in itertools.product((32, 64, 128), (1, 2, 4, 8), (4, 8)):
        yield TileShrinkBlockSizes(block_tokens=block_tokens, block_in=128, num_warps=warps, splits=splits,
                                   num_stages=3)


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
