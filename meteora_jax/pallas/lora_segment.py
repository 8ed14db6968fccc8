"""Prefill-path MeteoRA kernels (SGMV style): tokens grouped by adapter, a shrink and an expand kernel.

The (token, slot) pairs are sorted by (slot, adapter) with one sort, and every group is padded to a
whole number of token blocks, so each block belongs to one slot and one adapter.
- shrink, one launch for all slots, a program per (block, span of input features): that span's part
  of h = x A for the block's gathered rows, float32 [spans, blocks * block_tokens, r]. Splitting the
  input features keeps enough programs in flight to stream x at full bandwidth.
- expand, one launch per slot, a program per (block, output tile): sums the parts of h, scales by the
  routing coefficients and adds h B into the block's output rows in place (the output is aliased).
  Within one slot every token is in one block only, so no two programs write the same row.
The block axis comes first in both grids (the fastest-varying program index): with the feature axis
first the expand took 1.2-1.3x longer on an H100 (bench/NOTES.md). Only the chosen adapters are read.
A block's padding lanes repeat its first token (same row, same coefficient), and columns past the
output's edge repeat its last column: every duplicate lane computes and writes the same value as the
lane it copies, which is harmless on the GPU and in interpret mode (which emulates masked stores by
read-modify-write; meteora_jax/pallas/in_place.py), so the output needs no scratch row or padded columns.
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
from meteora_jax.pallas.lora_gather import _check_shapes


@dataclasses.dataclass(frozen=True)
class SegmentBlockSizes:
    """block_tokens: tokens per block; block_in: input features per shrink loop step; span_in: input
    features per shrink program; block_out: output features per expand program. None: the rule in
    `resolve`."""

    block_tokens: int | None = None
    block_in: int = 64
    span_in: int = 1024
    block_out: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def check(self) -> None:
        check_powers_of_two(self, ("block_tokens", "block_in", "span_in", "block_out"))
        if self.span_in < self.block_in:
            raise ValueError(f"span_in={self.span_in} must be at least block_in={self.block_in}")

    def resolve(self, tokens: int, adapters: int) -> SegmentBlockSizes:
        """The rules, from bench/segment_tuning.py on an H100: block_tokens about one adapter group's mean
        size (tokens / adapters) from 16 to 64, so that padding blocks stays a fraction of the work; then
        64 output features and 4 warps for 64-token blocks, 128 features and 2 warps for 16-token blocks."""
        block_tokens = self.block_tokens
        if block_tokens is None:
            mean_group = max(tokens // adapters, 1)
            block_tokens = min(max(1 << (mean_group.bit_length() - 1), 16), 64)
        block_out = self.block_out or (64 if block_tokens >= 64 else 128)
        num_warps = self.num_warps or (2 if block_tokens <= 16 else 4)
        return dataclasses.replace(self, block_tokens=block_tokens, block_out=block_out, num_warps=num_warps)


def group_by_adapter(indices: jax.Array, coef: jax.Array, num_adapters: int, block: int):
    """Padded grouping of every slot with one sort: (rows [K*S*block] token ids, coef [K*S*block],
    block_adapter [K*S]) for indices / coef [M, K].

    Slot k owns the S = cdiv(M, block) + N blocks from k*S on (a static bound); within it, each adapter's
    tokens fill whole blocks. Unused blocks get adapter -1 (and rows -1); a used block's padding lanes
    repeat its first token and coefficient.
    """
    m, k = indices.shape
    n = num_adapters
    per_slot = pl.cdiv(m, block) + n
    keys = (jnp.arange(k, dtype=jnp.int32)[:, None] * n + indices.T.astype(jnp.int32)).reshape(-1)  # slot-major
    counts = jnp.bincount(keys, length=k * n)
    padded = ((counts + block - 1) // block * block).reshape(k, n)
    padded_end = (jnp.cumsum(padded, axis=1) + jnp.arange(k)[:, None] * per_slot * block).reshape(-1)
    order = jnp.argsort(keys)
    sorted_keys = keys[order]
    rank_in_group = jnp.arange(k * m) - (jnp.cumsum(counts) - counts)[sorted_keys]
    position = (padded_end - padded.reshape(-1))[sorted_keys] + rank_in_group
    size = k * per_slot * block
    rows = jnp.full((size,), -1, jnp.int32).at[position].set((order % m).astype(jnp.int32))
    padded_coef = jnp.zeros((size,), jnp.float32).at[position].set(coef.T.reshape(-1).astype(jnp.float32)[order])
    # Padding lanes repeat their block's first lane (see the module docstring); unused blocks stay -1.
    padding = rows < 0
    rows = jnp.where(padding, jnp.repeat(rows[::block], block), rows)
    padded_coef = jnp.where(padding, jnp.repeat(padded_coef[::block], block), padded_coef)
    block_start = jnp.arange(k * per_slot) * block
    group = jnp.searchsorted(padded_end, block_start, side="right")
    used = (group < k * n) & (group // n == block_start // (per_slot * block))
    block_adapter = jnp.where(used, group % n, -1).astype(jnp.int32)
    return rows, padded_coef, block_adapter


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _shrink_kernel(rows_ref, block_adapter_ref, x_ref, a_ref, h_ref, *, in_features, rank, rank_block,
                   blocks: SegmentBlockSizes):
    g, span = pl.program_id(0), pl.program_id(1)
    adapter = block_adapter_ref[g]
    bt, bi = blocks.block_tokens, blocks.block_in

    @pl.when(adapter >= 0)
    def _():
        rows = rows_ref[pl.ds(g * bt, bt)]
        ranks = jnp.arange(rank_block)

        # Gathers index with integer arrays on both axes: interpret mode cannot mix them with slices.
        def step(i, h):
            cols = span * blocks.span_in + i * bi + jnp.arange(bi)
            inside = cols < in_features
            safe_cols = jnp.minimum(cols, in_features - 1)
            x = plt.load(x_ref.at[rows[:, None], safe_cols[None, :]], mask=inside[None, :], other=0)
            a = plt.load(a_ref.at[adapter, safe_cols[:, None], jnp.minimum(ranks, rank - 1)[None, :]],
                         mask=inside[:, None] & (ranks < rank)[None, :], other=0)
            return h + jnp.dot(x, a, preferred_element_type=jnp.float32, precision=_precision(x_ref.dtype))

        h = jax.lax.fori_loop(0, blocks.span_in // bi, step, jnp.zeros((bt, rank_block), jnp.float32))
        h_ref[span, pl.ds(g * bt, bt), :] = h


def _expand_kernel(rows_ref, coef_ref, block_adapter_ref, h_ref, b_ref, y_ref, out_ref, *, first_block, out_features,
                   rank, rank_block, spans, interpret, blocks: SegmentBlockSizes):
    del y_ref  # aliased to out_ref, which is read and written in place
    g, tile_index = first_block + pl.program_id(0), pl.program_id(1)
    adapter = block_adapter_ref[g]
    bt, bo = blocks.block_tokens, blocks.block_out

    @pl.when(adapter >= 0)
    def _():
        rows = rows_ref[pl.ds(g * bt, bt)]
        h = h_ref[jnp.int32(0), pl.ds(g * bt, bt), :]
        for span in range(1, spans):
            h += h_ref[jnp.int32(span), pl.ds(g * bt, bt), :]
        h = (h * coef_ref[pl.ds(g * bt, bt)][:, None]).astype(b_ref.dtype)
        ranks = jnp.arange(rank_block)
        cols = jnp.minimum(tile_index * bo + jnp.arange(bo), out_features - 1)  # past the edge: the last column
        b = plt.load(b_ref.at[adapter, jnp.minimum(ranks, rank - 1)[:, None], cols[None, :]],
                     mask=(ranks < rank)[:, None], other=0)
        delta = jnp.dot(h, b, preferred_element_type=jnp.float32, precision=_precision(b_ref.dtype))
        add_into(out_ref.at[rows[:, None], cols[None, :]], delta, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lora_segment(x, lora_a, lora_b, indices, coef, *, blocks: SegmentBlockSizes = SegmentBlockSizes(),
                 interpret: bool = False):
    """delta [M, O] float32 for x [M, I], lora_a [N, I, R], lora_b [N, R, O], indices / coef [M, K].

    indices must lie in [0, N) (as `route` gives them): traced values cannot be checked here, and an
    index out of range reads or groups past the adapters."""
    y = jnp.zeros((x.shape[0], lora_b.shape[-1]), jnp.float32)
    return lora_segment_add(x, lora_a, lora_b, indices, coef, y, blocks=blocks, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lora_segment_add(x, lora_a, lora_b, indices, coef, y, *, blocks: SegmentBlockSizes = SegmentBlockSizes(),
                     interpret: bool = False):
    """y + delta in y's dtype, added in place (y [M, O]); the rest as `lora_segment`."""
    blocks.check()
    _check_shapes(x, lora_a, lora_b, indices, coef)
    m, in_features = x.shape
    n, _, rank = lora_a.shape
    out_features = lora_b.shape[-1]
    if x.dtype != lora_a.dtype or x.dtype != lora_b.dtype:
        raise ValueError(f"x, lora_a and lora_b must share a dtype, got {x.dtype}, {lora_a.dtype}, {lora_b.dtype}")
    if y.shape != (m, out_features):
        raise ValueError(f"y has shape {y.shape}; expected {(m, out_features)}")
    blocks = blocks.resolve(m, n)
    rank_block = max(pl.next_power_of_2(rank), 16)
    spans = pl.cdiv(in_features, blocks.span_in)
    params = plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    rows, padded_coef, block_adapter = group_by_adapter(indices, coef, n, blocks.block_tokens)
    h = pl.pallas_call(
        functools.partial(_shrink_kernel, in_features=in_features, rank=rank, rank_block=rank_block, blocks=blocks),
        out_shape=jax.ShapeDtypeStruct((spans, rows.shape[0], rank_block), jnp.float32),
        grid=(block_adapter.shape[0], spans),
        compiler_params=params,
        interpret=interpret,
        name="meteora_lora_shrink",
    )(rows, block_adapter, x, lora_a)
    per_slot = block_adapter.shape[0] // indices.shape[1]
    for slot in range(indices.shape[1]):  # one slot at a time: within a slot no two blocks share a token
        expand = functools.partial(_expand_kernel, first_block=slot * per_slot, out_features=out_features, rank=rank,
                                   rank_block=rank_block, spans=spans, interpret=interpret, blocks=blocks)
        y = pl.pallas_call(
            expand,
            out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
            grid=(per_slot, pl.cdiv(out_features, blocks.block_out)),
            input_output_aliases={5: 0},
            compiler_params=params,
            interpret=interpret,
            name="meteora_lora_expand",
        )(rows, padded_coef, block_adapter, h, lora_b, y)
    return y
