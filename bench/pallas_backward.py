"""The `pallas` strategy's backward for x and the routing coefficients: device (kernel) time and temporaries of
its form (dx by the grouped kernels on the transposed adapters, dcoef from per-pair gathers of A and B in XLA)
against the per-token pair kernel of `fused`'s miss path (meteora_jax/pallas/pair_grads.py) given every pair
(every coefficient is nonzero), bf16, r = 8, with each form's error against the float32 reference. Routing: runs
of 96 tokens (as prompts route) and a random gate. Its results (session 9) are of the pair kernel as it was then,
its 4096 programs owning the tokens p, p + 4096, ...; since session 17 it walks a list of the tokens with a
nonzero coefficient, built per call here (the sort counted in its time).

Usage: python bench/pallas_backward.py [--out FILE]   (GPU)
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_sweep import output_path, write_rows  # noqa: E402
from meteora_layer import TOP_K, Case, make_params, normal, route, segment_inputs, traced_kernel_ms  # noqa: E402

from meteora_jax.lora_mixture import compute_gate_logits  # noqa: E402
from meteora_jax.pallas.lora_segment import SegmentBlockSizes, lora_segment_add  # noqa: E402
from meteora_jax.pallas.missed_add import MissedAddBlockSizes  # noqa: E402
from meteora_jax.pallas.pair_grads import pair_input_grads, pair_input_grads_reference  # noqa: E402

CASES = (Case(4096, 4096, 28, 4096), Case(4096, 4096, 256, 4096), Case(4096, 4096, 256, 16384),
         Case(4096, 4096, 1024, 16384))
ROUTINGS = ("runs96", "random")
BLOCKS = (MissedAddBlockSizes(), MissedAddBlockSizes(programs=16384), MissedAddBlockSizes(num_warps=8),
          MissedAddBlockSizes(block_in=512, block_out=512))


def gathered_form(x, lora_a, lora_b, indices, coef, g):
    """The `pallas` strategy's backward (meteora_jax/pallas/mixture.py): dx through the grouped kernels on the
    transposed adapters, dcoef from every pair's gathered A and B."""
    dx = lora_segment_add(g, jnp.swapaxes(lora_b, 1, 2), jnp.swapaxes(lora_a, 1, 2), indices, coef,
                          jnp.zeros(x.shape, jnp.float32), blocks=SegmentBlockSizes()).astype(x.dtype)
    hx = jnp.einsum("MI,MKIR->MKR", x, lora_a[indices], preferred_element_type=jnp.float32)
    hg = jnp.einsum("MO,MKRO->MKR", g, lora_b[indices], preferred_element_type=jnp.float32)
    return dx, jnp.sum(hx * hg, axis=-1)


def operands(case: Case, routing: str):
    p = make_params(case, jax.random.key(case.adapters), gate_dtype="bfloat16")
    key = jax.random.key(case.tokens)
    x = normal(key, (case.tokens, case.in_features), 1.0) if routing == "random" else segment_inputs(
        key, case.tokens, p["gate"], 96)
    indices, weights = route(compute_gate_logits(x, p["gate"]), TOP_K, 1.0)
    coef = weights * p["scaling"][indices]
    g = normal(jax.random.key(1), (case.tokens, case.out_features), 1.0)
    return x, p["lora_a"], p["lora_b"], indices, coef, g


def rel_error(ours, ref) -> float:
    ours, ref = ours.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(ours - ref) / jnp.linalg.norm(ref))


def measure(name: str, fn, args, ref, base: dict) -> dict:
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        dx, dcoef = compiled(*args)
        return base | {"form": name, "kernel_ms": traced_kernel_ms(compiled, args),
                       "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                       "dx_rel_err": rel_error(dx, ref[0]), "dcoef_rel_err": rel_error(dcoef, ref[1])}
    except Exception as error:  # one form's failure (e.g. out of memory) must not end the sweep
        return base | {"form": name, "error": f"{type(error).__name__}: {str(error)[:200]}"}


def main() -> int:
    out = output_path("pallas_backward.json")
    rows = []
    for case in CASES:
        for routing in ROUTINGS:
            args = operands(case, routing)
            ref = jax.jit(pair_input_grads_reference)(*args)
            base = {"case": case.shape, "adapters": case.adapters, "tokens": case.tokens, "routing": routing}
            rows.append(measure("gathered", gathered_form, args, ref, base))
            for blocks in BLOCKS:
                def pair(*a, blocks=blocks):
                    return pair_input_grads(*a, blocks=blocks)

                rows.append(measure("pair kernel", pair, args, ref, base | {"blocks": repr(blocks)}))
            for row in rows[-1 - len(BLOCKS):]:
                print(row, flush=True)
    write_rows(out, rows)
    print("\n| N | T | routing | gathered ms | gathered MB | pair kernel ms | pair kernel MB | blocks |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    for case in CASES:
        for routing in ROUTINGS:
            same = [r for r in rows if (r["adapters"], r["tokens"], r["routing"]) == (case.adapters, case.tokens,
                                                                                      routing)]
            cells = []
            for form in ("gathered", "pair kernel"):
                timed = [r for r in same if r["form"] == form and "kernel_ms" in r]
                best = min(timed, key=lambda r: r["kernel_ms"]) if timed else None
                cells.append(f"{best['kernel_ms']:.3f} | {best['temp_bytes'] / 1e6:.0f}" if best else "failed | -")
            blocks = min((r for r in same if r["form"] == "pair kernel" and "kernel_ms" in r),
                         key=lambda r: r["kernel_ms"], default={}).get("blocks", "-")
            print(f"| {case.adapters} | {case.tokens} | {routing} | {cells[0]} | {cells[1]} | {blocks} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
