"""The routed shrink of the `fused` strategy: h = x A per token for the adapters of its tile's slots, scaled.

h[t, u r + j] = coef[t, u] * (x[t] @ A[adapters[tile(t), u]])[:, j]: 64 columns, U = 64 // r slots, zero past
U r. Programs per block of tokens and share of the input features read x once and the slots' A as one
[block_in, 64] gather per step, so one tensor-core dot per step serves every slot (XLA's form gathers A for
every tile into memory first).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.block_sizes import check_powers_of_two
from meteora_jax.pallas.routed_gemm import LANE as COLUMNS  # h's width: the routed GEMM's extra step


@dataclasses.dataclass(frozen=True)
class TileShrinkBlockSizes:
    block_tokens: int = 64
    block_in: int = 128
    num_warps: int = 4
    # Programs per block of tokens, each over its share of the input features (their float32 sums are added
    # by XLA): a program's steps wait on gathered loads, so more, shorter programs fill the GPU.
    splits: int = 4
    # Read A as [N, r, I], transposed per call: a step's gathered loads then run along the inputs, not r elements
    # (16 bytes at r = 8) at a time. The kernel alone took 59 instead of 82 us at N = 256, T = 16384, but the
    # transpose costs more than that saves at N = 1024 (104 against 27 us in all at 4096 tokens); it pays only
    # where A is held in that layout (bench/NOTES.md).
    transpose_a: bool = False

    def check(self, tile_tokens: int) -> None:
        check_powers_of_two(self, ("block_tokens", "block_in"))
        if self.splits < 1:
            raise ValueError(f"splits={self.splits} must be >= 1")
        if tile_tokens % self.block_tokens:
            raise ValueError(f"block_tokens={self.block_tokens} must divide the routing tile of {tile_tokens} tokens")


def tile_shrink_reference(x, lora_a, adapters, coef):
    """Plain-JAX form in float32: x [T, I], lora_a [N, I, r], adapters [tiles, U], coef [T, U] -> [T, 64]."""
    tiles, slots = adapters.shape
    t, i = x.shape
    r = lora_a.shape[-1]
    h = jnp.einsum("GTI,GUIR->GTUR", x.reshape(tiles, t // tiles, i).astype(jnp.float32),
                   lora_a[adapters].astype(jnp.float32))
    h = h.reshape(t, slots, r) * coef[:, :, None]
    return jnp.pad(h.reshape(t, slots * r), ((0, 0), (0, COLUMNS - slots * r)))


def _kernel(adapters_ref, x_ref, a_ref, partial_ref, *, in_features, rank, slots, tile_tokens, steps,
            blocks: TileShrinkBlockSizes):
    first = pl.program_id(0) * blocks.block_tokens
    split = pl.program_id(1)
    tile = first // tile_tokens
    columns = jnp.arange(COLUMNS)
    used = columns < slots * rank
    slot_of_column = jnp.minimum(columns // rank, slots - 1)
    adapter_of_column = plt.load(adapters_ref.at[jnp.full((COLUMNS,), tile, jnp.int32), slot_of_column])
    inputs = jnp.arange(blocks.block_in)

    def step(k, acc):
        start = (split * steps + k) * blocks.block_in
        valid = start + inputs < in_features
        x = plt.load(x_ref.at[pl.ds(first, blocks.block_tokens), pl.ds(start, blocks.block_in)],
                     mask=valid[None, :], other=0)
        mask = valid[:, None] & used[None, :]
        if blocks.transpose_a:  # lora_a as [N * r, I]
            rows = jnp.broadcast_to((adapter_of_column * rank + columns % rank)[None, :], mask.shape)
            a = plt.load(a_ref.at[rows, jnp.broadcast_to(start + inputs[:, None], mask.shape)], mask=mask, other=0)
        else:  # lora_a as [N * I, r]
            rows = (adapter_of_column * in_features)[None, :] + start + inputs[:, None]
            a = plt.load(a_ref.at[rows, jnp.broadcast_to(columns % rank, rows.shape)], mask=mask, other=0)
        return acc + jnp.dot(x, a, preferred_element_type=jnp.float32)

    partial_ref[split, pl.ds(first, blocks.block_tokens), :] = jax.lax.fori_loop(
        0, steps, step, jnp.zeros((blocks.block_tokens, COLUMNS), jnp.float32))


@functools.partial(jax.jit, static_argnames=("tile_tokens", "blocks", "interpret"))
def tile_shrink(x, lora_a, adapters, coef, *, tile_tokens: int,
                blocks: TileShrinkBlockSizes = TileShrinkBlockSizes(), interpret: bool = False):
    """h [T, 64] in x's dtype (see the module docstring). x [T, I] with T a multiple of tile_tokens, lora_a
    [N, I, r] with r <= 64, adapters [T // tile_tokens, 64 // r] in [0, N), coef [T, 64 // r] float32."""
    blocks.check(tile_tokens)
    t, i = x.shape
    n, a_in, r = lora_a.shape
    slots = max(1, COLUMNS // r)
    if a_in != i or r > COLUMNS or t % tile_tokens:
        raise ValueError(f"shape mismatch: x {x.shape}, lora_a {lora_a.shape}, tile of {tile_tokens} tokens")
    if adapters.shape != (t // tile_tokens, slots) or coef.shape != (t, slots):
        raise ValueError(f"adapters {adapters.shape} must be [{t // tile_tokens}, {slots}] and coef {coef.shape} "
                         f"[{t}, {slots}]")
    return _differentiable(x, lora_a, adapters.astype(jnp.int32), coef.astype(jnp.float32), tile_tokens, blocks,
                           interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _differentiable(x, lora_a, adapters, coef, tile_tokens, blocks, interpret):
    return _call(x, lora_a, adapters, coef, tile_tokens, blocks, interpret)


def _forward(x, lora_a, adapters, coef, tile_tokens, blocks, interpret):
    return _call(x, lora_a, adapters, coef, tile_tokens, blocks, interpret), (x, lora_a, adapters, coef)


def _backward(tile_tokens, blocks, interpret, residuals, g):
    # The forward's precision, bfloat16 products with float32 sums, where differentiating the float32 reference
    # would keep a float32 copy of x and run float32 matmuls.
    x, lora_a, adapters, coef = residuals
    tiles, slots = adapters.shape
    t, i = x.shape
    r = lora_a.shape[-1]
    x_tiles = x.reshape(tiles, t // tiles, i)
    a_slots = lora_a.astype(x.dtype)[adapters]  # [tiles, U, I, r]
    xa = jnp.einsum("GTI,GUIR->GTUR", x_tiles, a_slots, preferred_element_type=jnp.float32)
    g = g[:, : slots * r].astype(jnp.float32).reshape(tiles, t // tiles, slots, r)
    dcoef = jnp.sum(xa * g, axis=-1).reshape(t, slots)
    dxa = (g * coef.reshape(tiles, t // tiles, slots)[..., None]).astype(x.dtype)
    dx = jnp.einsum("GTUR,GUIR->GTI", dxa, a_slots, preferred_element_type=jnp.float32).reshape(t, i)
    da_slots = jnp.einsum("GTI,GTUR->GUIR", x_tiles, dxa, preferred_element_type=jnp.float32)
    da = jnp.zeros(lora_a.shape, jnp.float32).at[adapters].add(da_slots)
    return dx.astype(x.dtype), da.astype(lora_a.dtype), None, dcoef


_differentiable.defvjp(_forward, _backward)


def _kernel_layout(lora_a, transpose: bool):
    n, i, r = lora_a.shape
    return jnp.swapaxes(lora_a, 1, 2).reshape(n * r, i) if transpose else lora_a.reshape(n * i, r)


def _call(x, lora_a, adapters, coef, tile_tokens, blocks, interpret):
    t, i = x.shape
    n, _, r = lora_a.shape
    slots = adapters.shape[1]
    steps = pl.cdiv(pl.cdiv(i, blocks.block_in), blocks.splits)
    kernel = functools.partial(_kernel, in_features=i, rank=r, slots=slots, tile_tokens=tile_tokens, steps=steps,
                               blocks=blocks)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((blocks.splits, t, COLUMNS), jnp.float32),
        grid=(t // blocks.block_tokens, blocks.splits),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="meteora_tile_shrink",
    )(adapters, x, _kernel_layout(lora_a.astype(x.dtype), blocks.transpose_a))
    per_column = jnp.pad(jnp.repeat(coef, r, axis=1), ((0, 0), (0, COLUMNS - slots * r)))
    return (jnp.sum(partial, axis=0) * per_column).astype(x.dtype)
