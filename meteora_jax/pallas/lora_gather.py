"""Decode-path MeteoRA kernel (BGMV style): per token, gather its k selected adapters and apply them.

delta[m] = sum_j coef[m, j] * (x[m] @ A[idx[m, j]]) @ B[idx[m, j]], reading only the selected adapters.
One program per (token, output tile); the rank-r intermediate stays in registers. Meant for few tokens
(decode): every output tile recomputes x A, which is cheap when A's slice is in L2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.pallas.block_sizes import check_powers_of_two


@dataclasses.dataclass(frozen=True)
class GatherBlockSizes:
    """Defaults from bench/pallas_tuning.py on an H100 (4096 -> 4096, r = 8): best or within 3%."""

    block_in: int = 1024
    block_out: int = 256
    num_warps: int = 4

    def check(self) -> None:
        check_powers_of_two(self, ("block_in", "block_out"))


def _kernel(idx_ref, coef_ref, x_ref, a_ref, b_ref, out_ref, *, top_k, in_features, out_features, rank,
            rank_block, blocks: GatherBlockSizes):
    m = pl.program_id(0)
    out_start = pl.program_id(1) * blocks.block_out
    out_cols = out_start + jnp.arange(blocks.block_out)
    ranks = jnp.arange(rank_block)
    acc = jnp.zeros((blocks.block_out,), jnp.float32)
    for j in range(top_k):
        adapter = idx_ref[m, j]
        coef = coef_ref[m, j]

        def shrink(step, h, adapter=adapter):
            start = step * blocks.block_in
            rows = start + jnp.arange(blocks.block_in)
            x = plt.load(x_ref.at[m, pl.ds(start, blocks.block_in)], mask=rows < in_features, other=0)
            a = plt.load(
                a_ref.at[adapter, pl.ds(start, blocks.block_in), pl.ds(0, rank_block)],
                mask=(rows[:, None] < in_features) & (ranks[None, :] < rank), other=0,
            )
            return h + jnp.sum(x.astype(jnp.float32)[:, None] * a.astype(jnp.float32), axis=0)

        h = jax.lax.fori_loop(0, pl.cdiv(in_features, blocks.block_in), shrink, jnp.zeros((rank_block,), jnp.float32))
        b = plt.load(
            b_ref.at[adapter, pl.ds(0, rank_block), pl.ds(out_start, blocks.block_out)],
            mask=(ranks[:, None] < rank) & (out_cols[None, :] < out_features), other=0,
        )
        acc += coef * jnp.sum(h[:, None] * b.astype(jnp.float32), axis=0)
    plt.store(out_ref.at[m, pl.ds(out_start, blocks.block_out)], acc, mask=out_cols < out_features)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lora_gather(x, lora_a, lora_b, indices, coef, *, blocks: GatherBlockSizes = GatherBlockSizes(),
                interpret: bool = False):
    """delta [M, O] float32 for x [M, I], lora_a [N, I, R], lora_b [N, R, O], indices / coef [M, K].

    indices must lie in [0, N) (as `route` gives them): traced values cannot be checked here, and an
    index out of range reads or groups past the adapters."""
    blocks.check()
    m, in_features = x.shape
    n, _, rank = lora_a.shape
    out_features = lora_b.shape[-1]
    _check_shapes(x, lora_a, lora_b, indices, coef)
    kernel = functools.partial(
        _kernel, top_k=indices.shape[1], in_features=in_features, out_features=out_features, rank=rank,
        rank_block=max(pl.next_power_of_2(rank), 16), blocks=blocks,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, out_features), jnp.float32),
        grid=(m, pl.cdiv(out_features, blocks.block_out)),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="meteora_lora_gather",
    )(indices.astype(jnp.int32), coef.astype(jnp.float32), x, lora_a, lora_b)


def lora_gather_reference(x, lora_a, lora_b, indices, coef):
    """Plain-JAX form of the same function, in float32."""
    a = lora_a[indices].astype(jnp.float32)  # [M, K, I, R]
    b = lora_b[indices].astype(jnp.float32)  # [M, K, R, O]
    h = jnp.einsum("MI,MKIR->MKR", x.astype(jnp.float32), a) * coef[..., None]
    return jnp.einsum("MKR,MKRO->MO", h, b)


def _check_shapes(x, lora_a, lora_b, indices, coef):
    m, in_features = x.shape
    n, a_in, rank = lora_a.shape
    if a_in != in_features or lora_b.shape[:2] != (n, rank):
        raise ValueError(f"shape mismatch: x {x.shape}, lora_a {lora_a.shape}, lora_b {lora_b.shape}")
    if indices.shape != coef.shape or indices.shape[0] != m:
        raise ValueError(f"indices {indices.shape} and coef {coef.shape} must both be [{m}, k]")
    if rank > 128:
        raise ValueError(f"rank={rank} > 128 is not supported by the kernels")
