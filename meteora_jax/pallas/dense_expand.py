"""Prefill-path kernel for few adapters: y += H @ B_all, added into the base output in place.

H [M, N r] is every adapter's x A scaled by the token's sparse routing coefficient (zero where not
chosen), B_all [N r, O] the stacked B. While N r is small every block of tokens uses most adapters, so
reading all of B costs no more than gathering (from L2: 1.8 MB at N = 28, r = 8, O = 4096), and tokens
stay in their order: one coalesced read and write of y. XLA's form of this step (the `dense` strategy)
writes its product to a new [M, O] buffer beside the base output, with cuBLAS's 32 MiB workspace live
beside both (1.25x a LoRA's temporaries at T = 16384); here the output is y's buffer (aliased).
One program per (token block, output tile). In edge tiles, rows and columns past the edges repeat the last row and
column (same value, same address: a benign duplicate write, meteora_jax/pallas/in_place.py) rather than relying
on masked block edges, which wrote out of bounds on the GPU when a tile overhung the output's columns; the
duplicates also keep interpret mode exact, since it emulates masked stores by read-modify-write.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.block_sizes import check_powers_of_two
from meteora_jax.pallas.in_place import add_into


@dataclasses.dataclass(frozen=True)
class DenseExpandBlockSizes:
    block_tokens: int = 64
    block_out: int = 128
    num_warps: int = 4

    def check(self) -> None:
        check_powers_of_two(self, ("block_tokens", "block_out"))


def _kernel(h_ref, b_ref, y_ref, out_ref, *, tokens, out_features, rank_block, interpret,
            blocks: DenseExpandBlockSizes):
    del y_ref  # aliased to out_ref, which is read and written in place
    bt, bo = blocks.block_tokens, blocks.block_out
    first_row, first_col = pl.program_id(0) * bt, pl.program_id(1) * bo
    precision = jax.lax.Precision.HIGHEST if h_ref.dtype == jnp.float32 else None

    def add_product(h, b, tile, repeated_lanes):
        add_into(tile, jnp.dot(h, b, preferred_element_type=jnp.float32, precision=precision), interpret=interpret,
                 repeated_lanes=repeated_lanes)

    # Interior tiles take contiguous slices: with the edge form's gathers in every tile the layer took
    # 1014 instead of 926 us at 16384 tokens, 4096 -> 4096 (bench/NOTES.md).
    @pl.when((first_row + bt <= tokens) & (first_col + bo <= out_features))
    def _():
        add_product(plt.load(h_ref.at[pl.ds(first_row, bt), pl.ds(0, rank_block)]),
                    plt.load(b_ref.at[pl.ds(0, rank_block), pl.ds(first_col, bo)]),
                    out_ref.at[pl.ds(first_row, bt), pl.ds(first_col, bo)], repeated_lanes=False)

    @pl.when((first_row + bt > tokens) | (first_col + bo > out_features))
    def _():
        rows = jnp.minimum(first_row + jnp.arange(bt), tokens - 1)
        cols = jnp.minimum(first_col + jnp.arange(bo), out_features - 1)
        ranks = jnp.arange(rank_block)
        # Gathers index with integer arrays on both axes: interpret mode cannot mix them with slices.
        add_product(plt.load(h_ref.at[rows[:, None], ranks[None, :]]),
                    plt.load(b_ref.at[ranks[:, None], cols[None, :]]),
                    out_ref.at[rows[:, None], cols[None, :]], repeated_lanes=True)


def dense_expand_reference(h, b, y):
    return (y.astype(jnp.float32) + jnp.dot(h, b, preferred_element_type=jnp.float32)).astype(y.dtype)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def dense_expand_add(h, b, y, *, blocks: DenseExpandBlockSizes = DenseExpandBlockSizes(), interpret: bool = False):
    """y + h @ b in y's dtype, in place: h [M, K], b [K, O] of one dtype, y [M, O]. Differentiable in all three."""
    return _dense_expand(h, b, y, blocks, interpret)


def _check(h, b, y, blocks: DenseExpandBlockSizes) -> None:
    blocks.check()
    if h.ndim != 2 or b.ndim != 2 or y.ndim != 2 or h.shape[1] != b.shape[0] or y.shape != (h.shape[0], b.shape[1]):
        raise ValueError(f"shape mismatch: h {h.shape} @ b {b.shape} must have the shape of y {y.shape}")
    if h.dtype != b.dtype:
        raise ValueError(f"h and b must share a dtype, got {h.dtype} and {b.dtype}")


def _forward_kernel(h, b, y, blocks: DenseExpandBlockSizes, interpret: bool):
    _check(h, b, y, blocks)
    m, k = h.shape
    out_features = b.shape[1]
    k_pad = max(pl.next_power_of_2(k), 16)  # Triton's tile rule; the zero columns add nothing
    h = jnp.pad(h, ((0, 0), (0, k_pad - k)))
    b = jnp.pad(b, ((0, k_pad - k), (0, 0)))
    kernel = functools.partial(_kernel, tokens=m, out_features=out_features, rank_block=k_pad, interpret=interpret,
                               blocks=blocks)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(pl.cdiv(m, blocks.block_tokens), pl.cdiv(out_features, blocks.block_out)),
        input_output_aliases={2: 0},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps),
        interpret=interpret,
        name="meteora_dense_expand",
    )(h, b, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_expand(h, b, y, blocks, interpret):
    return _forward_kernel(h, b, y, blocks, interpret)


def _dense_expand_forward(h, b, y, blocks, interpret):
    return _forward_kernel(h, b, y, blocks, interpret), (h, b)


def _dense_expand_backward(blocks, interpret, residuals, g):
    h, b = residuals
    g32 = g.astype(jnp.float32)
    dh = jnp.dot(g32, b.T.astype(jnp.float32)).astype(h.dtype)
    db = jnp.dot(h.T.astype(jnp.float32), g32).astype(b.dtype)
    return dh, db, g


_dense_expand.defvjp(_dense_expand_forward, _dense_expand_backward)
