"""Adding into an output tile in place where some lanes repeat others' addresses.

Edge and padding lanes of several kernels repeat a real lane's row or column rather than masking it (masked block
edges wrote out of bounds on the GPU, and interpret mode emulates a masked store by a read-modify-write that lets
the masked duplicate write back the old value). A duplicate lane computes the very value of the lane it repeats,
so its store is harmless, provided every lane has loaded before any lane stores: otherwise a warp that stores
first makes another warp's load see the updated element and add the update twice. Triton orders no global loads
and stores across a program's warps, so a barrier sits between them (the interpreter runs each load and store
whole, and has no barrier).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import triton as plt


def add_into(tile, delta, *, interpret: bool, repeated_lanes: bool = True) -> None:
    """tile += delta (float32), in tile's dtype; tile is a ref view whose lanes may repeat addresses (without
    `repeated_lanes`, each lane is its own element and needs no barrier)."""
    total = plt.load(tile).astype(jnp.float32) + delta
    if repeated_lanes and not interpret:
        plt.debug_barrier()
    plt.store(tile, total.astype(tile.dtype))
