"""Block sizes of the `fused` strategy's miss path (meteora_jax/pallas/missed_add.py): device (kernel) time of the
per-token remainder on the choices that miss their tile's slots, bf16, r = 8, with each run's error against the
plain reference. Only the kernels' own time counts (not XLA's copy of y, which the expand pass updates in place
and a layer hands over). Three routings: runs of 96 tokens (meteora_layer.py --segment-tokens 96; a 128-token tile
spans 2-3 runs, so few choices miss), runs of 48 (11-25% miss) and a random gate (nearly every choice past its
tile's 8 most chosen misses). The passes walk the list of missed tokens per 128-token tile, as the routing kernel
writes it.

Usage: python bench/missed_add_tuning.py [--out FILE]   (GPU)
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
from meteora_layer import TOP_K, Case, make_params, normal, route, segment_inputs, traced_kernel_ms  # noqa: E402

from meteora_jax.lora_mixture import compute_gate_logits  # noqa: E402
from meteora_jax.pallas.missed_add import (  # noqa: E402
    MissedAddBlockSizes,
    missed_add,
    missed_add_reference,
    missed_token_list,
)
from meteora_jax.pallas.routed_gemm import RoutedGemmBlockSizes  # noqa: E402
from meteora_jax.pallas.tile_routing import slot_count, tile_slots  # noqa: E402

CASES = (Case(4096, 4096, 256, 16384), Case(4096, 4096, 1024, 4096))
ROUTINGS = ("runs96", "runs48", "random")
TILE_TOKENS = RoutedGemmBlockSizes().tile_tokens
MISS_KERNELS = ("meteora_missed_shrink", "meteora_missed_add")


def block_grid():
    # The passes walk the routing kernel's list of the missed tokens (session 13): programs per pass, from fewer
    # than one per multiprocessor (cheap where nothing misses) to the owned-token walk's 1024.
    for programs, expand_programs in itertools.product((128, 256, 1024), (128, 256, 1024)):
        yield MissedAddBlockSizes(programs=programs, expand_programs=expand_programs)


def missed_coefficients(case: Case, p: dict, routing: str):
    """(x, indices, the coefficients of the choices that miss their tile's slots [T, K])."""
    key = jax.random.key(case.tokens)
    if routing == "random":
        x = normal(key, (case.tokens, case.in_features), 1.0)
    else:
        x = segment_inputs(key, case.tokens, p["gate"], int(routing.removeprefix("runs")))
    indices, weights = route(compute_gate_logits(x, p["gate"]), TOP_K, 1.0)
    per_choice = weights * p["scaling"][indices]
    slots = slot_count(p["lora_a"].shape[-1])
    _, slot = tile_slots(indices, case.adapters, TILE_TOKENS, slots)
    return x, indices, jnp.where(slot < slots, 0, per_choice)


def main() -> None:
    out = output_path("missed_add_tuning.json")
    rows = []
    for case, routing in itertools.product(CASES, ROUTINGS):
        p = make_params(case, jax.random.key(case.adapters), "bfloat16")
        x, indices, coef = missed_coefficients(case, p, routing)
        y = x @ p["w"]
        args = (x, p["lora_a"], p["lora_b"], indices, coef, y, missed_token_list(coef, TILE_TOKENS))
        ref = missed_add_reference(*args[:-1]).astype(jnp.float32) - y
        share = float(jnp.mean(coef != 0))

        def measure(blocks):
            fn = jax.jit(lambda *a: missed_add(*a, blocks=blocks))
            got = fn(*args).astype(jnp.float32) - y
            return {"rel_err": float(jnp.linalg.norm(got - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)),
                    "kernel_ms": traced_kernel_ms(fn, args, MISS_KERNELS)}

        configs = sweep({"adapters": case.adapters, "tokens": case.tokens, "routing": routing, "missed_share": share},
                        "blocks", block_grid(), measure)
        rows += configs
        best = fastest(configs)
        summary = f"best {best['kernel_ms'] * 1e3:.1f} us err {best['rel_err']:.1e} {best['blocks']}" if best else ""
        print(f"N={case.adapters} T={case.tokens} {routing} ({share:.2%} of choices missed): {summary}")
        for row in configs:
            print(f"    {row.get('kernel_ms', 0) * 1e3:8.1f} us  {row['blocks']}  {row.get('error', '')}")
        write_rows(out, rows)


if __name__ == "__main__":
    main()
