"""Few-token (decode) MeteoRA layer after the base matmul, in three Pallas kernels.

    logits = x @ gate (float32);  idx[m], values = top-k of logits[m];  w[m] = softmax(values / T)
    y_out[m] = y[m] + sum_j w[m, j] * s[idx[m, j]] * (x[m] @ A[idx[m, j]]) @ B[idx[m, j]]

Why: XLA spends about ten small kernels on the gate, the routing and the mixture of a few tokens (each
at least ~1-2 us on an H100, bench/NOTES.md), most of the layer's cost at decode; below 8 tokens it
even lowers the gate's matrix product to a multiply and a reduction. Here:
    gate          one program per (block of input features, block of adapters): that block's share
                  of the logits, so the gate (the largest read at many adapters) is read once.
    route_shrink  one program per (token, block of input features): sums the token's logit shares,
                  takes the top-k and the softmax, then its block's share of h_j = x A_j for the k
                  chosen adapters.
    expand_add    one program per (token, output tile): sums the shares, scales by w_j s_j, and adds
                  sum_j h_j B_j into y (aliased, so the base output is updated in place).
Only the chosen adapters are read. Many small programs rather than loops inside few: at decode these
kernels are latency-bound, and a program per token or per tile left most of the GPU idle; one kernel
doing the shrink in every output tile was 2-7x slower than two (bench/NOTES.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.gate_logits import gate_operand
from meteora_jax.lora_mixture import PALLAS_DECODE_MAX_ADAPTERS, PALLAS_DECODE_MAX_TOKENS, PALLAS_MAX_RANK, route
from meteora_jax.pallas.block_sizes import check_num_warps, check_powers_of_two
from meteora_jax.pallas.lora_gather import lora_gather_reference
from meteora_jax.pallas.route_tokens import top_k_rounds

# The measured range (bench/NOTES.md): the grids grow with tokens, and a program holds a token's logits.
MAX_TOKENS = PALLAS_DECODE_MAX_TOKENS
MAX_ADAPTERS = PALLAS_DECODE_MAX_ADAPTERS
MAX_RANK = PALLAS_MAX_RANK
# Gate rows per program by adapter count at 4096 input features (bench/RESULTS.md): 64 at N = 28 and 512
# at 1024 by gate + route_shrink time in the tuning sweeps (512 with three steps' loads in flight: 9.6
# against 10.2 us at T = 1), 128 at 256 by the whole layer's time (64 was ~1 us slower there). Small tiles
# spread a few adapters' gate over many programs, but each route_shrink program sums all of its token's
# logit shares.
GATE_ROWS_BY_ADAPTERS = ((64, 64), (256, 128))
GATE_ROWS_MANY_ADAPTERS = 512
# Gate (columns, step rows) per program: (32, 128) up to 256 adapters (one step: 128 rows or fewer); beyond,
# by the gate's dtype, with four steps' loads in flight (gate_num_stages). At N = 1024, T = 1, gate +
# route_shrink: bfloat16 (64, 128) 9.35 against 9.57 us for (32, 128); float32, whose steps take six
# bfloat16 dots each, (32, 64) 12.7 against 13.8 for (32, 128) and 13.3 for (64, 64) (bench/NOTES.md).
GATE_TILE_FEW_ADAPTERS = (256, (32, 128))
GATE_TILE_MANY_ADAPTERS = {"bfloat16": (64, 128), "float32": (32, 64)}
# Doubling the rows stops at MAX_GATE_SPLITS shares per token or at MAX_GATE_ROWS rows per program
# (1024-2048 were slower in the second sweep).
MAX_GATE_SPLITS = 64
MAX_GATE_ROWS = 512
# route_shrink's (input features, warps) per program by adapter count: each program sums all of its token's
# logit shares, which at 1024 adapters outweighs its slice of x A; fewer, wider programs with more warps
# (256, 4) took 4.8 against 5.7 us at T = 1 and 6.2 against 7.3 at T = 16 there (bench/NOTES.md), while at
# N = 28 and 256 (128, 1) was best over T = 1 and 16 together (others won one T by 0.2 us, lost the other).
SHRINK_BY_ADAPTERS = ((256, (128, 1)),)
SHRINK_MANY_ADAPTERS = (256, 4)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """gate_block_in x gate_block_adapters: the gate tile per gate program, read gate_step_rows rows at a
    time with gate_num_stages steps' loads in flight (gate_num_warps warps: its dots use tensor cores);
    block_in: input features per route_shrink program (shrink_num_warps warps); block_out: output features
    per expand_add program (num_warps warps).

    Defaults from bench/decode_tuning.py on an H100 (4096 -> 4096 and 14336, r = 8, N = 28, 256 and 1024);
    None picks a field from N (gate_block_in, block_in, shrink_num_warps; see gate_rows and shrink) or from
    N and the gate's dtype (gate_block_adapters, gate_step_rows; see gate_step).
    """

    gate_block_in: int | None = None
    gate_block_adapters: int | None = None
    gate_num_warps: int = 4
    gate_step_rows: int | None = None
    gate_num_stages: int = 4
    block_in: int | None = None
    shrink_num_warps: int | None = None
    block_out: int = 128
    num_warps: int = 1

    def check(self) -> None:
        check_powers_of_two(self, ("gate_block_in", "gate_block_adapters", "gate_step_rows", "block_in", "block_out"))
        check_num_warps(self, ("gate_num_warps", "shrink_num_warps", "num_warps"))
        if self.gate_num_stages < 1:
            raise ValueError(f"gate_num_stages={self.gate_num_stages} must be >= 1")

    def shrink(self, num_adapters: int) -> tuple[int, int]:
        """route_shrink's (block_in, shrink_num_warps): as set, else from N by SHRINK_BY_ADAPTERS."""
        block_in, warps = next((v for most, v in SHRINK_BY_ADAPTERS if num_adapters <= most), SHRINK_MANY_ADAPTERS)
        return (block_in if self.block_in is None else self.block_in,
                warps if self.shrink_num_warps is None else self.shrink_num_warps)

    def gate_step(self, num_adapters: int, gate_dtype) -> tuple[int, int]:
        """(gate_block_adapters, gate_step_rows), each as set or else from N and the gate's dtype by
        GATE_TILE_FEW_ADAPTERS and GATE_TILE_MANY_ADAPTERS."""
        most, tile = GATE_TILE_FEW_ADAPTERS
        if num_adapters > most:
            tile = GATE_TILE_MANY_ADAPTERS["bfloat16" if gate_dtype == jnp.bfloat16 else "float32"]
        columns, step_rows = tile
        return (columns if self.gate_block_adapters is None else self.gate_block_adapters,
                step_rows if self.gate_step_rows is None else self.gate_step_rows)

    def gate_rows(self, in_features: int, num_adapters: int) -> int:
        """gate_block_in, or by default the rows that GATE_ROWS_BY_ADAPTERS gives for N (at most the
        input features, rounded up to a power of two), doubled up to MAX_GATE_ROWS while that leaves more
        than MAX_GATE_SPLITS shares per token."""
        if self.gate_block_in is not None:
            return self.gate_block_in
        rows = next((r for most, r in GATE_ROWS_BY_ADAPTERS if num_adapters <= most), GATE_ROWS_MANY_ADAPTERS)
        rows = min(rows, max(pl.next_power_of_2(in_features), 16))
        while pl.cdiv(in_features, rows) > MAX_GATE_SPLITS and rows < MAX_GATE_ROWS:
            rows *= 2
        return rows


def _bf16_parts(v):
    """v as bfloat16 terms that sum to it: itself if bfloat16, else three parts of 8 mantissa bits each."""
    if v.dtype == jnp.bfloat16:
        return [v]
    parts, rest = [], v.astype(jnp.float32)
    for _ in range(3):
        parts.append(rest.astype(jnp.bfloat16))
        rest = rest - parts[-1].astype(jnp.float32)
    return parts


def _gate_kernel(x_ref, gate_ref, shares_ref, *, tokens, in_features, num_adapters, gate_rows, gate_columns,
                 step_rows):
    split, chunk = pl.program_id(0), pl.program_id(1)
    token_rows = jnp.arange(max(pl.next_power_of_2(tokens), 16))  # dot operands need >= 16 rows
    first = chunk * gate_columns
    cols = first + jnp.arange(gate_columns)

    # The program's rows in steps, so that a large tile does not sit in registers at once (one 512 x 32
    # float32 tile spilled at two warps: 180 us); Triton's pipeliner keeps gate_num_stages steps' loads in
    # flight, without which each step waited on memory (bench/NOTES.md).
    def step(i, share):
        start = split * gate_rows + i * step_rows
        rows = start + jnp.arange(step_rows)
        x = plt.load(x_ref.at[pl.ds(0, token_rows.shape[0]), pl.ds(start, step_rows)],
                     mask=(token_rows[:, None] < tokens) & (rows[None, :] < in_features), other=0)
        gate = plt.load(gate_ref.at[pl.ds(start, step_rows), pl.ds(first, gate_columns)],
                        mask=(rows[:, None] < in_features) & (cols[None, :] < num_adapters), other=0)
        # Float32 products from bfloat16 tensor-core dots of the parts, dropping the terms below float32
        # rounding; float32 Triton dots (FMA code, or three TF32 passes) were 20-70x slower here.
        for x_order, x_part in enumerate(_bf16_parts(x)):
            for gate_order, gate_part in enumerate(_bf16_parts(gate)):
                if x_order + gate_order < 3:
                    share += jnp.dot(x_part, gate_part, preferred_element_type=jnp.float32)
        return share

    share = jnp.zeros((token_rows.shape[0], gate_columns), jnp.float32)
    share = jax.lax.fori_loop(0, gate_rows // step_rows, step, share)
    plt.store(shares_ref.at[split, pl.ds(0, token_rows.shape[0]), pl.ds(first, gate_columns)], share,
              mask=(token_rows[:, None] < tokens) & (cols[None, :] < num_adapters))


def _route(shares_ref, m, *, top_k, temperature, num_adapters):
    """Token m's logits (the sum of its gate shares), top-k adapters and softmax(values / T) weights."""
    lanes = jnp.arange(pl.next_power_of_2(num_adapters))
    logits = functools.reduce(jnp.add, [
        plt.load(shares_ref.at[jnp.int32(g), m, pl.ds(0, lanes.shape[0])], mask=lanes < num_adapters, other=0)
        for g in range(shares_ref.shape[0])
    ])
    chosen, weights = top_k_rounds(jnp.where(lanes < num_adapters, logits, -jnp.inf), lanes, top_k, temperature)
    return logits, chosen, weights


def _shrink_block(x_ref, a_ref, m, start, chosen, *, in_features, rank, rank_block, block_in):
    """Token m's x[start : start + block_in] @ A_j[start : start + block_in] for each chosen adapter j."""
    rows = start + jnp.arange(block_in)
    ranks = jnp.arange(rank_block)
    x = plt.load(x_ref.at[m, pl.ds(start, block_in)], mask=rows < in_features, other=0).astype(jnp.float32)
    mask = (rows[:, None] < in_features) & (ranks[None, :] < rank)
    return tuple(
        jnp.sum(x[:, None] * plt.load(a_ref.at[adapter, pl.ds(start, block_in), pl.ds(0, rank_block)], mask=mask,
                                      other=0).astype(jnp.float32), axis=0)
        for adapter in chosen
    )


def _expand_add_tile(b_ref, y_ref, out_ref, m, start, chosen, scaled_hs, *, out_features, rank, block_out):
    """out[m, tile] = y[m, tile] + sum_j scaled_h_j @ B_j[:, tile]."""
    cols = start + jnp.arange(block_out)
    ranks = jnp.arange(scaled_hs[0].shape[0])
    mask = (ranks[:, None] < rank) & (cols[None, :] < out_features)
    acc = jnp.zeros((block_out,), jnp.float32)
    for adapter, h in zip(chosen, scaled_hs):
        b = plt.load(b_ref.at[adapter, pl.ds(0, ranks.shape[0]), pl.ds(start, block_out)], mask=mask, other=0)
        acc += jnp.sum(h[:, None] * b.astype(jnp.float32), axis=0)
    y = plt.load(y_ref.at[m, pl.ds(start, block_out)], mask=cols < out_features, other=0)
    plt.store(out_ref.at[m, pl.ds(start, block_out)], (y.astype(jnp.float32) + acc).astype(out_ref.dtype),
              mask=cols < out_features)


def _route_shrink_kernel(shares_ref, scaling_ref, x_ref, a_ref, logits_ref, idx_ref, weight_ref, coef_ref, h_ref, *,
                         top_k, temperature, num_adapters, in_features, rank, block_in):
    m, split = pl.program_id(0), pl.program_id(1)
    logits, chosen, weights = _route(shares_ref, m, top_k=top_k, temperature=temperature, num_adapters=num_adapters)
    rank_block = h_ref.shape[-1]
    hs = _shrink_block(x_ref, a_ref, m, split * block_in, chosen, in_features=in_features, rank=rank,
                       rank_block=rank_block, block_in=block_in)
    for j, h in enumerate(hs):
        plt.store(h_ref.at[m, split, jnp.int32(j), pl.ds(0, rank_block)], h)

    @pl.when(split == 0)
    def _():
        plt.store(logits_ref.at[m, pl.ds(0, logits.shape[0])], logits, mask=jnp.arange(logits.shape[0]) < num_adapters)
        for j, (adapter, weight) in enumerate(zip(chosen, weights)):
            slot = jnp.int32(j)  # interpret mode stores only through array indices
            idx_ref[m, slot] = adapter
            weight_ref[m, slot] = weight
            coef_ref[m, slot] = weight * scaling_ref[adapter]


def _expand_add_kernel(idx_ref, coef_ref, h_ref, b_ref, y_ref, out_ref, *, top_k, out_features, rank,
                       blocks: DecodeBlockSizes):
    m = pl.program_id(0)
    splits, rank_block = h_ref.shape[1], h_ref.shape[-1]
    split_lanes = jnp.arange(pl.next_power_of_2(splits))
    chosen, scaled_hs = [], []
    for j in range(top_k):
        slot = jnp.int32(j)
        partial = plt.load(h_ref.at[m, pl.ds(0, split_lanes.shape[0]), slot, pl.ds(0, rank_block)],
                           mask=split_lanes[:, None] < splits, other=0)
        chosen.append(idx_ref[m, slot])
        scaled_hs.append(jnp.sum(partial, axis=0) * coef_ref[m, slot])
    _expand_add_tile(b_ref, y_ref, out_ref, m, pl.program_id(1) * blocks.block_out, chosen, scaled_hs,
                     out_features=out_features, rank=rank, block_out=blocks.block_out)


def _kernels(x, gate, y, lora_a, lora_b, scaling, top_k, temperature, blocks, interpret):
    tokens, in_features = x.shape
    num_adapters, _, rank = lora_a.shape
    out_features = lora_b.shape[-1]
    gate_rows = blocks.gate_rows(in_features, num_adapters)
    gate_columns, step_rows = blocks.gate_step(num_adapters, gate.dtype)
    gate_splits = pl.cdiv(in_features, gate_rows)
    shares = pl.pallas_call(
        functools.partial(_gate_kernel, tokens=tokens, in_features=in_features, num_adapters=num_adapters,
                          gate_rows=gate_rows, gate_columns=gate_columns, step_rows=min(step_rows, gate_rows)),
        out_shape=jax.ShapeDtypeStruct((gate_splits, tokens, num_adapters), jnp.float32),
        grid=(gate_splits, pl.cdiv(num_adapters, gate_columns)),
        compiler_params=plt.CompilerParams(num_warps=blocks.gate_num_warps, num_stages=blocks.gate_num_stages),
        interpret=interpret,
        name="meteora_decode_gate",
    )(x, gate)
    block_in, shrink_warps = blocks.shrink(num_adapters)
    splits = pl.cdiv(in_features, block_in)
    per_slot = jax.ShapeDtypeStruct((tokens, top_k), jnp.float32)
    logits, indices, weights, coef, h = pl.pallas_call(
        functools.partial(_route_shrink_kernel, top_k=top_k, temperature=temperature, num_adapters=num_adapters,
                          in_features=in_features, rank=rank, block_in=block_in),
        out_shape=(
            jax.ShapeDtypeStruct((tokens, num_adapters), jnp.float32),
            jax.ShapeDtypeStruct((tokens, top_k), jnp.int32), per_slot, per_slot,
            # Each program's partial x A over its block of input features; expand_add sums them.
            jax.ShapeDtypeStruct((tokens, splits, top_k, max(pl.next_power_of_2(rank), 16)), jnp.float32),
        ),
        grid=(tokens, splits),
        compiler_params=plt.CompilerParams(num_warps=shrink_warps, num_stages=2),
        interpret=interpret,
        name="meteora_decode_route_shrink",
    )(shares, scaling, x, lora_a)
    y_out = pl.pallas_call(
        functools.partial(_expand_add_kernel, top_k=top_k, out_features=out_features, rank=rank, blocks=blocks),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(tokens, pl.cdiv(out_features, blocks.block_out)),
        input_output_aliases={4: 0},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="meteora_decode_expand_add",
    )(indices, coef, h, lora_b, y)
    return y_out, logits, indices, weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _decode_layer(x, gate, y, lora_a, lora_b, scaling, top_k, temperature, blocks, interpret):
    return _kernels(x, gate, y, lora_a, lora_b, scaling, top_k, temperature, blocks, interpret)


def _forward(x, gate, y, lora_a, lora_b, scaling, top_k, temperature, blocks, interpret):
    out = _kernels(x, gate, y, lora_a, lora_b, scaling, top_k, temperature, blocks, interpret)
    return out, (x, gate, y, lora_a, lora_b, scaling)


def _backward(top_k, temperature, blocks, interpret, residuals, cotangents):
    # Few-token calls are inference; a gradient through them (rare) goes through the reference's VJP,
    # which routes on its own float32 logits: at an exact near-tie it may follow the other adapter.
    del blocks, interpret
    g_y, g_logits, _, g_weights = cotangents

    def differentiable(*args):
        y_out, logits, _, weights = decode_layer_reference(*args, top_k=top_k, temperature=temperature)
        return y_out, logits, weights

    _, vjp = jax.vjp(differentiable, *residuals)
    return vjp((g_y, g_logits, g_weights))


_decode_layer.defvjp(_forward, _backward)


@functools.partial(jax.jit, static_argnames=("top_k", "temperature", "blocks", "interpret"))
def decode_layer(x, gate, y, lora_a, lora_b, scaling, *, top_k: int, temperature: float,
                 blocks: DecodeBlockSizes = DecodeBlockSizes(), interpret: bool = False):
    """(y + MeteoRA delta [M, O] in y's dtype, gate logits [M, N] float32, indices [M, K] int32,
    weights [M, K] float32).

    x [M, I] (the layer input), gate [I, N] (float32, or bfloat16 for inference: half the bytes to read, logits
    of the bfloat16 product), y [M, O] the base output, lora_a [N, I, R] and lora_b [N, R, O] in x's dtype,
    scaling [N].
    """
    blocks.check()
    _check_shapes(x, gate, y, lora_a, lora_b, scaling, top_k)
    return _decode_layer(x, gate_operand(gate), y, lora_a, lora_b, scaling.astype(jnp.float32), top_k,
                         float(temperature), blocks, interpret)


def decode_layer_reference(x, gate, y, lora_a, lora_b, scaling, *, top_k: int, temperature: float):
    """Plain-JAX form of `decode_layer`, in float32."""
    logits = jnp.dot(x.astype(jnp.float32), gate.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    indices, weights = route(logits, top_k, temperature)
    coef = weights * scaling.astype(jnp.float32)[indices]
    delta = lora_gather_reference(x.astype(jnp.float32), lora_a, lora_b, indices, coef)
    return (y.astype(jnp.float32) + delta).astype(y.dtype), logits, indices, weights


def _check_shapes(x, gate, y, lora_a, lora_b, scaling, top_k):
    tokens, in_features = x.shape
    num_adapters, a_in, rank = lora_a.shape
    out_features = lora_b.shape[-1]
    expected = {
        "gate": (gate.shape, (in_features, num_adapters)),
        "y": (y.shape, (tokens, out_features)),
        "lora_a": (lora_a.shape, (num_adapters, in_features, rank)),
        "lora_b": (lora_b.shape, (num_adapters, rank, out_features)),
        "scaling": (scaling.shape, (num_adapters,)),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"{name} has shape {got}; expected {want} for x {x.shape} and lora_a {lora_a.shape}")
    if not 1 <= top_k <= num_adapters:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of adapters ({num_adapters})")
    limits = {"tokens": (tokens, MAX_TOKENS), "adapters": (num_adapters, MAX_ADAPTERS), "rank": (rank, MAX_RANK)}
    for name, (value, limit) in limits.items():
        if value > limit:
            raise ValueError(f"{name}={value} is over the decode kernels' limit of {limit}")
    if tokens == 0:
        raise ValueError("x has no tokens; the decode kernels need at least one")
