"""The gate matmul of the Pallas strategies up to PALLAS_GATE_MAX_TOKENS: shares of x @ gate for route_tokens.

    shares[t, s P + p, n] = x[t, slice s] @ part_p[slice s, n]      (gate_logits.gate_logit_shares' layout)

Why: for the gate's [T, I] x [I, N] product XLA hands cuBLAS a workspace of up to 32 MiB, which at 1024 tokens
and N = 1024 made the layer's temporaries 4x a LoRA's (bench/NOTES.md); this kernel needs none. Each program
computes one block of tokens x block of the parts' columns over its slice of the inputs; the slices' shares are
added by the routing kernel as it reads them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.gate_logits import gate_logit_shares, most_input_splits
from meteora_jax.pallas.block_sizes import check_num_warps, check_powers_of_two


def gate_shares_reference(x, gate, input_splits: int):
    """XLA's shares (gate_logits.gate_logit_shares), which the kernel reproduces."""
    return gate_logit_shares(x, gate, input_splits)


@dataclasses.dataclass(frozen=True)
class GateSharesBlockSizes:
    """block_tokens x block_columns: one program's tile of the shares, stepping block_in inputs at a time with
    num_stages steps' loads in flight, over num_warps warps (the input slices are the caller's; input_split_count
    gives the measured choice). H100 (bench/NOTES.md): 64 x 128 tiles, 64-input steps, 4 warps and 4 stages
    against 128 x 128 and 64 x 256 at 1024-2048 tokens."""

    block_tokens: int = 64
    block_columns: int = 128
    block_in: int = 64
    num_warps: int = 4
    num_stages: int = 4

    def check(self) -> None:
        check_powers_of_two(self, ("block_tokens", "block_columns", "block_in"))
        check_num_warps(self, ("num_warps",))
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")


# Programs that input_split_count aims for (one or two per multiprocessor of an H100) and its most slices.
TARGET_PROGRAMS = 128
MAX_SPLITS = 4


def input_split_count(tokens: int, columns: int, in_features: int, blocks: GateSharesBlockSizes) -> int:
    """The most input slices (a power of two up to MAX_SPLITS, each a whole number of input steps) that keep the
    programs within TARGET_PROGRAMS."""
    tiles = pl.cdiv(tokens, blocks.block_tokens) * pl.cdiv(columns, blocks.block_columns)
    return most_input_splits(tiles, in_features, blocks.block_in, MAX_SPLITS, TARGET_PROGRAMS)


def _kernel(x_ref, w_ref, out_ref, *, tokens, in_features, columns, steps, blocks: GateSharesBlockSizes):
    first = pl.program_id(0) * blocks.block_tokens
    column = pl.program_id(1) * blocks.block_columns
    split = pl.program_id(2)
    rows = first + jnp.arange(blocks.block_tokens)
    cols = column + jnp.arange(blocks.block_columns)
    inputs = jnp.arange(blocks.block_in)

    def step(k, acc):
        start = (split * steps + k) * blocks.block_in
        inside = start + inputs < in_features
        x = plt.load(x_ref.at[pl.ds(first, blocks.block_tokens), pl.ds(start, blocks.block_in)],
                     mask=(rows < tokens)[:, None] & inside[None, :], other=0)
        w = plt.load(w_ref.at[pl.ds(start, blocks.block_in), pl.ds(column, blocks.block_columns)],
                     mask=inside[:, None] & (cols < columns)[None, :], other=0)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((blocks.block_tokens, blocks.block_columns), jnp.float32))
    plt.store(out_ref.at[pl.ds(first, blocks.block_tokens), pl.ds(split * columns + column, blocks.block_columns)],
              acc, mask=(rows < tokens)[:, None] & (cols < columns)[None, :])


@functools.partial(jax.jit, static_argnames=("input_splits", "blocks", "interpret"))
def gate_shares_matmul(x, weights, *, input_splits: int, blocks: GateSharesBlockSizes = GateSharesBlockSizes(),
                       interpret: bool = False):
    """[T, S, C] float32: x [T, I] (bfloat16) times weights [I, C] (bfloat16; the gate's parts side by side) over
    S = input_splits equal slices of the inputs. gate_logits.gate_logit_shares(..., matmul=...) takes it."""
    blocks.check()
    t, i = x.shape
    if weights.shape[0] != i or x.dtype != jnp.bfloat16 or weights.dtype != jnp.bfloat16:
        raise ValueError(f"x {x.shape} {x.dtype} and weights {weights.shape} {weights.dtype} must be bfloat16 and "
                         "agree on the input features")
    if input_splits < 1 or i % (input_splits * blocks.block_in):
        raise ValueError(f"input_splits={input_splits} slices of {blocks.block_in}-input steps must tile the {i} "
                         "input features")
    c = weights.shape[1]
    steps = i // input_splits // blocks.block_in
    kernel = functools.partial(_kernel, tokens=t, in_features=i, columns=c, steps=steps, blocks=blocks)
    shares = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((t, input_splits * c), jnp.float32),
        grid=(pl.cdiv(t, blocks.block_tokens), pl.cdiv(c, blocks.block_columns), input_splits),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="meteora_gate_shares",
    )(x, weights)
    return shares.reshape(t, input_splits, c)
