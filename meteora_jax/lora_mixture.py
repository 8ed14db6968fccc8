"""The MeteoRA mixture of LoRA adapters as pure functions: top-k routing and the ways to apply it.

Every strategy computes, for each token m,
    delta[m] = sum_j  w[m, j] * scaling[idx[m, j]] * (x[m] @ A[idx[m, j]]) @ B[idx[m, j]]
Axis letters: M tokens, I input features, O output features, N adapters, R rank, K chosen slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from meteora_jax.gate_logits import (
    compute_gate_logits,
    gate_columns,
    gate_input_splits,
    gate_logit_shares,
    gate_operand,
    gate_parts,
    summed_shares,
)

STRATEGIES = ("loop", "bmm", "dense", "grouped", "pallas", "fused", "auto")
# `fused` computes the base linear too (meteora_jax/pallas/fused_linear.py), so it needs the base weight.
MIXTURE_STRATEGIES = tuple(s for s in STRATEGIES if s != "fused")

# N * r up to which `dense` (every adapter's x @ A in one matmul) is the fastest XLA form; above it
# the per-token gather (`bmm`) wins. Measured on an H100 (bench/NOTES.md): dense and bmm tie at
# N * r = 512, and at N * r = 8192 bmm is 1.8-2x faster. `grouped` never wins while XLA lowers
# ragged_dot to a dense dot.
DENSE_MAX_TOTAL_RANK = 512
# Up to this k the routing uses k argmax rounds instead of lax.top_k.
ARGMAX_TOP_K = 4
# Up to this many tokens `pallas` runs the whole routed layer in its decode kernels, for up to this many
# adapters and this rank (measured up to 1024 adapters; a program holds a token's N logits in one warp).
PALLAS_DECODE_MAX_TOKENS = 16
PALLAS_DECODE_MAX_ADAPTERS = 1024
PALLAS_MAX_RANK = 128
# From this many bfloat16 tokens `auto` takes the `pallas` prefill forms on a GPU (bench/NOTES.md, H100;
# every crossover was measured in bfloat16). For N r <= DENSE_MAX_TOTAL_RANK the dense expand kernel, as
# fast as `dense` from 4096 tokens (920 against 940 us at 16384, 4096 -> 4096) with 0.33x a LoRA's
# temporaries where `dense` holds 1.25x; below this, `dense`, which ties at 4096 tokens and compiles
# faster (train.gates' first step at 4096 tokens per call: 85 s against 145 s).
PALLAS_PREFILL_MIN_TOKENS = 8192
# `auto` never takes the grouped (SGMV) kernels: they beat bmm only where a random gate spreads every token
# over all adapters (N = 1024, 16384 tokens: 1.90 against 2.10 ms), and lost to it where tokens route in runs,
# as prompts do (1.82 against 1.59 ms; bench/NOTES.md).
# From this many bfloat16 tokens `auto` takes `fused` on a Hopper GPU in calls that are not differentiated (through
# its gradients a SmolLM2 gate step took 1.03x and a LoRA step 1.5x auto's time; bench/NOTES.md) where its routed GEMM's
# default tiles fit (inputs a multiple of FUSED_INPUT_MULTIPLE, outputs of FUSED_OUTPUT_MULTIPLE, rank up
# to FUSED_MAX_RANK; meteora_jax/pallas/routed_gemm.py): FUSED_TILE_TOKENS tokens per tile share its adapter slots.
FUSED_MIN_TOKENS = 4096
FUSED_INPUT_MULTIPLE, FUSED_OUTPUT_MULTIPLE, FUSED_MAX_RANK, FUSED_TILE_TOKENS = 64, 256, 64, 128
# Up to this many tokens the Pallas strategies' gate matmul is a Pallas kernel (meteora_jax/pallas/gate_shares.py):
# for XLA's, cuBLAS takes a workspace of up to 32 MiB, 4x a LoRA's temporaries at 1024 tokens and N = 1024, for
# 1 us less (bench/NOTES.md); from 4096 tokens a LoRA's own matmul takes such a workspace.
PALLAS_GATE_MAX_TOKENS = 2048


def route(gate_logits: jax.Array, top_k: int, temperature) -> tuple[jax.Array, jax.Array]:
    """Top-k adapter indices [M, K] and their softmax(logits / T) weights [M, K] in float32.

    Ties go to the lower adapter index (lax.top_k's order), so routing is deterministic.
    """
    n = gate_logits.shape[-1]
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of adapters ({n})")
    logits = gate_logits.astype(jnp.float32)
    if top_k > ARGMAX_TOP_K:
        values, indices = jax.lax.top_k(logits, top_k)
    else:
        values, indices = _top_k_by_argmax(logits, top_k)
    return indices, jax.nn.softmax(values / temperature, axis=-1)


def _top_k_by_argmax(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    # k rounds of max + argmax are plain reductions that XLA fuses with the gate matmul's consumers,
    # where lax.top_k is a separate sort-like kernel. argmax takes the first maximum: same ties as top_k.
    values, indices = [], []
    for _ in range(top_k):
        index = jnp.argmax(logits, axis=-1)
        values.append(jnp.max(logits, axis=-1))
        indices.append(index.astype(jnp.int32))
        logits = jnp.where(jax.nn.one_hot(index, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def coefficients(indices: jax.Array, weights: jax.Array, num_adapters: int) -> jax.Array:
    """Dense [M, N] mixing coefficients: each token's routing weight per adapter, zero if not chosen."""
    one_hot = jax.nn.one_hot(indices, num_adapters, dtype=weights.dtype)  # [M, K, N]
    return jnp.einsum("MK,MKN->MN", weights, one_hot)


def mixture_loop(x, lora_a, lora_b, scaling, indices, weights):
    """Reference: one adapter at a time, applied with its coefficient (zero for tokens that skipped it)."""
    coef = coefficients(indices, weights, lora_a.shape[0]) * scaling  # [M, N]

    def one_adapter(delta, adapter):
        a, b, c = adapter
        h = jnp.dot(x, a, preferred_element_type=jnp.float32)  # [M, R]
        return delta + jnp.dot(h * c[:, None], b.astype(jnp.float32)), None

    delta0 = jnp.zeros((x.shape[0], lora_b.shape[-1]), jnp.float32)
    delta, _ = jax.lax.scan(one_adapter, delta0, (lora_a, lora_b, coef.T))
    return delta


def mixture_bmm(x, lora_a, lora_b, scaling, indices, weights):
    """The paper's bmm form: gather each token's k adapters, then batched matmuls per token."""

    def one_token(x_m, idx_m, w_m):
        a = lora_a[idx_m]  # [K, I, R]
        b = lora_b[idx_m]  # [K, R, O]
        h = jnp.einsum("I,KIR->KR", x_m, a, preferred_element_type=jnp.float32)
        h = h * (w_m * scaling[idx_m])[:, None]
        return jnp.einsum("KR,KRO->O", h, b.astype(jnp.float32))

    return jax.vmap(one_token)(x, indices, weights)


def mixture_dense(x, lora_a, lora_b, scaling, indices, weights):
    """x @ A for all adapters in one matmul, scaled by the sparse coefficients, then one matmul with B."""
    h = jnp.einsum("MI,NIR->MNR", x, lora_a, preferred_element_type=jnp.float32)
    return _mix_all_adapters(h, lora_b, scaling, indices, weights, x.dtype)


def _mix_all_adapters(h, lora_b, scaling, indices, weights, dtype, out_dtype=jnp.float32):
    """dense's second half: every adapter's x A [M, N, R] scaled by its sparse coefficient, then @ B."""
    h = _scale_by_routing(h, scaling, indices, weights, dtype)
    return jnp.einsum("MNR,NRO->MO", h, lora_b, preferred_element_type=out_dtype)


def _scale_by_routing(h, scaling, indices, weights, dtype):
    """h [M, N, R] times each token's coefficient per adapter (zero where not chosen), in `dtype`."""
    coef = coefficients(indices, weights, h.shape[1]) * scaling  # [M, N]
    return (h * coef[:, :, None]).astype(dtype)


def mixture_grouped(x, lora_a, lora_b, scaling, indices, weights):
    """(token, slot) pairs sorted by adapter, then two grouped matmuls (lax.ragged_dot)."""
    m, k = indices.shape
    n = lora_a.shape[0]
    flat_adapter = indices.reshape(-1)
    order = jnp.argsort(flat_adapter, stable=True)
    token_of_pair = order // k
    sorted_adapter = flat_adapter[order]
    group_sizes = jnp.bincount(flat_adapter, length=n).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[token_of_pair], lora_a, group_sizes, preferred_element_type=jnp.float32)
    h = h * (weights.reshape(-1)[order] * scaling[sorted_adapter])[:, None]
    out = jax.lax.ragged_dot(h.astype(x.dtype), lora_b, group_sizes, preferred_element_type=jnp.float32)
    return jax.ops.segment_sum(out, token_of_pair, num_segments=m)


def dense_with_gate(x, gate, lora_a, lora_b, scaling, top_k: int, temperature, out_dtype=jnp.float32):
    """The whole `dense` layer delta with the gate matmul folded into x @ A, so x is read once.

    Returns (delta [M, O] in out_dtype, gate logits [M, N] float32, indices [M, K]). For bfloat16 x
    (see `_fold_gate_into_shrink`).
    """
    routed, logits, indices = _routed_shrink(x, gate, lora_a, scaling, top_k, temperature)
    return jnp.einsum("MNR,NRO->MO", routed, lora_b, preferred_element_type=out_dtype), logits, indices


def _routed_shrink(x, gate, lora_a, scaling, top_k: int, temperature):
    """The gate logits [M, N], the routing indices [M, K], and every adapter's x A [M, N, R] scaled by its
    sparse coefficient, in x's dtype; for bfloat16 x the gate rides in the x A matmul."""
    if x.dtype == jnp.bfloat16:
        h, logits = _fold_gate_into_shrink(x, gate_operand(gate), lora_a.astype(x.dtype))
    else:
        logits = compute_gate_logits(x, gate)
        h = jnp.einsum("MI,NIR->MNR", x, lora_a.astype(x.dtype), preferred_element_type=jnp.float32)
    indices, weights = route(logits, top_k, temperature)
    return _scale_by_routing(h, scaling.astype(jnp.float32), indices, weights, x.dtype), logits, indices


@jax.custom_vjp
def _fold_gate_into_shrink(x, gate, lora_a):
    """(every adapter's x A [M, N, R], gate logits [M, N]), both float32, from one bfloat16 matmul of x with
    [A | gate_hi | gate_lo] (`gate_logits.gate_parts`) with float32 accumulation; a bfloat16 gate rides whole, as
    [A | gate]. Gradients are float32 products (without the custom VJP the gate's would be rounded to
    bfloat16)."""
    m, i = x.shape
    n, _, r = lora_a.shape
    parts = gate_parts(gate)
    weights = jnp.concatenate([jnp.swapaxes(lora_a, 0, 1).reshape(i, n * r), *parts], axis=1)
    both = jnp.dot(x, weights, preferred_element_type=jnp.float32)  # [M, N*R + parts*N]
    logits = functools.reduce(jnp.add, [both[:, n * r + p * n : n * r + (p + 1) * n] for p in range(len(parts))])
    return both[:, : n * r].reshape(m, n, r), logits


def _fold_forward(x, gate, lora_a):
    return _fold_gate_into_shrink(x, gate, lora_a), (x, gate, lora_a)


def _fold_backward(residuals, cotangents):
    x, gate, lora_a = residuals
    dh, dlogits = cotangents
    x32 = x.astype(jnp.float32)
    dx = jnp.einsum("MNR,NIR->MI", dh, lora_a.astype(jnp.float32)) + jnp.dot(dlogits, gate.T.astype(jnp.float32))
    da = jnp.einsum("MI,MNR->NIR", x32, dh)
    return dx.astype(x.dtype), jnp.dot(x32.T, dlogits).astype(gate.dtype), da.astype(lora_a.dtype)


_fold_gate_into_shrink.defvjp(_fold_forward, _fold_backward)


def gated_output(x, y, gate, lora_a, lora_b, scaling, top_k: int, temperature, strategy: str, base_kernel=None):
    """The layer with its own gate routing: (y + delta in y's dtype, gate logits [M, N] float32, indices [M, K]).

    x [M, I], y [M, O] the base output, base_kernel [I, O] the weight that made it (needed by `fused`, which
    recomputes y with the delta in its GEMM's epilogue; XLA then drops the unused y). Each strategy takes its
    fastest whole-layer form: bf16 `dense` folds the gate into x @ A; `pallas` on few tokens runs gate, routing
    and mixture in its decode kernels, on more tokens adds into y in place: with the dense expand kernel while
    N r <= DENSE_MAX_TOTAL_RANK, else with the grouped (SGMV) kernels.
    """
    if x.shape[0] == 0:
        return y, jnp.zeros((0, lora_a.shape[0]), jnp.float32), jnp.zeros((0, top_k), jnp.int32)
    if strategy == "auto":
        strategy = pick_strategy(lora_a.shape[0], lora_a.shape[-1], x.shape[0], x.dtype)
    if strategy == "dense" and x.dtype == jnp.bfloat16:
        # The delta in y's dtype straight from the matmul: y + delta then becomes the matmul's epilogue
        # (cuBLAS's C operand) instead of a separate pass over [M, O] (bench/NOTES.md).
        delta, logits, indices = dense_with_gate(x, gate, lora_a, lora_b, scaling, top_k, temperature, y.dtype)
        return y + delta, logits, indices
    if strategy == "pallas" and _fits_decode_kernels(x.shape[0], lora_a.shape[0], lora_a.shape[-1]):
        from meteora_jax.pallas.decode_layer import decode_layer  # Pallas imports stay off the default path

        y, logits, indices, _ = decode_layer(x, gate, y, lora_a, lora_b, scaling, top_k=top_k,
                                             temperature=temperature, interpret=jax.default_backend() != "gpu")
        return y, logits, indices
    if strategy == "pallas" and lora_a.shape[0] * lora_a.shape[-1] <= DENSE_MAX_TOTAL_RANK:
        return _pallas_dense_expand(x, y, gate, lora_a, lora_b, scaling, top_k, temperature)
    logits, indices, weights = _gate_and_route(strategy, x, gate, top_k, temperature)
    if strategy == "fused":
        return fused_output(x, base_kernel, lora_a, lora_b, scaling, indices, weights), logits, indices
    if strategy == "pallas":
        from meteora_jax.pallas.mixture import mixture_pallas_add  # Pallas imports stay off the default path

        return mixture_pallas_add(x, lora_a, lora_b, scaling, indices, weights, y), logits, indices
    delta = lora_mixture(x, lora_a, lora_b, scaling, indices, weights, strategy)
    return y + delta.astype(y.dtype), logits, indices


def _gate_and_route(strategy: str, x, gate, top_k: int, temperature):
    """(logits, indices, weights). The Pallas strategies route by one kernel reading the logits once
    (meteora_jax/pallas/route_tokens.py) as shares of the gate matmul, which it adds (gate_logits.py), up to
    PALLAS_GATE_MAX_TOKENS tokens from the Pallas gate kernel; the XLA ones, and a temperature given as an array
    (the kernel compiles it in), by `route`."""
    if strategy not in ("fused", "pallas") or top_k > ARGMAX_TOP_K or isinstance(temperature, jax.Array):
        logits = compute_gate_logits(x, gate)
        return (logits, *route(logits, top_k, temperature))
    from meteora_jax.pallas.gate_shares import (  # Pallas imports stay off the default path
        GateSharesBlockSizes,
        gate_shares_matmul,
        input_split_count,
    )
    from meteora_jax.pallas.route_tokens import route_tokens

    interpret = jax.default_backend() != "gpu"
    m, i = x.shape
    blocks = GateSharesBlockSizes()
    if x.dtype == jnp.bfloat16 and m <= PALLAS_GATE_MAX_TOKENS and i % blocks.block_in == 0:
        splits = input_split_count(m, gate_columns(gate), i, blocks)
        matmul = functools.partial(gate_shares_matmul, blocks=blocks, interpret=interpret)
    else:
        splits, matmul = gate_input_splits(m, gate_columns(gate), i), None
    shares = gate_logit_shares(x, gate, splits, matmul)
    indices, weights = route_tokens(shares, top_k, temperature, interpret=interpret)
    return summed_shares(shares), indices, weights


def fused_output(x, base_kernel, lora_a, lora_b, scaling, indices, weights):
    """x @ base_kernel plus the mixture, in x's dtype, by the `fused` strategy's GEMM (bfloat16 only)."""
    if base_kernel is None:
        raise ValueError("strategy 'fused' computes the base linear too: it needs the base weight (base_kernel)")
    from meteora_jax.pallas.fused_linear import fused_linear  # Pallas imports stay off the default path

    return fused_linear(x, base_kernel, lora_a, lora_b, scaling, indices, weights)


def _pallas_dense_expand(x, y, gate, lora_a, lora_b, scaling, top_k: int, temperature):
    """`pallas` prefill while N r is small: x A for every adapter (with the gate folded in for bfloat16 x), then
    the routed product added into y in place by meteora_jax/pallas/dense_expand.py."""
    from meteora_jax.pallas.dense_expand import dense_expand_add  # Pallas imports stay off the default path

    m = x.shape[0]
    n, _, r = lora_a.shape
    routed, logits, indices = _routed_shrink(x, gate, lora_a, scaling, top_k, temperature)
    y = dense_expand_add(routed.reshape(m, n * r), lora_b.astype(x.dtype).reshape(n * r, -1), y,
                         interpret=jax.default_backend() != "gpu")
    return y, logits, indices


def _fits_decode_kernels(tokens: int, num_adapters: int, rank: int) -> bool:
    fits = num_adapters <= PALLAS_DECODE_MAX_ADAPTERS and rank <= PALLAS_MAX_RANK
    return 0 < tokens <= PALLAS_DECODE_MAX_TOKENS and fits


def pick_strategy(num_adapters: int, rank: int, tokens: int | None = None, dtype=None,
                  fused_shape: tuple[int, int] | None = None) -> str:
    """The `auto` choice, from the crossovers measured on an H100 (bench/NOTES.md).

    Mixtures alone (`tokens` None, e.g. forced routing): dense while N * r <= DENSE_MAX_TOTAL_RANK,
    else bmm. The gated layer (`tokens` given) on a GPU: within the decode kernels' limits, the Pallas
    decode kernels, which took the least device time at 1 and 16 tokens for every N measured; on long
    prompts of bfloat16 tokens (`dtype`): from FUSED_MIN_TOKENS tokens `fused`, on a Hopper GPU where the caller
    can run it (`fused_shape`, the base weight's [in, out] features, given only in calls that are not
    differentiated) and its tiles fit (FUSED_INPUT_MULTIPLE, FUSED_OUTPUT_MULTIPLE, FUSED_MAX_RANK); else the
    Pallas dense expand where it won (PALLAS_PREFILL_MIN_TOKENS).
    """
    total_rank = num_adapters * rank
    if tokens is not None and jax.default_backend() == "gpu":
        if _fits_decode_kernels(tokens, num_adapters, rank):
            return "pallas"
        if dtype == jnp.bfloat16 and tokens >= FUSED_MIN_TOKENS and _fits_fused(fused_shape, rank):
            return "fused"
        dense_expand = tokens >= PALLAS_PREFILL_MIN_TOKENS and total_rank <= DENSE_MAX_TOTAL_RANK
        if dtype == jnp.bfloat16 and rank <= PALLAS_MAX_RANK and dense_expand:
            return "pallas"
    return "dense" if total_rank <= DENSE_MAX_TOTAL_RANK else "bmm"


def _fits_fused(fused_shape: tuple[int, int] | None, rank: int) -> bool:
    if fused_shape is None or not on_hopper():
        return False
    in_features, out_features = fused_shape
    return in_features % FUSED_INPUT_MULTIPLE == 0 and out_features % FUSED_OUTPUT_MULTIPLE == 0 and (
        rank <= FUSED_MAX_RANK)


def on_hopper() -> bool:
    """The routed GEMM is built from Hopper instructions (wgmma, TMA): compute capability 9.0 (H100, H200)."""
    return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def mixture_pallas(x, lora_a, lora_b, scaling, indices, weights):
    """The Pallas kernels (meteora_jax/pallas): reads only the chosen adapters; interpreted off GPU."""
    from meteora_jax.pallas.mixture import mixture_pallas as kernel  # Pallas imports stay off the default path

    return kernel(x, lora_a, lora_b, scaling, indices, weights)


_IMPLEMENTATIONS = {
    "loop": mixture_loop,
    "bmm": mixture_bmm,
    "dense": mixture_dense,
    "grouped": mixture_grouped,
    "pallas": mixture_pallas,
}


def lora_mixture(x, lora_a, lora_b, scaling, indices, weights, strategy: str = "auto") -> jax.Array:
    """delta [M, O] in float32 for tokens x [M, I]; see the module docstring for the formula."""
    if strategy == "fused":
        raise ValueError("strategy 'fused' computes the base linear too; use gated_output or MeteoraDense")
    if strategy not in MIXTURE_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {MIXTURE_STRATEGIES}")
    n, i, r = lora_a.shape
    if x.shape[-1] != i or lora_b.shape[:2] != (n, r) or scaling.shape != (n,):
        raise ValueError(
            f"shape mismatch: x {x.shape}, lora_a {lora_a.shape}, lora_b {lora_b.shape}, scaling {scaling.shape}"
        )
    if strategy == "auto":
        strategy = pick_strategy(n, r)
    return _IMPLEMENTATIONS[strategy](x, lora_a, lora_b, scaling.astype(jnp.float32), indices, weights)
