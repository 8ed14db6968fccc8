"""Top-k routing of many tokens in one pass over the gate logits, for the Pallas strategies' prefill.

    idx[m] = the k largest logits[m] (ties to the lower adapter);  w[m] = softmax(logits[m, idx[m]] / T)

Why: XLA routes by k rounds of max and argmax over [T, N] (lora_mixture.route), each a pass over the float32
logits, then a softmax kernel: at N = 1024, 16384 tokens, 53 us for the two rounds alone, next to a 180 us gate
matmul (bench/NOTES.md). Here each program loads a block of tokens' logits once and keeps them in registers for
all k rounds and the softmax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.gate_logits import summed_shares
from meteora_jax.lora_mixture import route
from meteora_jax.pallas.block_sizes import check_num_warps, check_powers_of_two


def route_tokens_reference(logits, top_k: int, temperature):
    """XLA's routing (lora_mixture.route), which the kernel reproduces; shares [T, S, N] summed first."""
    return route(logits if logits.ndim == 2 else summed_shares(logits), top_k, temperature)


@dataclasses.dataclass(frozen=True)
class RouteBlockSizes:
    """block_tokens: tokens per program, whose [block_tokens, N] logits sit in registers (N rounded up to a power
    of two), over num_warps warps."""

    # bench/route_tuning.py: 16 x 4 took 8.4 us at N = 256 and 34 at N = 1024 (16384 tokens; XLA 14.3 and 54.3);
    # 32-token blocks took up to 2x longer at N = 1024, 8 warps 0.5 us less at N = 256 and 7 us more at 1024.
    block_tokens: int = 16
    num_warps: int = 4

    def check(self) -> None:
        check_powers_of_two(self, ("block_tokens",))
        check_num_warps(self, ("num_warps",))


def top_k_rounds(candidates, lanes, top_k: int, temperature: float):
    """Inside a kernel: (k chosen lanes, int32; their k softmax(values / T) weights) along the last axis of
    candidates (padding lanes -inf), by k rounds of max and its first lane: the same ties as lax.top_k and `route`.
    Shared by this kernel's blocks of tokens and the decode kernel's single token."""
    # A NaN counts as the largest logit, as in XLA's argmax (Triton's max would skip it, and no lane would equal the
    # max): as +inf, so a row holding +inf before its first NaN takes the +inf first, where XLA takes the NaN; its
    # weights are NaN either way.
    candidates = jnp.where(candidates != candidates, jnp.inf, candidates)
    chosen, values = [], []
    for _ in range(top_k):
        best = jnp.max(candidates, axis=-1)
        lane = jnp.min(jnp.where(candidates == best[..., None], lanes, lanes.shape[0]), axis=-1)
        chosen.append(lane.astype(jnp.int32))
        values.append(best)
        candidates = jnp.where(lanes == lane[..., None], -jnp.inf, candidates)
    exps = [jnp.exp((v - values[0]) / temperature) for v in values]
    total = functools.reduce(jnp.add, exps)
    return chosen, [e / total for e in exps]


def _kernel(logits_ref, idx_ref, weight_ref, *, tokens, num_adapters, shares, top_k, temperature,
            blocks: RouteBlockSizes):
    first = pl.program_id(0) * blocks.block_tokens
    rows = first + jnp.arange(blocks.block_tokens)
    lanes = jnp.arange(pl.next_power_of_2(num_adapters))
    inside = rows < tokens
    mask = inside[:, None] & (lanes[None, :] < num_adapters)
    # The shares (row-major [S, N] per token) added in order, as gate_logits.summed_shares adds them.
    candidates = functools.reduce(jnp.add, [
        plt.load(logits_ref.at[rows[:, None], share * num_adapters + lanes[None, :]], mask=mask, other=-jnp.inf)
        for share in range(shares)])
    chosen, weights = top_k_rounds(candidates, lanes, top_k, temperature)
    for j in range(top_k):
        column = jnp.full_like(rows, j)
        plt.store(idx_ref.at[rows, column], chosen[j], mask=inside)
        plt.store(weight_ref.at[rows, column], weights[j], mask=inside)


def route_tokens(logits, top_k: int, temperature: float, *, blocks: RouteBlockSizes = RouteBlockSizes(),
                 interpret: bool = False):
    """(indices [T, K] int32, weights [T, K] float32) as `route` gives them, from float32 logits [T, N], or from
    shares [T, S, N] whose sum over S is the logits (a gate matmul split over its inputs, whose partial products
    this kernel adds as it reads them, in place of a reduction kernel; summed_shares); differentiable in them:
    each chosen value's gradient goes to its own logit (lax.top_k's rule; `route`'s max splits it among tied
    logits), and to each of its shares. temperature: a Python number (it is compiled into the kernel)."""
    blocks.check()
    if logits.ndim not in (2, 3) or 0 in logits.shape[1:]:
        raise ValueError(f"logits {logits.shape} must be [tokens, adapters] or shares [tokens, shares, adapters]")
    n = logits.shape[-1]
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of adapters ({n})")
    if isinstance(temperature, jax.Array):
        raise ValueError("route_tokens compiles the temperature into its kernel: pass a Python number, not an array")
    if logits.shape[0] == 0:
        return jnp.zeros((0, top_k), jnp.int32), jnp.zeros((0, top_k), jnp.float32)
    shares = logits.reshape(logits.shape[0], -1, n).astype(jnp.float32)
    return _differentiable(shares, top_k, float(temperature), blocks, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _differentiable(logits, top_k, temperature, blocks, interpret):
    return _call(logits, top_k, temperature, blocks, interpret)


def _forward(logits, top_k, temperature, blocks, interpret):
    indices, weights = _call(logits, top_k, temperature, blocks, interpret)
    return (indices, weights), (indices, weights, logits.shape)


def _backward(top_k, temperature, blocks, interpret, residuals, cotangents):
    """The softmax's gradient at the chosen logits, zero at the others, the same for every share."""
    indices, weights, shape = residuals
    _, g = cotangents
    dvalues = weights * (g - jnp.sum(g * weights, axis=-1, keepdims=True)) / temperature
    # One elementwise pass over [T, N]: a product with one-hot rows would be a batched matmul over [T, K, N].
    chosen = jnp.arange(shape[-1]) == indices[..., None]
    dlogits = jnp.sum(jnp.where(chosen, dvalues[..., None], 0.0), axis=1)
    return (jnp.broadcast_to(dlogits[:, None], shape),)


_differentiable.defvjp(_forward, _backward)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _call(logits, top_k, temperature, blocks, interpret):
    t, shares, n = logits.shape
    kernel = functools.partial(_kernel, tokens=t, num_adapters=n, shares=shares, top_k=top_k,
                               temperature=temperature, blocks=blocks)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((t, top_k), jnp.int32), jax.ShapeDtypeStruct((t, top_k), jnp.float32)),
        grid=(pl.cdiv(t, blocks.block_tokens),),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps),
        interpret=interpret,
        name="meteora_route_tokens",
    )(logits.reshape(t, shares * n))
