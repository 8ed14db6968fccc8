"""Forward time and temporary memory of one MeteoRA linear layer, against the base linear and one plain LoRA.

Every shape is bf16 with top-k 2 and rank 8: in -> out features, N adapters, T tokens. Variants:
    base                       x @ W
    lora                       x @ W + s * (x @ A) @ B, one rank-8 adapter
    loop, bmm, dense,          the full MeteoRA layer as MeteoraDense runs it (lora_mixture.gated_output):
    grouped, pallas            x @ W, the gate logits (float32; of the bfloat16 product for --gate-dtype
                               bfloat16), the top-k routing and the mixture
A variant's time is the median over samples; one sample is R calls dispatched back to back (rotating over
3 input sets) and waited on once, divided by R (the JSON's samples_ms are these, per program call). Cases
of <= 256 tokens run as one program of 32 layer calls, each with its own weights (as the layers of a
model's decode step: weights come from device memory, not L2) and each fed by the last, with no host
dispatch between them; their median_ms is divided down to one layer call, their samples_ms are not. For
every case the profiler's kernel time per call is recorded too: the device's busy time, without the
launch gaps between kernels that dominate the wall time of a few-token layer, and without the host's
dispatch jitter that puts outliers into the wall-time samples of large ones. Temporary memory is the
compiled executable's temp_size_in_bytes, which counts the workspace XLA gives cuBLAS GEMMs (up to 32 MiB on
Hopper; the largest is recorded as cublas_workspace_bytes). Variants whose compiled temporaries exceed 60 GB are
skipped; out-of-memory at run time is recorded as "oom".

Routing: the random gate spreads each token's two slots over random adapters (the worst case for the
grouped kernels). `--segment-tokens L` instead feeds cases of more than 256 tokens runs of L tokens that
each favour one random pair of adapters, as the tokens of one task in a prompt route alike. Each case
records its routing's spread: adapters used, the busiest adapter's share of the choices, and the share of
choices that miss the `fused` strategy's tile slots (its per-token remainder).

Usage (GPU, about 5 minutes):
    python bench/meteora_layer.py [--out FILE] [--segment-tokens L]
Usage (CPU test with tiny shapes):
    python bench/meteora_layer.py --smoke --out /tmp/ml.json

Results go to --out, else $OUT/meteora_layer.json when OUT is set, else bench/results/meteora_layer.json;
the JSON is rewritten after each group of shapes, so a run cut short keeps what it measured. The target
checks and the markdown table are printed last.
"""

from __future__ import annotations

import os

# The default pool (75% of the GPU) is too small for the 60 GB of temporaries this benchmark allows.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402

# The benchmark also runs from a plain checkout, where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profile_events import traced_kernel_events  # noqa: E402
from result_path import default_result_path  # noqa: E402

from meteora_jax.lora_mixture import gated_output, pick_strategy, route  # noqa: E402
from meteora_jax.training import fused_missed_share  # noqa: E402

TOP_K = 2
RANK = 8
LORA_SCALING = 2.0  # alpha / r with alpha = 16
TEMPERATURE = 1.0
INPUT_SETS = 3
# Few-token cases run this many layers, each with its own weights, inside one program (see `repeated`).
LAYERS_PER_PROGRAM = 32
MAX_REPEATED_TOKENS = 256
SEGMENT_PUSH = 6.0  # unit-normal x gives logits of spread ~1; the top of 1024 others sits near 3.2
STRATEGIES = ("loop", "bmm", "dense", "grouped", "pallas", "fused")
XLA_STRATEGIES = ("loop", "bmm", "dense", "grouped")
# Issue 4's kernel targets judge the faster of the Pallas strategies measured in a case (by kernel time).
KERNEL_STRATEGIES = ("pallas", "fused")
VARIANTS = ("base", "lora", *STRATEGIES)
TEMP_LIMIT_BYTES = 60 * 10**9
MIN_SAMPLES, MAX_SAMPLES = 5, 30
KERNEL_TIME_RUNS = 3
MAX_CALLS_PER_SAMPLE = 64
SLOW_CALL_S = 2.0  # calls slower than this get only SLOW_SAMPLES samples
SLOW_SAMPLES = 3
# Issue 3, best strategy against one LoRA: prefill time and temporaries, decode time.
# Issue 4, the Pallas kernels: temporaries against one LoRA at every T, speed against the best XLA
# strategy at N = 28, the best layer against the bare base linear at N >= 256 (T >= 4096), and decode
# time against one LoRA at the largest N.
TARGETS = {"prefill_time": 1.10, "prefill_temp": 1.2, "decode_time": 1.3, "kernel_temp": 1.2,
           "kernel_speed_vs_xla": 0.8, "many_adapters_vs_base": 1.3, "many_adapters_decode": 1.5}
START = time.perf_counter()


@dataclasses.dataclass(frozen=True)
class Case:
    in_features: int
    out_features: int
    adapters: int
    tokens: int

    @property
    def shape(self) -> str:
        return f"{self.in_features}->{self.out_features}"


@dataclasses.dataclass(frozen=True)
class Plan:
    cases: tuple[Case, ...]
    prefill: Case  # the prefill target point
    decode_adapters: int  # the decode target covers every case with this N and T <= decode_max_tokens
    decode_max_tokens: int
    many_adapters: int  # issue 4's prefill targets for many adapters cover N >= this
    decode_many_adapters: int  # ... and its decode target this N
    prefill_min_tokens: int  # ... and, for prefill, T >= this
    seconds_per_variant: float  # timing budget per variant, compile not counted
    sample_seconds: float  # batch enough back-to-back calls that one sample lasts about this long
    variants: tuple[str, ...] = VARIANTS
    segment_tokens: int | None = None  # routing in runs of this many tokens (see segment_inputs); None: random
    gate_dtype: str = "float32"  # the MeteoRA gates as held (meteora_checkpoint.cast_gates)


def grid(pairs: Sequence[tuple[int, int]], adapters: Sequence[int], tokens: Sequence[int]) -> list[Case]:
    return [Case(i, o, n, t) for (i, o), n, t in itertools.product(pairs, adapters, tokens)]


def full_plan() -> Plan:
    cases = grid([(4096, 4096), (4096, 14336)], [28], [1, 16, 256, 1024, 4096, 16384])
    cases += grid([(4096, 4096)], [64], [4096]) + grid([(4096, 4096)], [256, 1024], [1, 16, 1024, 4096, 16384])
    return Plan(tuple(cases), prefill=Case(4096, 4096, 28, 16384), decode_adapters=28, decode_max_tokens=16,
                many_adapters=256, decode_many_adapters=1024, prefill_min_tokens=4096,
                seconds_per_variant=0.5, sample_seconds=2e-3)


def smoke_plan() -> Plan:
    cases = grid([(64, 96), (64, 160)], [4], [1, 16, 64]) + grid([(64, 96)], [8], [1, 64, 128])
    return Plan(tuple(cases), prefill=Case(64, 96, 4, 64), decode_adapters=4, decode_max_tokens=16,
                many_adapters=8, decode_many_adapters=8, prefill_min_tokens=64,
                seconds_per_variant=0.05, sample_seconds=1e-3)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and short timing, for a CPU test")
    parser.add_argument("--out", type=Path, help="JSON result file")
    parser.add_argument("--adapters", help="comma-separated N: measure only the cases with these adapter counts "
                        "(to split a run; the targets are checked on the cases measured)")
    parser.add_argument("--tokens", help="comma-separated T: measure only the cases with these token counts")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (base and lora always run)")
    parser.add_argument("--segment-tokens", type=int, help="route cases of > 256 tokens in runs of this many tokens, "
                        "each favouring one pair of adapters (default: a random gate's spread)")
    parser.add_argument("--gate-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the gates as held: float32 (as trained) or bfloat16 (inference, see "
                        "meteora_checkpoint.cast_gates)")
    return parser.parse_args(argv)


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "jax_backend": jax.default_backend(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "settings": {
            "dtype": "bfloat16", "top_k": TOP_K, "rank": RANK, "input_sets": INPUT_SETS,
            "temp_limit_bytes": TEMP_LIMIT_BYTES,
            "timing": "median over samples of (R back-to-back calls, one wait) / R",
        },
    }


# ---------------------------------------------------------------- layers and inputs


def base_layer(x, p):
    return x @ p["w"]


def lora_layer(x, p):
    """The delta in x's dtype straight from its matmul, so that XLA can fold `+` into that matmul's
    epilogue: the plain LoRA gets the same treatment as the MeteoRA `dense` layer."""
    h = jnp.dot(x, p["a"], preferred_element_type=jnp.float32) * LORA_SCALING
    return x @ p["w"] + jnp.dot(h.astype(x.dtype), p["b"])


def meteora_layer(strategy: str) -> Callable:
    """The layer as meteora_jax.meteora.MeteoraDense computes it, with the strategy fixed."""

    def layer(x, p):
        y, _, _ = gated_output(x, x @ p["w"], p["gate"], p["lora_a"], p["lora_b"], p["scaling"], TOP_K,
                               TEMPERATURE, strategy, base_kernel=p["w"])
        return y

    return layer


LAYERS = {"base": base_layer, "lora": lora_layer, **{s: meteora_layer(s) for s in STRATEGIES}}


def normal(key, shape, std: float, dtype=jnp.bfloat16) -> jax.Array:
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def make_params(case: Case, key, gate_dtype: str = "float32") -> dict[str, jax.Array]:
    """One input set's weights; the 1/sqrt(fan-in) scales keep every term of the output of order one."""
    i, o, n = case.in_features, case.out_features, case.adapters
    k = jax.random.split(key, 6)
    return {
        "w": normal(k[0], (i, o), i**-0.5),
        "a": normal(k[1], (i, RANK), i**-0.5),
        "b": normal(k[2], (RANK, o), RANK**-0.5),
        # Gate logits of unit spread per adapter: every adapter gets a share of the tokens.
        "gate": normal(k[3], (i, n), i**-0.5, jnp.dtype(gate_dtype)),
        "lora_a": normal(k[4], (n, i, RANK), i**-0.5),
        "lora_b": normal(k[5], (n, RANK, o), RANK**-0.5),
        "scaling": jnp.full((n,), LORA_SCALING, jnp.float32),
    }


def segment_inputs(key, tokens: int, gate: jax.Array, segment_tokens: int) -> jax.Array:
    """x [tokens, in] in runs of segment_tokens tokens, each run pushed along the sum of two random adapters'
    gate columns: their logits rise by ~SEGMENT_PUSH spreads of the others', so the run routes to that pair."""
    i, n = gate.shape
    segments = -(-tokens // segment_tokens)
    k_noise, k_pairs = jax.random.split(key)
    pairs = jnp.argsort(jax.random.uniform(k_pairs, (segments, n)), axis=1)[:, :2]
    direction = gate.T[pairs].sum(axis=1)  # [segments, in]; each gate column has norm ~1
    runs = jnp.repeat(direction, segment_tokens, axis=0)[:tokens]
    noise = jax.random.normal(k_noise, (tokens, i), jnp.float32)
    return (noise + SEGMENT_PUSH * runs).astype(jnp.bfloat16)


def routing_spread(x: jax.Array, params: dict[str, jax.Array]) -> dict[str, Any]:
    """How the (token, slot) pairs of one input set fall on the adapters, to show the gate spreads them."""
    n = params["gate"].shape[1]
    indices, _ = route(jnp.dot(x.astype(jnp.float32), params["gate"].astype(jnp.float32)), TOP_K, TEMPERATURE)
    counts = jnp.bincount(indices.reshape(-1), length=n)
    return {"adapters_used": int((counts > 0).sum()), "max_adapter_share": float(counts.max() / indices.size),
            "fused_missed_share": float(fused_missed_share(indices, n, RANK))}


# ---------------------------------------------------------------- measuring


def temp_bytes(compiled) -> int | None:
    analysis = getattr(compiled, "memory_analysis", lambda: None)()
    return getattr(analysis, "temp_size_in_bytes", None)


def largest_cublas_workspace(hlo_text: str) -> int:
    """Bytes of the largest workspace XLA gives a cuBLAS GEMM in this optimized HLO (0 if none): XLA appends an
    s8 buffer of up to 32 MiB on Hopper to each cuBLAS custom call's outputs, and it counts as temporaries.
    The largest, not the sum: the GEMMs run one after another, so their workspaces may share one buffer."""
    sizes = [int(size) for line in hlo_text.splitlines() if 'custom_call_target="__cublas' in line
             for size in re.findall(r"\bs8\[(\d+)\]", line.split("custom-call(")[0])]
    return max(sizes, default=0)


def is_oom(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def timed_sample(compiled, inputs: Sequence[tuple], calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls: the device runs them in order, so one wait suffices."""
    start = time.perf_counter()
    for c in range(calls):
        out = compiled(*inputs[c % len(inputs)])
    out.block_until_ready()
    return (time.perf_counter() - start) / calls


def time_compiled(compiled, inputs: Sequence[tuple], plan: Plan) -> dict[str, Any]:
    warmup = [timed_sample(compiled, [args], 1) for args in inputs]
    estimate = min(warmup)  # includes dispatch, so it overstates small calls: a safe bound for budgeting
    calls = min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(plan.sample_seconds / estimate)))
    if estimate > SLOW_CALL_S:
        samples = SLOW_SAMPLES
    else:
        samples = min(MAX_SAMPLES, max(MIN_SAMPLES, int(plan.seconds_per_variant / (estimate * calls))))
    times = [timed_sample(compiled, inputs, calls) for _ in range(samples)]
    return {
        "median_ms": statistics.median(times) * 1e3,
        "calls_per_sample": calls,
        "samples_ms": [round(t * 1e3, 5) for t in times],
    }


def repeated(layer: Callable) -> Callable:
    """One straight-line program of layer calls, one per weight set, each fed by the last (its output's
    first `in` features), as the layers of a model's decode step: no host dispatch (50-100 us per jitted
    call) hides a few-token layer's device time, and the weights stream from device memory rather than L2.
    The first bench run used a fori_loop over one weight set instead; its loop added a host round trip
    per iteration and kept the weights in L2 (bench/NOTES.md)."""

    def run(x, param_sets):
        in_features = x.shape[1]
        for p in param_sets:
            y = layer(x, p)
            if y.shape[1] < in_features:
                raise ValueError(f"chaining layers needs out >= in features, got {in_features}->{y.shape[1]}")
            x = y[:, :in_features]
        return x

    return run


def measure_variant(variant: str, inputs: Sequence[tuple], plan: Plan) -> dict[str, Any]:
    repeats = len(inputs[0][1]) if isinstance(inputs[0][1], tuple) else 1
    layer = repeated(LAYERS[variant]) if repeats > 1 else LAYERS[variant]
    try:
        start = time.perf_counter()
        compiled = jax.jit(layer).lower(*inputs[0]).compile()
        compile_s = round(time.perf_counter() - start, 2)
        result: dict[str, Any] = {"compile_s": compile_s, "temp_bytes": temp_bytes(compiled),
                                  "cublas_workspace_bytes": largest_cublas_workspace(compiled.as_text())}
        if result["temp_bytes"] is not None and result["temp_bytes"] > TEMP_LIMIT_BYTES:
            return {**result, "status": f"skipped: {result['temp_bytes'] / 1e9:.1f} GB of temporaries"}
        timing = time_compiled(compiled, inputs, plan)
        timing["median_ms"] /= repeats
        timing["kernel_ms"] = kernel_ms_per_call(compiled, inputs[0], repeats)
        return {**result, **timing, "repeats_in_program": repeats, "status": "ok"}
    except Exception as error:  # noqa: BLE001 -- one failing variant must not cost the rest of a GPU run
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        return {"status": "oom" if is_oom(error) else f"error: {first_line}", "error": first_line}
    finally:
        gc.collect()  # drop a failed run's buffers before the next variant allocates


def kernel_ms_per_call(compiled, args: tuple, calls: int) -> float | None:
    """The device's kernel time per layer call: the profiler's kernel durations of one program run,
    summed, over its calls; the median of KERNEL_TIME_RUNS runs. None where the trace has no GPU kernels."""
    total = traced_kernel_ms(compiled, args)
    return total / calls if total else None


def traced_kernel_ms(fn, args: tuple, kernels: str | tuple[str, ...] | None = None) -> float:
    """Device time of one fn(*args): the profiler's kernel durations (of the kernels named in `kernels` alone, if
    given) summed, in ms; the median of KERNEL_TIME_RUNS runs."""
    names = (kernels,) if isinstance(kernels, str) else kernels
    totals = []
    for _ in range(KERNEL_TIME_RUNS):
        events = traced_kernel_events(lambda: jax.block_until_ready(fn(*args)))
        totals.append(sum(duration for name, _, duration in events if names is None or name in names) / 1e6)
    return statistics.median(totals)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each variant's time against base, lora and the fastest XLA strategy of its case, and its
    temporaries against lora's."""
    by_variant = {row["variant"]: row for row in rows}
    base, lora = by_variant["base"], by_variant["lora"]
    xla_times = [by_variant[s]["median_ms"] for s in XLA_STRATEGIES if by_variant.get(s, {}).get("status") == "ok"]
    xla_kernel_times = [by_variant[s]["kernel_ms"] for s in XLA_STRATEGIES if by_variant.get(s, {}).get("kernel_ms")]
    for row in rows:
        row["time_vs_base"] = ratio(row.get("median_ms"), base.get("median_ms"))
        row["kernel_vs_base"] = ratio(row.get("kernel_ms"), base.get("kernel_ms"))
        row["time_vs_best_xla"] = ratio(row.get("median_ms"), min(xla_times, default=None))
        row["time_vs_lora"] = ratio(row.get("median_ms"), lora.get("median_ms"))
        row["temp_vs_lora"] = ratio(row.get("temp_bytes"), lora.get("temp_bytes"))
        row["kernel_vs_lora"] = ratio(row.get("kernel_ms"), lora.get("kernel_ms"))
        row["kernel_vs_best_xla"] = ratio(row.get("kernel_ms"), min(xla_kernel_times, default=None))


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure_group(cases: list[Case], plan: Plan, key) -> list[dict[str, Any]]:
    """Cases sharing in/out/N share their weights; only the tokens change. Few-token cases get a program of
    LAYERS_PER_PROGRAM layers (all weight sets) per input set, larger ones one layer call per input set."""
    few_tokens = any(case.tokens <= MAX_REPEATED_TOKENS for case in cases)
    param_keys = jax.random.split(key, LAYERS_PER_PROGRAM if few_tokens else INPUT_SETS)
    params = [make_params(cases[0], k, plan.gate_dtype) for k in param_keys]
    rows = []
    for case in cases:
        x_keys = jax.random.split(jax.random.fold_in(key, case.tokens), INPUT_SETS)
        if case.tokens <= MAX_REPEATED_TOKENS:
            xs = [normal(k, (case.tokens, case.in_features), 1.0) for k in x_keys]
            inputs = [(x, tuple(params)) for x in xs]
        else:
            if plan.segment_tokens:
                xs = [segment_inputs(k, case.tokens, p["gate"], plan.segment_tokens) for k, p in zip(x_keys, params)]
            else:
                xs = [normal(k, (case.tokens, case.in_features), 1.0) for k in x_keys]
            inputs = list(zip(xs, params))
        spread = routing_spread(xs[0], params[0])
        case_rows = []
        for variant in plan.variants:
            row = {**dataclasses.asdict(case), "variant": variant, **measure_variant(variant, inputs, plan)}
            log(f"{case.shape} N={case.adapters} T={case.tokens} {variant}: {row['status']}"
                + (f" {row['median_ms']:.4g} ms, temp {row['temp_bytes']}" if row["status"] == "ok" else ""))
            case_rows.append({**row, **spread})
        add_ratios(case_rows)
        rows += case_rows
        del xs, inputs
    return rows


# ---------------------------------------------------------------- report


def rows_of(rows: list[dict[str, Any]], case: Case) -> dict[str, dict[str, Any]]:
    """The variants measured for `case`, by name."""
    fields = dataclasses.asdict(case)
    return {r["variant"]: r for r in rows if all(r[f] == v for f, v in fields.items())}


def best_strategy(case_rows: dict[str, dict[str, Any]], key: str = "median_ms") -> dict[str, Any] | None:
    timed = [case_rows[s] for s in STRATEGIES if case_rows.get(s, {}).get(key) is not None]
    return min(timed, key=lambda r: r[key], default=None)


def target_checks(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    checks = []
    if plan.prefill in plan.cases:
        prefill_rows = rows_of(rows, plan.prefill)
        best, by_kernel_time = best_strategy(prefill_rows), best_strategy(prefill_rows, key="kernel_ms")
        name = f"prefill {plan.prefill.shape} N={plan.prefill.adapters} T={plan.prefill.tokens}"
        checks.append(check(f"{name} kernel time", by_kernel_time, "kernel_vs_lora", TARGETS["prefill_time"]))
        checks.append(check(f"{name} wall time", best, "time_vs_lora", TARGETS["prefill_time"]))
        checks.append(check(f"{name} temp of the fastest by wall time", best, "temp_vs_lora", TARGETS["prefill_temp"]))
        checks.append(check(f"{name} temp of the fastest by kernel time", by_kernel_time, "temp_vs_lora",
                            TARGETS["prefill_temp"]))
    for case in plan.cases:
        case_rows = rows_of(rows, case)
        best = best_strategy(case_rows)
        kernels = [case_rows[s] for s in KERNEL_STRATEGIES if case_rows.get(s, {}).get("status") == "ok"]
        key = "kernel_ms" if all(r.get("kernel_ms") for r in kernels) else "median_ms"
        kernel = min(kernels, key=lambda r: r[key], default=None)
        name = f"{case.shape} N={case.adapters} T={case.tokens}"
        decode = case.tokens <= plan.decode_max_tokens
        by_kernel_time = best_strategy(case_rows, key="kernel_ms")
        if case.adapters == plan.decode_adapters and decode:
            checks.append(check(f"decode {name} kernel time / lora", by_kernel_time, "kernel_vs_lora",
                                TARGETS["decode_time"]))
            checks.append(check(f"decode {name} wall time / lora", best, "time_vs_lora", TARGETS["decode_time"]))
        checks.append(check(f"kernel {name} temp / lora", kernel, "temp_vs_lora", TARGETS["kernel_temp"]))
        if case.adapters == plan.decode_adapters:
            measure = "kernel time" if (kernel or {}).get("kernel_ms") else "time"
            checks.append(check(f"kernel {name} {measure} / best XLA", kernel,
                                "kernel_vs_best_xla" if measure == "kernel time" else "time_vs_best_xla",
                                1 / TARGETS["kernel_speed_vs_xla"]))
        if case.adapters >= plan.many_adapters and case.tokens >= plan.prefill_min_tokens:
            checks.append(check(f"prefill {name} kernel time / base", by_kernel_time, "kernel_vs_base",
                                TARGETS["many_adapters_vs_base"]))
            checks.append(check(f"prefill {name} wall time / base", best, "time_vs_base",
                                TARGETS["many_adapters_vs_base"]))
        if case.adapters == plan.decode_many_adapters and decode:
            checks.append(check(f"decode {name} kernel time / lora", by_kernel_time, "kernel_vs_lora",
                                TARGETS["many_adapters_decode"]))
            checks.append(check(f"decode {name} wall time / lora", best, "time_vs_lora",
                                TARGETS["many_adapters_decode"]))
    return checks


def check(name: str, best: dict[str, Any] | None, field: str, limit: float) -> dict[str, Any]:
    value = best.get(field) if best else None
    return {"target": name, "strategy": best["variant"] if best else None, "ratio": value, "limit": limit,
            "holds": value is not None and value <= limit}


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "ok":
        return f"{row['median_ms']:.4g}"
    return row["status"].split(":")[0]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def markdown_table(rows: list[dict[str, Any]], plan: Plan) -> str:
    header = ["in->out", "N", "T", *(f"{v} ms" for v in plan.variants), "best", "auto picks (inference)", "best/lora",
              "temp best/lora"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in plan.cases:
        case_rows = rows_of(rows, case)
        best = best_strategy(case_rows)
        auto = pick_strategy(case.adapters, RANK, case.tokens, jnp.bfloat16, (case.in_features, case.out_features))
        if best:
            temps = f"{human_bytes(best['temp_bytes'])} / {human_bytes(case_rows['lora'].get('temp_bytes'))}"
            temp_cell = f"{fmt_ratio(best['temp_vs_lora'])} ({temps})"
            summary = [best["variant"], auto, fmt_ratio(best["time_vs_lora"]), temp_cell]
        else:
            summary = ["-", auto, "-", "-"]
        cells = [case.shape, str(case.adapters), str(case.tokens), *(cell(case_rows.get(v)) for v in plan.variants)]
        lines.append("| " + " | ".join(cells + summary) + " |")
    return "\n".join(lines)


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = smoke_plan() if args.smoke else full_plan()
    for field, wanted in (("adapters", args.adapters), ("tokens", args.tokens)):
        if wanted:
            values = {int(v) for v in wanted.split(",")}
            plan = dataclasses.replace(plan, cases=tuple(c for c in plan.cases if getattr(c, field) in values))
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - set(STRATEGIES)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {','.join(STRATEGIES)}")
        plan = dataclasses.replace(plan, variants=("base", "lora", *(v for v in STRATEGIES if v in wanted)))
    plan = dataclasses.replace(plan, segment_tokens=args.segment_tokens, gate_dtype=args.gate_dtype)
    out = args.out or default_result_path("meteora_layer.json")
    report: dict[str, Any] = {**environment(), "smoke": args.smoke, "segment_tokens": plan.segment_tokens,
                              "gate_dtype": plan.gate_dtype, "results": []}
    log(f"{report['device']} ({report['jax_backend']}), jax {jax.__version__}; {len(plan.cases)} shapes -> {out}")
    key = jax.random.key(0)
    groups = itertools.groupby(plan.cases, key=lambda c: (c.in_features, c.out_features, c.adapters))
    for g, (_, cases) in enumerate(groups):
        report["results"] += measure_group(list(cases), plan, jax.random.fold_in(key, g))
        write_json(out, report)
    report["targets"] = target_checks(report["results"], plan)
    report["total_s"] = round(time.perf_counter() - START, 1)
    write_json(out, report)
    log(f"wrote {out}")
    print()
    for c in report["targets"]:
        verdict = "holds" if c["holds"] else "MISSED"
        print(f"target {c['target']}: {c['strategy']} at {fmt_ratio(c['ratio'])} (limit {c['limit']:.2f}x): {verdict}")
    print()
    print(markdown_table(report["results"], plan), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
