"""Forward time and temporary memory of one MeteoRA linear layer, against the base linear and one plain LoRA.

Every shape is bf16 with top-k 2 and rank 8: in -> out features, N adapters, T tokens. Variants:
    base                       x @ W
    lora                       x @ W + s * (x @ A) @ B, one rank-8 adapter
    loop, bmm, dense, grouped  the full MeteoRA layer: x @ W + lora_mixture(...) with that strategy, the
                               float32 gate logits x @ Wg and the top-k routing included
A variant's time is the median over samples; one sample is R calls dispatched back to back (rotating over
3 input sets, so that small shapes are not served from L2) and waited on once, divided by R. That is the
device time of one call with host dispatch hidden, as it would be inside a jitted model; R is 1 for calls
long enough that dispatch does not matter. Temporary memory is the compiled executable's
temp_size_in_bytes. Variants whose compiled temporaries exceed 60 GB are skipped; out-of-memory at run
time is recorded as "oom".

Usage (GPU, about 5 minutes):
    python bench/meteora_layer.py [--out FILE]
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

from result_path import default_result_path  # noqa: E402

from meteora_jax.lora_mixture import dense_with_gate, lora_mixture, pick_strategy, route  # noqa: E402

TOP_K = 2
RANK = 8
LORA_SCALING = 2.0  # alpha / r with alpha = 16
TEMPERATURE = 1.0
INPUT_SETS = 3
# Few-token cases run this many layer calls inside one program (see `repeated`).
IN_PROGRAM_REPEATS = 50
MAX_REPEATED_TOKENS = 256
XLA_FORMS = ("loop", "bmm", "dense", "grouped", "pallas")
STRATEGIES = (*XLA_FORMS, "dense_fused")
VARIANTS = ("base", "lora", *STRATEGIES)
TEMP_LIMIT_BYTES = 60 * 10**9
MIN_SAMPLES, MAX_SAMPLES = 5, 30
MAX_CALLS_PER_SAMPLE = 64
SLOW_CALL_S = 2.0  # calls slower than this get only SLOW_SAMPLES samples
SLOW_SAMPLES = 3
TARGETS = {"prefill_time": 1.10, "prefill_temp": 1.2, "decode_time": 1.3}  # best strategy / lora
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
    seconds_per_variant: float  # timing budget per variant, compile not counted
    sample_seconds: float  # batch enough back-to-back calls that one sample lasts about this long


def grid(pairs: Sequence[tuple[int, int]], adapters: Sequence[int], tokens: Sequence[int]) -> list[Case]:
    return [Case(i, o, n, t) for (i, o), n, t in itertools.product(pairs, adapters, tokens)]


def full_plan() -> Plan:
    cases = grid([(4096, 4096), (4096, 14336)], [28], [1, 16, 256, 4096, 16384])
    cases += grid([(4096, 4096)], [64], [4096]) + grid([(4096, 4096)], [256, 1024], [4096, 16384])
    return Plan(tuple(cases), prefill=Case(4096, 4096, 28, 16384), decode_adapters=28, decode_max_tokens=16,
                seconds_per_variant=0.5, sample_seconds=2e-3)


def smoke_plan() -> Plan:
    cases = grid([(64, 96), (64, 160)], [4], [1, 16, 64]) + grid([(64, 96)], [8], [64, 128])
    return Plan(tuple(cases), prefill=Case(64, 96, 4, 64), decode_adapters=4, decode_max_tokens=16,
                seconds_per_variant=0.05, sample_seconds=1e-3)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and short timing, for a CPU test")
    parser.add_argument("--out", type=Path, help="JSON result file")
    return parser.parse_args(argv)


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "jax_backend": jax.default_backend(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__},
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
    h = jnp.dot(x, p["a"], preferred_element_type=jnp.float32) * LORA_SCALING
    delta = jnp.dot(h.astype(x.dtype), p["b"], preferred_element_type=jnp.float32)
    return x @ p["w"] + delta.astype(x.dtype)


def meteora_layer(strategy: str) -> Callable:
    """The layer as meteora_jax.meteora.MeteoraDense computes it, with the mixture strategy fixed."""

    def layer(x, p):
        gate_logits = jnp.dot(x.astype(jnp.float32), p["gate"])
        indices, weights = route(gate_logits, TOP_K, TEMPERATURE)
        delta = lora_mixture(x, p["lora_a"], p["lora_b"], p["scaling"], indices, weights, strategy)
        return x @ p["w"] + delta.astype(x.dtype)

    return layer


def dense_fused_layer(x, p):
    """dense with the gate matmul folded into x @ A (what MeteoraDense runs for bf16 `dense`)."""
    delta, _, _ = dense_with_gate(x, p["gate"], p["lora_a"], p["lora_b"], p["scaling"], TOP_K, TEMPERATURE)
    return x @ p["w"] + delta.astype(x.dtype)


LAYERS = {"base": base_layer, "lora": lora_layer, **{s: meteora_layer(s) for s in XLA_FORMS},
          "dense_fused": dense_fused_layer}


def normal(key, shape, std: float, dtype=jnp.bfloat16) -> jax.Array:
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def make_params(case: Case, key) -> dict[str, jax.Array]:
    """One input set's weights; the 1/sqrt(fan-in) scales keep every term of the output of order one."""
    i, o, n = case.in_features, case.out_features, case.adapters
    k = jax.random.split(key, 6)
    return {
        "w": normal(k[0], (i, o), i**-0.5),
        "a": normal(k[1], (i, RANK), i**-0.5),
        "b": normal(k[2], (RANK, o), RANK**-0.5),
        # Gate logits of unit spread per adapter: every adapter gets a share of the tokens.
        "gate": normal(k[3], (i, n), i**-0.5, jnp.float32),
        "lora_a": normal(k[4], (n, i, RANK), i**-0.5),
        "lora_b": normal(k[5], (n, RANK, o), RANK**-0.5),
        "scaling": jnp.full((n,), LORA_SCALING, jnp.float32),
    }


def routing_spread(x: jax.Array, params: dict[str, jax.Array]) -> dict[str, Any]:
    """How the (token, slot) pairs of one input set fall on the adapters, to show the gate spreads them."""
    indices, _ = route(jnp.dot(x.astype(jnp.float32), params["gate"]), TOP_K, TEMPERATURE)
    counts = jnp.bincount(indices.reshape(-1), length=params["gate"].shape[1])
    return {"adapters_used": int((counts > 0).sum()), "max_adapter_share": float(counts.max() / indices.size)}


# ---------------------------------------------------------------- measuring


def temp_bytes(compiled) -> int | None:
    analysis = getattr(compiled, "memory_analysis", lambda: None)()
    return getattr(analysis, "temp_size_in_bytes", None)


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


def repeated(layer: Callable, repeats: int) -> Callable:
    """`repeats` calls of the layer inside one program, each fed by the last, so that host dispatch
    (50-100 us per jitted call) does not hide a few-token layer's device time."""

    def run(x, p):
        def body(_, x):
            y = layer(x, p)
            return x + (y[:, :1] * 0).astype(x.dtype)  # a real dependency; XLA keeps float x * 0

        return jax.lax.fori_loop(0, repeats, body, x)

    return run


def measure_variant(variant: str, inputs: Sequence[tuple], plan: Plan) -> dict[str, Any]:
    tokens = inputs[0][0].shape[0]
    repeats = IN_PROGRAM_REPEATS if tokens <= MAX_REPEATED_TOKENS else 1
    layer = repeated(LAYERS[variant], repeats) if repeats > 1 else LAYERS[variant]
    try:
        start = time.perf_counter()
        compiled = jax.jit(layer).lower(*inputs[0]).compile()
        compile_s = round(time.perf_counter() - start, 2)
        result: dict[str, Any] = {"compile_s": compile_s, "temp_bytes": temp_bytes(compiled)}
        if result["temp_bytes"] is not None and result["temp_bytes"] > TEMP_LIMIT_BYTES:
            return {**result, "status": f"skipped: {result['temp_bytes'] / 1e9:.1f} GB of temporaries"}
        timing = time_compiled(compiled, inputs, plan)
        timing["median_ms"] /= repeats
        return {**result, **timing, "repeats_in_program": repeats, "status": "ok"}
    except Exception as error:  # noqa: BLE001 -- one failing variant must not cost the rest of a GPU run
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        return {"status": "oom" if is_oom(error) else f"error: {first_line}", "error": first_line}
    finally:
        gc.collect()  # drop a failed run's buffers before the next variant allocates


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each variant's time against base and lora of its case, and its temporaries against lora's."""
    by_variant = {row["variant"]: row for row in rows}
    base, lora = by_variant["base"], by_variant["lora"]
    for row in rows:
        row["time_vs_base"] = ratio(row.get("median_ms"), base.get("median_ms"))
        row["time_vs_lora"] = ratio(row.get("median_ms"), lora.get("median_ms"))
        row["temp_vs_lora"] = ratio(row.get("temp_bytes"), lora.get("temp_bytes"))


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure_group(cases: list[Case], plan: Plan, key) -> list[dict[str, Any]]:
    """Cases sharing in/out/N share their weights; only the tokens change."""
    param_keys = jax.random.split(key, INPUT_SETS)
    params = [make_params(cases[0], k) for k in param_keys]
    rows = []
    for case in cases:
        x_keys = jax.random.split(jax.random.fold_in(key, case.tokens), INPUT_SETS)
        xs = [normal(k, (case.tokens, case.in_features), 1.0) for k in x_keys]
        inputs = list(zip(xs, params))
        spread = routing_spread(xs[0], params[0])
        case_rows = []
        for variant in VARIANTS:
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


def best_strategy(case_rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    timed = [case_rows[s] for s in STRATEGIES if case_rows.get(s, {}).get("status") == "ok"]
    return min(timed, key=lambda r: r["median_ms"], default=None)


def target_checks(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    checks = []
    best = best_strategy(rows_of(rows, plan.prefill))
    name = f"prefill {plan.prefill.shape} N={plan.prefill.adapters} T={plan.prefill.tokens}"
    checks.append(check(f"{name} time", best, "time_vs_lora", TARGETS["prefill_time"]))
    checks.append(check(f"{name} temp", best, "temp_vs_lora", TARGETS["prefill_temp"]))
    for case in plan.cases:
        if case.adapters == plan.decode_adapters and case.tokens <= plan.decode_max_tokens:
            best = best_strategy(rows_of(rows, case))
            checks.append(check(f"decode {case.shape} N={case.adapters} T={case.tokens} time", best,
                                "time_vs_lora", TARGETS["decode_time"]))
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
    header = ["in->out", "N", "T", *(f"{v} ms" for v in VARIANTS), "best", "auto picks", "best/lora",
              "temp best/lora"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in plan.cases:
        case_rows = rows_of(rows, case)
        best = best_strategy(case_rows)
        auto = pick_strategy(case.adapters, RANK)
        if best:
            temps = f"{human_bytes(best['temp_bytes'])} / {human_bytes(case_rows['lora'].get('temp_bytes'))}"
            temp_cell = f"{fmt_ratio(best['temp_vs_lora'])} ({temps})"
            summary = [best["variant"], auto, fmt_ratio(best["time_vs_lora"]), temp_cell]
        else:
            summary = ["-", auto, "-", "-"]
        cells = [case.shape, str(case.adapters), str(case.tokens), *(cell(case_rows.get(v)) for v in VARIANTS)]
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
    out = args.out or default_result_path("meteora_layer.json")
    report: dict[str, Any] = {**environment(), "smoke": args.smoke, "results": []}
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
        print(f"target {c['target']}: best {c['strategy']} at {fmt_ratio(c['ratio'])} of lora "
              f"(limit {c['limit']:.2f}x): {verdict}")
    print()
    print(markdown_table(report["results"], plan), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
