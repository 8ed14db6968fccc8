"""The gate's logits x @ gate [M, N] in float32, whole or as shares that a routing kernel adds as it reads them.

A float32 gate times bfloat16 x rides as two bfloat16 parts (`split_in_two`) in one tensor-core matmul with
float32 accumulation: no float32 copy of x, a fraction of a float32 matmul's time at large N (bench/NOTES.md). The
parts' products are two shares of the logits. The inputs split in S slices as a batched matmul give S shares
each: where the output alone is too small to fill the GPU, XLA splits the matmul itself and adds the halves in a
kernel of their own, which meteora_jax/pallas/route_tokens.py does instead as it reads the shares.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The gate matmul pads fewer tokens to this many rows (see compute_gate_logits).
GATE_MIN_ROWS = 8
# gate_input_splits: splits fill cuBLAS's 128 x 128 output tiles up to about this many programs, at most
# MAX_INPUT_SPLITS of them, from SPLIT_MIN_TOKENS tokens (the range measured; bench/NOTES.md).
SPLIT_TARGET_PROGRAMS = 128
MAX_INPUT_SPLITS = 4
SPLIT_MIN_TOKENS = 1024
SPLIT_TILE = 128


def gate_operand(gate):
    """The gate as the gate matmuls and kernels take it: a bfloat16 gate (for inference, see
    meteora_checkpoint.cast_gates) as it is, any other in float32, which they split into bfloat16 parts."""
    return gate if gate.dtype == jnp.bfloat16 else gate.astype(jnp.float32)


def split_in_two(value):
    """(hi, lo) in bfloat16 with hi + lo = float32 `value` to ~16 mantissa bits (bfloat16 shares float32's
    exponent range, so lo never underflows where float16's would).

    hi keeps value's top 16 bits by masking the rest (exact in bfloat16) instead of a float32 -> bfloat16
    -> float32 cast pair: XLA on GPU, which allows excess precision by default, folds such a pair back to
    the original value, and lo would come out zero (gate logits with bfloat16 weights)."""
    bits = jax.lax.bitcast_convert_type(value.astype(jnp.float32), jnp.uint32)
    top = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
    return top.astype(jnp.bfloat16), (value - top).astype(jnp.bfloat16)


def gate_parts(gate) -> list:
    """The gate's bfloat16 parts for a tensor-core matmul: a bfloat16 gate whole, any other as hi and lo."""
    return [gate] if gate.dtype == jnp.bfloat16 else list(split_in_two(gate))


def gate_columns(gate) -> int:
    """Columns of the gate's bfloat16 parts side by side: N for a bfloat16 gate, 2N (hi and lo) for another."""
    return gate.shape[1] * (1 if gate.dtype == jnp.bfloat16 else 2)


def summed_shares(shares):
    """The logits [M, N] from their shares [M, S, N], added in order (as the routing kernel adds them)."""
    return functools.reduce(jnp.add, [shares[:, s] for s in range(shares.shape[1])])


def compute_gate_logits(x, gate) -> jax.Array:
    """x @ gate [M, N] in float32: float32-accurate for a float32 gate, the bfloat16 product for a bfloat16 one
    (meteora_checkpoint.cast_gates)."""
    return summed_shares(gate_logit_shares(x, gate))


def gate_logit_shares(x, gate, input_splits: int = 1, matmul=None) -> jax.Array:
    """Shares [M, S, N] float32 of x @ gate: for bfloat16 x, input_splits slices of the inputs times the gate's
    bfloat16 parts (one for a bfloat16 gate, hi and lo for any other), slice-major; for other x one share, the
    float32 product. matmul(x, weights, input_splits=S) -> [M, S, C] computes the bfloat16 products (default
    xla_shares_matmul; meteora_jax/pallas/gate_shares.py's kernel needs no cuBLAS workspace). Below
    GATE_MIN_ROWS tokens XLA lowers the dot to a multiply and a reduction that cost 2-3x a matrix product on an
    H100 (bench/NOTES.md); zero rows keep it a product."""
    if x.ndim != 2 or gate.ndim != 2 or gate.shape[0] != x.shape[1]:
        raise ValueError(f"x {x.shape} must be [tokens, inputs] and the gate {gate.shape} [inputs, adapters]")
    m, i = x.shape
    if input_splits < 1 or i % input_splits:
        raise ValueError(f"input_splits={input_splits} must be >= 1 and divide the {i} input features")
    if m < GATE_MIN_ROWS:
        x = jnp.concatenate([x, jnp.zeros((GATE_MIN_ROWS - m, i), x.dtype)])
    if x.dtype != jnp.bfloat16:
        return jnp.dot(x.astype(jnp.float32), gate.astype(jnp.float32))[:m, None]
    return _bfloat16_shares(x, gate_operand(gate), input_splits, matmul or xla_shares_matmul)[:m]


def xla_shares_matmul(x, weights, input_splits: int):
    """[M, S, C] float32: x [M, I] times weights [I, C] over S equal slices of the inputs, as one XLA (batched)
    matmul."""
    m, i = x.shape
    if input_splits == 1:
        return jnp.dot(x, weights, preferred_element_type=jnp.float32)[:, None]
    # XLA's CPU backend has no batched bfloat16 x bfloat16 -> float32 dot; in float32 the products are the same
    # (bfloat16 products are exact in float32).
    operands = jnp.float32 if jax.default_backend() == "cpu" else x.dtype
    return jnp.einsum("MSK,SKN->MSN", x.reshape(m, input_splits, i // input_splits).astype(operands),
                      weights.reshape(input_splits, i // input_splits, -1).astype(operands),
                      preferred_element_type=jnp.float32)


def gate_input_splits(tokens: int, columns: int, in_features: int) -> int:
    """Slices of the inputs for the prefill gate matmul whose shares the routing kernel adds: enough that
    cuBLAS's 128 x 128 output tiles (columns: the gate's parts side by side, N for a bfloat16 gate, 2N for
    another) times the slices make about SPLIT_TARGET_PROGRAMS programs, each slice a whole number of tiles of
    inputs. H100 (bench/NOTES.md, gate and routing): 22.2 against 26.0 us in 2 slices at
    4096 tokens, N = 256 (XLA split the dot in two and added the halves in a kernel of their own); 13.9 against
    17.6 in 4 at 2048 tokens; the plain dot from 8192 tokens at N = 256, 2048 at N = 1024."""
    if tokens < SPLIT_MIN_TOKENS:
        return 1
    tiles = -(-tokens // SPLIT_TILE) * -(-columns // SPLIT_TILE)
    return most_input_splits(tiles, in_features, SPLIT_TILE, MAX_INPUT_SPLITS, SPLIT_TARGET_PROGRAMS)


def most_input_splits(tiles: int, in_features: int, step: int, max_splits: int, target_programs: int) -> int:
    """The most input slices (a power of two up to max_splits, each a whole number of `step` inputs) that keep
    tiles x slices programs within target_programs."""
    splits = 1
    while (splits * 2 <= max_splits and tiles * splits * 2 <= target_programs
           and in_features % (splits * 2 * step) == 0):
        splits *= 2
    return splits


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bfloat16_shares(x, gate, input_splits, matmul):
    """Gradients are float32 products (without the custom VJP the gate's would be rounded to bfloat16)."""
    n = gate.shape[1]
    parts = gate_parts(gate)
    weights = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # [I, P N]
    return matmul(x, weights, input_splits=input_splits).reshape(x.shape[0], input_splits * len(parts), n)


def _shares_forward(x, gate, input_splits, matmul):
    return _bfloat16_shares(x, gate, input_splits, matmul), (x, gate)


def _shares_backward(input_splits, _, residuals, dshares):
    """The exact derivative of each share, in float32 products: share (s, p) is x's slice s times part p, and of a
    float32 gate's parts only lo = gate - hi varies with the gate (hi, its top bits, is piecewise constant)."""
    x, gate = residuals
    m, i = x.shape
    n = gate.shape[1]
    parts = gate_parts(gate)
    dshares = dshares.reshape(m, input_splits, len(parts), n)
    sliced = (input_splits, i // input_splits, n)
    dx = functools.reduce(jnp.add, [
        jnp.einsum("MSN,SKN->MSK", dshares[:, :, p], part.astype(jnp.float32).reshape(sliced))
        for p, part in enumerate(parts)])
    x32 = x.astype(jnp.float32).reshape(m, input_splits, i // input_splits)
    dgate = jnp.einsum("MSK,MSN->SKN", x32, dshares[:, :, -1])
    return dx.reshape(m, i).astype(x.dtype), dgate.reshape(i, n).astype(gate.dtype)


_bfloat16_shares.defvjp(_shares_forward, _shares_backward)
