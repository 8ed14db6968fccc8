"""Can a hand-written Pallas GEMM carry the base linear? Mosaic GPU's Hopper matmul (jax's example kernel,
warp-specialised TMA + wgmma) against XLA's cuBLAS dot, device (kernel) time, bf16, at prefill shapes.

A MeteoRA layer whose adapters' delta rides in the base matmul's epilogue needs its own GEMM; this measures
what that GEMM alone costs before any epilogue is written.

Usage: python bench/base_gemm_forms.py [--out FILE]   (GPU, Hopper)
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_sweep import fastest, gemm_operands, output_path, sweep, write_rows  # noqa: E402
from meteora_layer import kernel_ms_per_call  # noqa: E402

SHAPES = ((16384, 4096, 4096), (4096, 4096, 4096))
CALLS = 10


def hopper_configs():
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    for (tile_m, tile_n), steps, minor, width, wg in itertools.product(
        ((128, 128), (128, 256)), (4,), (hm.MatmulDimension.M, hm.MatmulDimension.N), (8, 16),
        (hm.MatmulDimension.N, hm.MatmulDimension.M),
    ):
        yield hm.TuningConfig(
            tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=steps, epi_tile_n=64, epi_tile_m=64,
            grid_minor_dim=minor, grid_tile_width=width, wg_dimension=wg,
        )


def timed(fn, args) -> float:
    def many(*a):
        return jax.lax.fori_loop(0, CALLS, lambda i, acc: acc + fn(*a)[0, 0].astype(jnp.float32), 0.0)

    compiled = jax.jit(many).lower(*args).compile()
    return kernel_ms_per_call(compiled, args, CALLS)


def main() -> None:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    out = output_path("base_gemm_forms.json")
    rows = []
    for m, k, n in SHAPES:
        keys = jax.random.split(jax.random.key(m + n), 3)
        x, w = gemm_operands(keys, m, k, n)
        c = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
        reference = jnp.dot(x, w, preferred_element_type=jnp.float32)
        xla_ms = timed(lambda x, w: x @ w, (x, w))
        xla_c_ms = timed(lambda x, w, c: x @ w + c, (x, w, c))
        rows.append({"m": m, "k": k, "n": n, "form": "xla", "kernel_ms": xla_ms})
        rows.append({"m": m, "k": k, "n": n, "form": "xla_plus_c", "kernel_ms": xla_c_ms})

        def measure(config):
            got = hm.matmul(x, w, None, config)
            return {"max_rel_err": float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference))),
                    "kernel_ms": timed(lambda x, w: hm.matmul(x, w, None, config), (x, w)),
                    "kernel_ms_with_c": timed(lambda x, w, c: hm.matmul(x, w, c, config), (x, w, c))}

        configs = sweep({"m": m, "k": k, "n": n, "form": "mgpu"}, "config", hopper_configs(), measure)
        rows += configs
        best = fastest(configs)
        mgpu = "none ran"
        if best:
            mgpu = f"{best['kernel_ms']:.3f} ms (+c {best['kernel_ms_with_c']:.3f}) {best['config']}"
        print(f"{m}x{k}->{n}: xla {xla_ms:.3f} ms (+c {xla_c_ms:.3f}); best mgpu {mgpu}")
        write_rows(out, rows)


if __name__ == "__main__":
    main()
