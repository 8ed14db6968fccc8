"""Block sizes of the routed GEMM (meteora_jax/pallas/routed_gemm.py) against XLA's dot and XLA's LoRA form,
device (kernel) time at prefill shapes, with each run's error against the plain reference. Each tile's B rows come
from 8 random slots of a bank of 256 adapters at r = 8, gathered by the kernel.

Usage: python bench/routed_gemm_tuning.py [--out FILE]   (GPU, Hopper)
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from base_gemm_forms import timed  # noqa: E402
from block_sweep import fastest, gemm_operands, output_path, sweep, write_rows  # noqa: E402

from meteora_jax.pallas.routed_gemm import RoutedGemmBlockSizes, routed_gemm, routed_gemm_reference  # noqa: E402

SHAPES = ((16384, 4096, 4096), (4096, 4096, 4096), (16384, 4096, 14336))
EXTENSION = 64
ADAPTERS, RANK = 256, 8


def block_grid():
    """The grid's block sizes that fit a program's shared memory."""
    for (tile_m, tile_n), stages, split, width in itertools.product(
        ((128, 128), (64, 256)), (4, 3), ("m", "n"), (8, 16)
    ):
        try:
            blocks = RoutedGemmBlockSizes(tile_m=tile_m, tile_n=tile_n, stages=stages, split=split,
                                          grid_tile_width=width)
        except ValueError:  # more shared memory than a program has
            continue
        yield blocks


def main() -> None:
    out = output_path("routed_gemm_tuning.json")
    rows = []
    for t, i, o in SHAPES:
        keys = jax.random.split(jax.random.key(t + o), 4)
        x, w = gemm_operands(keys, t, i, o)
        h = jax.random.normal(keys[2], (t, EXTENSION), jnp.bfloat16)
        xla_ms = timed(lambda x, w: x @ w, (x, w))
        rows.append({"t": t, "i": i, "o": o, "form": "xla_dot", "kernel_ms": xla_ms})

        def measure(blocks):
            tiles = t // blocks.tile_tokens
            bank = (jax.random.normal(keys[3], (ADAPTERS, RANK, o)) / 8).astype(jnp.bfloat16)
            slots = jax.random.randint(keys[3], (tiles, EXTENSION // RANK), 0, ADAPTERS)
            got = routed_gemm(x, w, h, bank, slots, blocks=blocks).astype(jnp.float32)
            ref = routed_gemm_reference(x, w, h, bank, slots).astype(jnp.float32)
            return {"rel_err": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
                    "kernel_ms": timed(lambda *a: routed_gemm(*a, blocks=blocks), (x, w, h, bank, slots))}

        configs = sweep({"t": t, "i": i, "o": o, "form": "routed_gemm"}, "blocks", block_grid(), measure)
        rows += configs
        best = fastest(configs)
        summary = f"best {best['kernel_ms']:.3f} ms err {best['rel_err']:.1e} {best['blocks']}" if best else "none ran"
        print(f"{t}x{i}->{o}: xla dot {xla_ms:.3f} ms; routed_gemm {summary}")
        write_rows(out, rows)


if __name__ == "__main__":
    main()
