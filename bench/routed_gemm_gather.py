"""The routed GEMM (meteora_jax/pallas/routed_gemm.py) gathering each tile's slots' B rows itself by TMA, against the
same kernel given B_tile gathered beforehand (a bank of one 64-row slot per tile; the gather's own time not
counted): device (kernel) time, 4096 -> 4096, bf16, 8 slots per tile from a bank of 256 adapters at r = 8, for the
two tile shapes the first sweep ranked best.

Usage: python bench/routed_gemm_gather.py [--out FILE]   (GPU, Hopper)
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from base_gemm_forms import timed  # noqa: E402
from block_sweep import gemm_operands, output_path, write_rows  # noqa: E402

from meteora_jax.pallas.routed_gemm import RoutedGemmBlockSizes, routed_gemm, slot_rows  # noqa: E402

TOKENS = (16384, 4096)
FEATURES, ADAPTERS, RANK, SLOTS = 4096, 256, 8, 8
BLOCKS = (RoutedGemmBlockSizes(tile_m=128, tile_n=128, grid_tile_width=16),
          RoutedGemmBlockSizes(tile_m=64, tile_n=256, grid_tile_width=8))


def main() -> None:
    out = output_path("routed_gemm_gather.json")
    rows = []
    for t in TOKENS:
        keys = jax.random.split(jax.random.key(t), 5)
        x, w = gemm_operands(keys, t, FEATURES, FEATURES)
        h = jax.random.normal(keys[2], (t, SLOTS * RANK), jnp.bfloat16)
        bank = (jax.random.normal(keys[3], (ADAPTERS, RANK, FEATURES)) / 8).astype(jnp.bfloat16)
        for blocks in BLOCKS:
            slots = jax.random.randint(keys[4], (t // blocks.tile_tokens, SLOTS), 0, ADAPTERS)
            b_tile = slot_rows(bank, slots)
            one_slot_per_tile = jnp.arange(b_tile.shape[0])[:, None]
            gemm = jax.jit(lambda *a, blocks=blocks: routed_gemm(*a, blocks=blocks))
            row = {"t": t, "blocks": str(blocks),
                   "in_kernel_ms": timed(gemm, (x, w, h, bank, slots)),
                   "pre_gathered_ms": timed(gemm, (x, w, h, b_tile, one_slot_per_tile))}
            rows.append(row)
            print(f"T={t} {blocks}: in kernel {row['in_kernel_ms'] * 1e3:.1f} us, "
                  f"pre-gathered {row['pre_gathered_ms'] * 1e3:.1f} us")
    write_rows(out, rows)


if __name__ == "__main__":
    main()
