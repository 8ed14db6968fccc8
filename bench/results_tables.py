"""Writes bench/RESULTS.md from the JSON files in bench/results/ (run after fetching new results).

Usage: python bench/results_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STRATEGIES = ("loop", "bmm", "dense", "grouped", "pallas", "fused", "dense_fused")


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def generate_section(runs: list[dict]) -> list[str]:
    v = runs[0]["versions"]
    lines = [
        "## Generation throughput (`generate_throughput.py`)\n",
        f"Date {runs[0]['date'][:10]}; {runs[0]['device']}; jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, "
        f"torch {v['torch']}, transformers {v['transformers']}, Python {v['python']}. Prompt 128 tokens, 64 greedy "
        f"new tokens, bf16. Copy bandwidth measured in the same run: {runs[0]['bandwidth']['bytes_per_s'] / 1e12:.2f} "
        "TB/s (read + write). Roofline = bandwidth / (weight bytes read per decode step + KV-cache bytes) x batch. "
        "Transformers runs `generate()` with its default (sdpa) attention and cache on the same weights.\n",
        "| model | weights | batch | impl | prefill ms | decode tok/s | roofline tok/s | fraction of roofline |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        for model in run["models"].values():
            weights = "real (GGUF Q4_1, dequantized)" if "checkpoint" in model["weights"] else model["weights"]
            for r in model["runs"]:
                lines.append(
                    f"| {model['model']} | {weights} | {r['batch']} | {r['impl']} | {r['prefill_ms']:.1f} | "
                    f"{r['decode_tok_s']:.1f} | {r['roofline_tok_s']:.0f} | {r['fraction_of_roofline']:.3f} |"
                )
    return lines + [""]


LAYER_METHODS = {
    "chained": "Cases of <= 256 tokens run as one program of 32 chained layer calls, each with its own weights (as "
               "a model's decode step: weights stream from device memory, no host dispatch between calls).",
    "fori_loop": "Cases of <= 256 tokens run 50 layer calls of one weight set in a fori_loop inside one program "
                 "(the first method: it kept the weights in L2 and added a host round trip per iteration).",
}


def layer_section(runs: list[dict], title: str, method: str) -> list[str]:
    run = runs[0]
    def setting(r: dict) -> tuple:
        return r.get("gate_dtype", "float32"), r.get("segment_tokens")  # older runs: float32 gates, random routing

    for other in runs[1:]:
        if setting(other) != setting(run):
            raise ValueError(f"runs of one table must share gate dtype and routing: {run['date']} vs {other['date']}")
    v = run["versions"]
    lines = [
        f"## {title}\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {v['jax']}, jaxlib {v['jaxlib']}, Python {v['python']}. One "
        f"layer forward (base matmul + {gate_description(run)} + top-2 routing + adapter mixture), bf16, k = 2, r = 8. "
        f"Time: median over samples. {LAYER_METHODS[method]} Temp: XLA's compiled temporary bytes."
        f"{routing_note(run)}\n",
    ]
    results = [r for run in runs for r in run["results"]]
    variants = ["base", "lora", *[s for s in STRATEGIES if any(r["variant"] == s for r in results)]]
    strategies = [s for s in variants if s in STRATEGIES]
    rows: dict[tuple, dict] = {}
    for r in results:
        rows.setdefault((r["in_features"], r["out_features"], r["adapters"], r["tokens"]), {})[r["variant"]] = r
    misses = any("fused_missed_share" in r for r in results)  # runs since the share was recorded
    header = ["in->out", "N", "T", *(["fused misses"] if misses else []), *(f"{n} ms" for n in variants)]
    lines.append("| " + " | ".join(header) + " | best | best / lora time | best / lora temp |")
    lines.append("|---|---:|---:|" + "---:|" * (len(variants) + misses) + "---|---:|---:|")
    for (i, o, n, t), case in rows.items():
        cells = [f"{case[v]['median_ms']:.4g}" if case.get(v, {}).get("status") == "ok"
                 else case.get(v, {}).get("status", "-").split(":")[0] for v in variants]
        if misses:
            cells.insert(0, f"{case['base']['fused_missed_share']:.2%}")
        timed = [s for s in strategies if case.get(s, {}).get("status") == "ok"]
        best = min(timed, key=lambda s: case[s]["median_ms"])
        lora = case["lora"]
        lines.append(f"| {i}->{o} | {n} | {t} | " + " | ".join(cells) + f" | {best} | "
                     f"{case[best]['median_ms'] / lora['median_ms']:.2f}x | "
                     f"{case[best]['temp_bytes'] / lora['temp_bytes']:.2f}x |")
    lines.append("")
    lines += kernel_time_table(rows, variants, strategies)
    for target in (t for run in runs for t in run.get("targets", [])):
        verdict = "holds" if target["holds"] else "MISSED"
        ratio = "n/a" if target["ratio"] is None else f"{target['ratio']:.2f}x"
        lines.append(f"- {target['target']}: {target['strategy']} at {ratio} (limit {target['limit']:.2f}x): {verdict}")
    return lines + [""]


def gate_description(run: dict) -> str:
    if run.get("gate_dtype") == "bfloat16":
        return "gate logits of a bfloat16 gate (`--gate-dtype bfloat16`, float32 accumulation)"
    return "float32 gate logits"


def routing_note(run: dict) -> str:
    if not run.get("segment_tokens"):
        return " Routing: a random gate spreads the tokens over the adapters."
    return (f" Routing as prompts have it (`--segment-tokens {run['segment_tokens']}`): cases of more than 256 tokens "
            f"come in runs of {run['segment_tokens']} tokens that each route to one pair of adapters.")


def kernel_time_table(rows: dict[tuple, dict], variants: list[str], strategies: list[str]) -> list[str]:
    """The profiler's kernel time per call (device busy time), where the run recorded it."""
    timed = {key: case for key, case in rows.items() if case.get("lora", {}).get("kernel_ms")}
    if not timed:
        return []
    lines = ["Device (kernel) time per call, us, from the profiler (wall time above also counts the launch gaps "
             "between kernels and, for large cases, the host's dispatch jitter):\n",
             "| in->out | N | T | " + " | ".join(f"{v} us" for v in variants) + " | best | best / lora |",
             "|---|---:|---:|" + "---:|" * len(variants) + "---|---:|"]
    for (i, o, n, t), case in timed.items():
        cells = [f"{case[v]['kernel_ms'] * 1e3:.1f}" if case.get(v, {}).get("kernel_ms") else "-" for v in variants]
        best = min((s for s in strategies if case.get(s, {}).get("kernel_ms")), key=lambda s: case[s]["kernel_ms"])
        lines.append(f"| {i}->{o} | {n} | {t} | " + " | ".join(cells) + f" | {best} | "
                     f"{case[best]['kernel_ms'] / case['lora']['kernel_ms']:.2f}x |")
    return lines + [""]


def decode_tuning_section(run: dict, subtitle: str | None = None) -> list[str]:
    lines = [
        f"## Decode-kernel block sizes (`decode_tuning.py`){f', {subtitle}' if subtitle else ''}\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['versions']['jax']}. The three decode kernels alone "
        f"(gate, route_shrink, expand_add), {run['calls_per_program']} chained calls per program, profiler kernel "
        "time per call; 4096 -> out, bf16, r = 8, k = 2. Each kernel's best configuration, and the time of the "
        f"run's defaults ({run['defaults']}); today's defaults come from this table.\n",
        "| T | N | out | kernel | best configuration | us | default us |",
        "|---:|---:|---:|---|---|---:|---:|",
    ]
    gate_fields = ("gate_block_in", "gate_block_adapters", "gate_step_rows", "gate_num_warps", "gate_num_stages")
    shrink_warps = "shrink_num_warps" if "shrink_num_warps" in run["defaults"] else "num_warps"  # older runs shared
    fields = {"gate": tuple(f for f in gate_fields if f in run["defaults"]),
              "route_shrink": ("block_in", shrink_warps), "expand_add": ("block_out", "num_warps")}
    cases = list(dict.fromkeys((r["tokens"], r["adapters"], r["out_features"]) for r in run["results"]))
    for case in cases:
        mine = [r for r in run["results"] if (r["tokens"], r["adapters"], r["out_features"]) == case]
        defaults = next(r for r in mine if all(r[f] == v for f, v in run["defaults"].items()))
        for kernel, names in fields.items():
            # route_shrink and expand_add are compared with the gate tile at the run's default, since
            # route_shrink's time depends on the gate tile too.
            candidates = mine if kernel == "gate" else [
                r for r in mine if all(r[f] == run["defaults"][f] for f in fields["gate"])]
            best = min(candidates, key=lambda r: r[kernel])
            # None: chosen from N by the rule of the run's code.
            config = ", ".join(f"{f}={'by N' if best[f] is None else best[f]}" for f in names)
            lines.append(f"| {case[0]} | {case[1]} | {case[2]} | {kernel} | {config} | {best[kernel]:.2f} | "
                         f"{defaults[kernel]:.2f} |")
    return lines + [""]


def gate_steps_section(run: dict) -> list[str]:
    lines = [
        "## Decode gate tiles read in steps (`decode_tuning.py`, second sweep)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['versions']['jax']}. As above; the gate program reads "
        "its rows gate_step_rows at a time, and route_shrink sums one logit share per gate program, so the "
        "gate tiles are ranked by gate + route_shrink time (route_shrink and expand_add at their defaults). The "
        "three fastest per case, and the run's defaults (its rule then: 64 rows at N = 28, 512 at 1024).\n",
        "| T | N | rows x adapters, step | gate us | route_shrink us | sum us |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    rest = ("block_in", "block_out", "num_warps")
    cases = list(dict.fromkeys((r["tokens"], r["adapters"]) for r in run["results"]))
    for case in cases:
        mine = [r for r in run["results"] if (r["tokens"], r["adapters"]) == case
                and all(r[f] == run["defaults"][f] for f in rest)]
        swept = [r for r in mine if r["gate_block_in"] is not None]
        ranked = sorted(swept, key=lambda r: r["gate"] + r["route_shrink"])
        default = next(r for r in mine if all(r[f] == v for f, v in run["defaults"].items()))
        for r in [*ranked[:3], default]:
            rows = "the run's rule" if r["gate_block_in"] is None else r["gate_block_in"]
            label = f"{rows} x {r['gate_block_adapters']}, {r['gate_step_rows']}"
            lines.append(f"| {case[0]} | {case[1]} | {label} | {r['gate']:.2f} | {r['route_shrink']:.2f} | "
                         f"{r['gate'] + r['route_shrink']:.2f} |")
    return lines + [""]


def tuning_section(run: dict) -> list[str]:
    lines = [
        "## Pallas gather-kernel block sizes (`pallas_tuning.py`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['jax']}. The mixture alone (no base matmul, no "
        "routing), 4096 -> 4096, bf16, r = 8, k = 2; best kernel configuration beside XLA's dense and bmm forms. "
        "(The JSON also holds that run's rows of the first, single-kernel prefill form, since replaced.)\n",
        "| kernel | T | N | best configuration | kernel ms | dense ms | bmm ms |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    cases = sorted({(r["tokens"], r["adapters"]) for r in run["rows"] if r["kind"] == "gather"})
    for tokens, adapters in cases:
        mine = [r for r in run["rows"] if (r["tokens"], r["adapters"]) == (tokens, adapters)]
        best = min((r for r in mine if r["kind"] == "gather"), key=lambda r: r["ms"])
        xla = {r["kind"]: r["ms"] for r in mine if r["kind"] in ("dense", "bmm")}
        lines.append(f"| {best['kind']} | {tokens} | {adapters} | `{best['config']}` | {best['ms']:.4f} | "
                     f"{xla['dense']:.4f} | {xla['bmm']:.4f} |")
    return lines + [""]


def segment_tuning_section(run: dict, title: str = "Pallas prefill-kernel block sizes") -> list[str]:
    lines = [
        f"## {title} (`segment_tuning.py`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['versions']['jax']}. The grouped (SGMV) mixture alone as "
        "the layer runs it (shrink + expand added into y in place, grouping in XLA), 4096 -> 4096, bf16, r = 8, "
        "k = 2, random routing; profiler kernel time per call, us. `other` is the grouping's sort and scatters plus "
        "a 128 MB copy of y (y is not donated here; in the layer it is the base matmul's output, so no copy).\n",
        "| T | N | best configuration | total | shrink | expand | other | XLA dense | XLA bmm |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for tokens, adapters in sorted({(r["tokens"], r["adapters"]) for r in run["rows"]}, key=lambda c: c[1]):
        mine = [r for r in run["rows"] if (r["tokens"], r["adapters"]) == (tokens, adapters)]
        xla = {r["kind"]: r["us"]["total"] for r in mine if r["kind"] != "segment"}
        best = min((r for r in mine if r["kind"] == "segment"), key=lambda r: r["us"]["total"])
        config = ", ".join(f"{k}={v}" for k, v in best["config"].items())
        us = best["us"]
        lines.append(f"| {tokens} | {adapters} | {config} | {us['total']:.0f} | {us['shrink']:.0f} | "
                     f"{us['expand']:.0f} | {us['other']:.0f} | {xla['dense']:.0f} | {xla['bmm']:.0f} |")
    return lines + [""]


def pipeline_section(run: dict) -> list[str]:
    settings = run["settings"]
    lines = [
        "## Training path on SmolLM2-135M (`train_pipeline.py`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['jax']}, Python {run['python']}. Real "
        f"SmolLM2-135M-Instruct weights (bf16), {len(run['adapters'])} BIG-bench tasks: one LoRA each (r = 8, all 7 "
        f"projections, {settings['lora_steps']} steps), stacked, then the gates trained on all tasks "
        f"({settings['gate_steps']} steps, "
        f"lr {settings['gate_lr']}, task-balanced). Batch {settings['batch_size']} rows x {settings['max_length']} "
        "tokens, bf16 compute. Step time: median after the first (compiling) step; tokens/s: mean real (non-padding) "
        "tokens per step over that median; peak: the device allocator's peak in that process.\n",
        "| stage | task | train examples | median step ms | tokens/s | peak GiB | final LM loss |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, s in run["adapters"].items():
        lines.append(f"| lora | {task} | {s['examples']} | {s['median_step_s'] * 1e3:.1f} | {s['tokens_per_s']:.0f} | "
                     f"{s['peak_memory_bytes'] / 2**30:.2f} | {s['final_loss']:.3f} |")
    g = run["gates"]
    lines.append(f"| gates | all {len(g['tasks'])} | {g['train_rows']} | {g['median_step_s'] * 1e3:.1f} | "
                 f"{g['tokens_per_s']:.0f} | {g['peak_memory_bytes'] / 2**30:.2f} | - |")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in run["stage_wall_s"].items())
    lines += ["", f"Held-out gate top-1 accuracy (256 test rows, interleaved across tasks, mean over all 210 gates): "
              f"**{run['gate_validation_mean']:.3f}**. Wall time per stage, compilation and tokenisation included: "
              f"{stages}. Per-layer accuracies: `results/train_pipeline_gate_validation.json`; per-step metrics: "
              "`results/train_pipeline_gate_metrics.jsonl`.", ""]
    return lines


def bfloat16_gates_section(run: dict, validation: dict) -> list[str]:
    bf16 = validation["bfloat16_gates"]
    layers = bf16["layers_routing_agreement"]
    weakest = min(layers, key=layers.get)
    return [
        "## Trained gates held in bfloat16 (`train.gates` validation, `meteora_checkpoint.cast_gates`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['jax']}. The training path above run again "
        f"({run['settings']['lora_steps']} LoRA steps per task, {run['settings']['gate_steps']} gate steps; "
        f"stages {', '.join(f'{k} {v:.0f} s' for k, v in run['stage_wall_s'].items())}), then the held-out "
        "validation repeated with the trained gates cast to bfloat16. Routing agreement: the share of real tokens "
        "whose two chosen adapters are the same set as with the float32 gates (each layer seeing its own model's "
        "inputs). Figures from that run's `train.gates` validation.json, copied beside its report.\n",
        f"| gates | held-out gate accuracy | routing agreement, mean over {len(layers)} gates | lowest gate |",
        "|---|---:|---:|---|",
        f"| float32 (as trained) | {validation['mean_gate_accuracy']:.4f} | - | - |",
        f"| bfloat16 | {bf16['mean_gate_accuracy']:.4f} | {bf16['mean_routing_agreement']:.4f} | "
        f"{weakest} {layers[weakest]:.4f} |",
        "",
    ]


def fused_tiles_section(run: dict, validation: dict, slots: str) -> list[str]:
    """How trained gates fill the `fused` strategy's tile slots (train.gates validation's "fused_strategy"), under
    the slot rule of that run (`slots`: which 8 adapters a tile keeps)."""
    fused = validation["fused_strategy"]
    shares = sorted(fused["layers_missed_share"].values())
    worst = max(fused["layers_missed_share"], key=fused["layers_missed_share"].get)
    return [
        f"## Trained gates against the `fused` strategy's tile slots, {slots} (`train.gates` validation)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['jax']}. The training path above run again "
        f"({len(run['adapters'])} adapters of rank 8 (train.lora's default), "
        f"{run['settings']['gate_steps']} gate steps; held-out gate accuracy {validation['mean_gate_accuracy']:.4f})."
        f" Missed share: the share of (token, choice) pairs of the held-out batch, as one layer call sees it, whose "
        f"adapter is not among the 64 / r = 8 adapters its {fused['tile_tokens']}-token tile keeps ({slots}): the "
        "pairs `fused` adds per token outside its GEMM.\n",
        "| layers | mean missed share | median layer | highest layer |",
        "|---:|---:|---:|---|",
        f"| {len(shares)} | {fused['mean_missed_share']:.4f} | {shares[len(shares) // 2]:.4f} | "
        f"{worst} {fused['layers_missed_share'][worst]:.4f} |",
        "",
    ]


def block_fields(row: dict) -> dict[str, str]:
    """The fields of a row's block-size dataclass, as its repr wrote them."""
    return dict(item.split("=") for item in row["blocks"][row["blocks"].index("(") + 1:-1].split(", "))


def kernel_us(row: dict) -> str:
    """A row's kernel time in us, or the start of the error that stopped it."""
    return f"{row['kernel_ms'] * 1e3:.1f}" if row.get("kernel_ms") else row.get("error", "-")[:40]


def missed_add_section(run: dict, subtitle: str = "") -> list[str]:
    env, rows = run["environment"], run["rows"]
    # One pass (programs x output spans per token) in older runs; two passes (shrink programs, expand programs over
    # spans of span_out outputs) since.
    fields = [f for f in ("programs", "expand_programs", "span_out", "spans", "block_in") if f in block_fields(rows[0])]
    lines = [
        f"## The `fused` strategy's miss path, block sizes (`missed_add_tuning.py`){subtitle}\n",
        f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. The per-token remainder alone "
        "(its kernels' own time, without XLA's copy of y), 4096 -> 4096, bf16, r = 8, k = 2, on the choices that "
        "miss their tile's 8 most chosen adapters; programs, output spans and input features per step as the "
        "run's kernel named them.\n",
        f"| N | T | routing | choices missed | {' | '.join(fields)} | kernel us |",
        f"|---:|---:|---|---:|{'---:|' * len(fields)}---:|",
    ]
    for r in rows:
        blocks, time = block_fields(r), kernel_us(r)
        lines.append(f"| {r['adapters']} | {r['tokens']} | {r['routing']} | {r['missed_share']:.2%} | "
                     f"{' | '.join(blocks[f] for f in fields)} | {time} |")
    return lines + [""]


def missed_two_pass_section(run: dict, one_pass: list[dict]) -> list[str]:
    env, rows = run["environment"], run["rows"]
    baseline = {(r["adapters"], r["tokens"], r["routing"]): r["kernel_ms"] for r in one_pass}
    lines = [
        "## The `fused` strategy's miss path in two passes, block sizes (`missed_add_tuning.py`)\n",
        f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. The shrink and expand passes "
        "together (their kernels' own time, without XLA's copy of y), 4096 -> 4096, bf16, r = 8, k = 2, on the "
        "choices that miss their 256-token tile's 8 most chosen adapters; shrink programs, expand programs and "
        "outputs per expand program (this run named them `spans`: None for one 256-output step, 4 for 1024 "
        "outputs), against the one-pass kernel of commit 01b42aa with its defaults in the same run.\n",
        "| N | T | routing | choices missed | programs | expand_programs | span_out | kernel us | one pass us |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        blocks, time = block_fields(r), kernel_us(r)
        span_out = 256 if blocks["spans"] == "None" else 4096 // int(blocks["spans"])
        before = baseline[(r["adapters"], r["tokens"], r["routing"])] * 1e3
        lines.append(f"| {r['adapters']} | {r['tokens']} | {r['routing']} | {r['missed_share']:.2%} | "
                     f"{blocks['programs']} | {blocks['expand_programs']} | {span_out} | {time} | {before:.1f} |")
    return lines + [""]


def tile_adapters_section(run: dict) -> list[str]:
    lines = [
        "## Per-tile adapter mixture, a design experiment (`tile_adapters.py`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['versions']['jax']}. The mixture alone (no base matmul, "
        f"no gate), 4096 -> 4096, bf16, r = 8, k = 2, tokens routed in runs of {run['segment_tokens']}; device "
        "time, routing preparation included. U: adapters per 64-token tile and pass; a tile whose tokens chose "
        "more takes a second pass; adapters past 2U are dropped by the prototype (hence an error).\n",
        "| N | T | U | tile us | tiles in a second pass | tiles over 2U | error of the delta | bmm us | grouped us |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run["results"]:
        cases = [o for o in run["results"] if (o["adapters"], o["tokens"]) == (r["adapters"], r["tokens"])]
        xla = next((o for o in cases if "bmm_us" in o), {})
        lines.append(f"| {r['adapters']} | {r['tokens']} | {r['slots']} | {r['tile_us']:.0f} | "
                     f"{r['tiles_in_second_pass']:.1%} | {r['tiles_over_two_passes']:.1%} | "
                     f"{r['rel_error_of_delta']:.4f} | {xla.get('bmm_us', 0):.0f} | {xla.get('grouped_us', 0):.0f} |")
    return lines + [""]


def gate_strategy_section(run: dict) -> list[str]:
    lines = [
        "## Gate training by MeteoRA strategy (`train.gates --strategy`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['jax']}, Python {run['python']}. {run['what']}. Median "
        "step after the first; the first step is mostly compilation.\n",
        "| strategy | median step ms | tokens/s | first step s | peak GiB | held-out gate accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in run["runs"].items():
        lines.append(f"| {name} | {r['median_step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['first_step_s']:.0f} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} | {r['held_out_gate_accuracy']:.3f} |")
    return lines + [""]


def gemm_section(base_forms: dict, routed: dict, shrink: dict) -> list[str]:
    """The `fused` strategy's kernels against XLA: the best block sizes of each sweep, kernel time in ms."""
    env = base_forms["environment"]
    versions = f"{env['date'][:10]}, {env['device']}, jax {env['versions']['jax']}"
    lines = [f"\n## Kernels of the `fused` strategy ({versions})\n",
             "Device (kernel) time, bf16. `mosaic matmul`: jax's Hopper example GEMM (`base_gemm_forms.py`); "
             "`routed_gemm`: the same with the adapters' extra step (`routed_gemm_tuning.py`); `tile_shrink` "
             "(`tile_shrink_tuning.py`). Best block sizes of each sweep; every row is in the JSON.\n",
             "| kernel | shape | XLA ms | kernel ms | ratio | best blocks |", "|---|---|---:|---:|---:|---|"]

    def best(rows, key):
        timed = [r for r in rows if r.get("kernel_ms") and r.get(key)]
        return min(timed, key=lambda r: r["kernel_ms"]) if timed else None

    for name, rows, shape_keys, key in (("mosaic matmul", base_forms["rows"], ("m", "k", "n"), "config"),
                                        ("routed_gemm", routed["rows"], ("t", "i", "o"), "blocks"),
                                        ("tile_shrink", shrink["rows"], ("tokens", "adapters"), "blocks")):
        for shape in sorted({tuple(r[k] for k in shape_keys) for r in rows}):
            same = [r for r in rows if tuple(r[k] for k in shape_keys) == shape]
            xla = next(r["kernel_ms"] for r in same if r["form"] in ("xla", "xla_dot"))
            top = best(same, key)
            if top:
                label = "x".join(map(str, shape)) if name != "tile_shrink" else f"T={shape[0]}, N={shape[1]}"
                lines.append(f"| {name} | {label} | {xla:.4g} | {top['kernel_ms']:.4g} | "
                             f"{top['kernel_ms'] / xla:.2f}x | `{top[key].split('(', 1)[1].rstrip(')')}` |")
    return lines


def routed_gemm_sweep_section(run: dict, title: str) -> list[str]:
    """Every block configuration of a routed_gemm_tuning.py sweep, kernel time against XLA's dot of the same shape."""
    env = run["environment"]
    lines = [f"\n## The routed GEMM's block sizes, {title} (`routed_gemm_tuning.py`)\n",
             f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. Device (kernel) time, bf16, "
             "N = 256 adapters of r = 8 in random tile slots.\n",
             "| T x I -> O | XLA dot ms | blocks | kernel ms | / XLA |", "|---|---:|---|---:|---:|"]
    for t, i, o in sorted({(r["t"], r["i"], r["o"]) for r in run["rows"]}):
        same = [r for r in run["rows"] if (r["t"], r["i"], r["o"]) == (t, i, o)]
        xla = next(r["kernel_ms"] for r in same if r["form"] == "xla_dot")
        for r in sorted((r for r in same if r.get("kernel_ms") and r.get("blocks")), key=lambda r: r["kernel_ms"]):
            blocks = r["blocks"].removeprefix("RoutedGemmBlockSizes(").rstrip(")")
            lines.append(f"| {t} x {i} -> {o} | {xla:.3f} | {blocks} | {r['kernel_ms']:.3f} | "
                         f"{r['kernel_ms'] / xla:.2f}x |")
    return lines


def slot_gather_section(check: dict | list, bank_sweep: dict) -> list[str]:
    """The routed GEMM gathering the slots' B rows itself, against B_tile gathered beforehand by XLA."""
    env = bank_sweep["environment"]
    lines = ["## The routed GEMM gathering the slots' B rows (`routed_gemm.py`)\n",
             f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. Kernel time, 4096 -> 4096, "
             "bf16; each tile's 8 slots drawn from a bank of 256 adapters at r = 8. `in kernel`: the GEMM reads "
             "each slot's index and copies its rows by TMA (indices loaded together, today's code); `pre-gathered`: "
             "the same kernel given B_tile gathered by XLA as a bank of one slot per tile, without the gather's own "
             "time (`routed_gemm_gather.py`; this run's JSON holds the rows alone).\n",
             "| T | blocks | in kernel us | pre-gathered us |", "|---:|---|---:|---:|"]
    for r in check["rows"] if isinstance(check, dict) else check:
        lines.append(f"| {r['t']} | `{r['blocks'].split('(', 1)[1].rstrip(')')}` | {r['in_kernel_ms'] * 1e3:.1f} | "
                     f"{r['pre_gathered_ms'] * 1e3:.1f} |")
    lines += ["", "The block-size sweep of the same kernel, slot indices then loaded one after another "
              "(`routed_gemm_tuning_bank.json`), best per shape:\n",
              "| shape | XLA dot ms | best ms | best blocks |", "|---|---:|---:|---|"]
    rows = bank_sweep["rows"]
    for shape in sorted({(r["t"], r["i"], r["o"]) for r in rows}):
        same = [r for r in rows if (r["t"], r["i"], r["o"]) == shape]
        xla = next(r["kernel_ms"] for r in same if r["form"] == "xla_dot")
        top = min((r for r in same if r.get("blocks") and r.get("kernel_ms")), key=lambda r: r["kernel_ms"])
        lines.append(f"| {'x'.join(map(str, shape))} | {xla:.4g} | {top['kernel_ms']:.4g} | "
                     f"`{top['blocks'].split('(', 1)[1].rstrip(')')}` |")
    return lines + [""]


def tile_routing_section(run: dict, title: str) -> list[str]:
    env = run["environment"]
    lines = [f"## `fused`'s tile routing kernel, {title} (`tile_routing_tuning.py`)\n",
             f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. Device (kernel) time of "
             "`route_tiles` on top-2 choices in runs of 96 tokens (5% of choices random), 128-token tiles, 8 slots; "
             "two forms of the kernel on the same inputs in the same run (`--baseline`).\n",
             "| T | N | form | blocks | kernel us | same as reference |", "|---:|---:|---|---|---:|---|"]
    for r in run["rows"]:
        blocks = r["blocks"].split("(", 1)[1].rstrip(")")
        lines.append(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {blocks} | {kernel_us(r)} | "
                     f"{r.get('same_as_reference', '-')} |")
    return lines + [""]


def route_tuning_section(run: dict) -> list[str]:
    env = run["environment"]
    lines = ["## Routing of many tokens in one kernel, block sizes (`route_tuning.py`)\n",
             f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. Top-2 routing and its softmax "
             "from float32 logits [T, N], device (kernel) time: XLA's rounds of max and argmax (`route`) against "
             "`route_tokens` per block size, with the share of choices equal to XLA's.\n",
             "| T | N | form | blocks | kernel us | same choices |", "|---:|---:|---|---|---:|---:|"]
    for r in run["rows"]:
        blocks = r["blocks"].split("(", 1)[1].rstrip(")") if r.get("blocks") else "-"
        same = f"{r['same_choices']:.4f}" if r.get("same_choices") is not None else "-"
        lines.append(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {blocks} | {kernel_us(r)} | {same} |")
    return lines + [""]


def training_through_fused_section(runs: list[tuple[str, dict]]) -> list[str]:
    """The training path's step times with `auto` and with `fused` taken in differentiated calls too."""
    first = runs[0][1]
    lines = [
        "## Training through the `fused` strategy (`train_pipeline.py`)\n",
        f"{first['device']}; jax {first['jax']}, Python {first['python']}. The training path above (10 LoRAs of "
        "100 steps, 300 gate steps, 16 x 256 tokens, bf16), with `auto` as shipped (`fused` only in calls marked "
        "inference), or with every call marked inference on the device so that `auto` takes `fused` wherever its "
        "tiles fit, differentiated calls included: on SmolLM2 (576 -> 1536) the gate and up projections, 2 of 7. "
        "The LoRA steps train the adapters (forced routing), the gate steps only the gates. Median step after the "
        "first; peak: the gate process's device allocator peak.\n",
        "| run | date | LoRA step ms (10 tasks) | gate step ms | first gate step s | gate peak GiB | held-out gate "
        "accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, run in runs:
        lora = [a["median_step_s"] * 1e3 for a in run["adapters"].values()]
        gates = run["gates"]
        lines.append(f"| {label} | {run['date'][:10]} | {min(lora):.1f}-{max(lora):.1f} | "
                     f"{gates['median_step_s'] * 1e3:.1f} | {gates['first_step_s']:.0f} | "
                     f"{gates['peak_memory_bytes'] / 2**30:.2f} | {run['gate_validation_mean']:.3f} |")
    return lines + [""]


def workspace_section(run: dict) -> list[str]:
    """Temporaries of each layer form beside the largest cuBLAS workspace XLA gave one of its GEMMs."""
    (case,) = {(r["in_features"], r["out_features"], r["adapters"], r["tokens"]) for r in run["results"]}
    lines = [
        "## Temporaries and cuBLAS workspaces (`meteora_layer.py`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['versions']['jax']}. {case[0]} -> {case[1]}, "
        f"N = {case[2]}, T = {case[3]}, {gate_description(run)}. {routing_note(run).strip()} Temporaries: the compiled "
        "program's temp_size_in_bytes; workspace: the largest cuBLAS workspace buffer in its HLO (XLA counts it "
        "among the temporaries).\n",
        "| variant | kernel ms | temporaries MB | largest cuBLAS workspace MB | temporaries without it MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in run["results"]:
        if r["status"] == "ok":
            temp, workspace = r["temp_bytes"] / 1e6, r["cublas_workspace_bytes"] / 1e6
            lines.append(f"| {r['variant']} | {r['kernel_ms']:.4g} | {temp:.1f} | {workspace:.1f} | "
                         f"{temp - workspace:.1f} |")
    return lines + [""]


def shrink_sweep_section(run: dict, field: str, title: str) -> list[str]:
    """The best tile_shrink blocks per value of one block field, against XLA's form."""
    env = run["environment"]

    def value(row: dict) -> str:
        return row["blocks"].split(f"{field}=")[1].split(",")[0].rstrip(")")

    kernel_alone = any("shrink_kernel_ms" in r for r in run["rows"])
    lines = [
        f"## The `fused` shrink by {title} (`tile_shrink_tuning.py`)\n",
        f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. Device (kernel) time, bf16, "
        f"4096 inputs, r = 8, of the whole call (the shrink kernel, the sum of its splits where there are several, and "
        f"A's transpose in the sweep that tried it). Best of each {field} over the other fields; configurations that "
        "ask for more shared memory "
        "than a multiprocessor has are left out.\n",
        f"| T | N | XLA ms | {field} | best ms | {'its shrink kernel ms | ' if kernel_alone else ''}configurations "
        "run | best blocks |",
        f"|---:|---:|---:|---:|---:|{'---:|' if kernel_alone else ''}---:|---|",
    ]
    for tokens, adapters in sorted({(r["tokens"], r["adapters"]) for r in run["rows"]}):
        same = [r for r in run["rows"] if (r["tokens"], r["adapters"]) == (tokens, adapters)]
        xla = next(r["kernel_ms"] for r in same if r["form"] == "xla")
        timed = [r for r in same if r.get("kernel_ms") and r.get("blocks")]
        for choice in sorted({value(r) for r in timed}):
            these = [r for r in timed if value(r) == choice]
            top = min(these, key=lambda r: r["kernel_ms"])
            kernel = f"{top['shrink_kernel_ms']:.4g} | " if kernel_alone else ""
            lines.append(f"| {tokens} | {adapters} | {xla:.4g} | {choice} | {top['kernel_ms']:.4g} | {kernel}"
                         f"{len(these)} | `{top['blocks'].split('(', 1)[1].rstrip(')')}` |")
    return lines + [""]


def pallas_backward_section(run: dict) -> list[str]:
    """The `pallas` strategy's backward against the pair kernel given every pair, best blocks per case."""
    env = run["environment"]
    lines = [
        "## The `pallas` strategy's backward for x and the routing (`pallas_backward.py`)\n",
        f"Date {env['date'][:10]}; {env['device']}; jax {env['versions']['jax']}. Device (kernel) time and compiled "
        "temporaries, bf16, 4096 -> 4096, r = 8, k = 2. `gathered`: the strategy's form (dx by the grouped kernels "
        "on the transposed adapters, the coefficients' gradient from per-pair products of gathered A and B in XLA); "
        "`pair kernel`: `fused`'s miss-path kernel (`pair_grads.py`) given every pair, best of "
        f"{len({r['blocks'] for r in run['rows'] if 'blocks' in r})} block sizes.\n",
        "| N | T | routing | gathered ms | gathered MB | pair kernel ms | pair kernel MB | dx error (gathered, "
        "kernel) |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    cases = sorted({(r["adapters"], r["tokens"], r["routing"]) for r in run["rows"]}, key=lambda c: (c[1], c[0], c[2]))
    for adapters, tokens, routing in cases:
        same = [r for r in run["rows"] if (r["adapters"], r["tokens"], r["routing"]) == (adapters, tokens, routing)
                and "kernel_ms" in r]
        old = next(r for r in same if r["form"] == "gathered")
        new = min((r for r in same if r["form"] == "pair kernel"), key=lambda r: r["kernel_ms"])
        lines.append(f"| {adapters} | {tokens} | {routing} | {old['kernel_ms']:.3f} | {old['temp_bytes'] / 1e6:.0f} | "
                     f"{new['kernel_ms']:.3f} | {new['temp_bytes'] / 1e6:.0f} | "
                     f"{old['dx_rel_err']:.1e}, {new['dx_rel_err']:.1e} |")
    return lines + [""]


def is_matmul_kernel(name: str) -> bool:
    """A profiler event of cuBLAS's or XLA's matmul kernels, not one of XLA's elementwise or reduction fusions."""
    return not name.startswith(("loop_", "input_", "Memset"))


def gate_prefill_section(run: dict) -> list[str]:
    lines = [
        "## Prefill gate matmul forms (`gate_prefill_forms.py`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['versions']['jax']}. x [T, 4096] @ gate [4096, N], "
        f"bfloat16 with float32 logits, {run['calls_per_program']} chained calls per program; the matmul kernels' "
        "profiler time per call (the chaining sum apart) and the largest of them, cuBLAS's tile in its name.\n",
        "| T | N | form | matmul us | largest kernel |",
        "|---:|---:|---|---:|---|",
    ]
    for r in run["results"]:
        matmul = {k: v for k, v in r["kernels_us"].items() if is_matmul_kernel(k)}
        lines.append(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {sum(matmul.values()):.1f} | "
                     f"`{max(matmul, key=matmul.get)}` |")
    return lines + [""]


def gate_routing_section(run: dict) -> list[str]:
    lines = [
        "## Prefill gate and routing forms (`gate_routing_forms.py`)\n",
        f"Date {run['date'][:10]}; {run['device']}; jax {run['versions']['jax']}. x [T, {run['in_features']}] @ a "
        "bfloat16 gate, routed top-2 by the routing kernel; every kernel's time per call, the compiled temporaries "
        "(with XLA's cuBLAS workspace), and the share of tokens choosing as the first form does.\n",
        "| T | N | form | kernels us | temp MiB | same choices |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in run["results"]:
        lines.append(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {r['kernel_us']:.1f} | "
                     f"{r['temp_bytes'] / 2**20:.1f} | {r['same_choices']:.4f} |")
    return lines + [""]


def render() -> str:
    """RESULTS.md's text, from the committed JSON."""
    lines = ["# Benchmark results\n",
             "Written by `bench/results_tables.py` from the JSON in `results/` (every sample is there). Analysis, "
             "predictions and conclusions: `NOTES.md`.\n"]
    lines += generate_section([load("generate_throughput_8b.json"), load("generate_throughput_smollm2.json")])
    lines += layer_section([load("meteora_layer_n28.json"), load("meteora_layer_many.json")],
                           "MeteoRA layer (`meteora_layer.py`), with the Pallas decode and prefill kernels", "chained")
    lines += layer_section([load("meteora_layer_many_gate_bf16.json")],
                           "MeteoRA layer, many adapters, bfloat16 gates (inference)", "chained")
    lines += layer_section([load("meteora_layer_segments.json")],
                           "MeteoRA layer, many adapters, routing in runs of tokens", "chained")
    lines += layer_section([load("meteora_layer_segments_gate_bf16.json")],
                           "MeteoRA layer, many adapters, routing in runs of tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_fused_runs96_n28.json"), load("meteora_layer_fused_runs96_many.json")],
                           "MeteoRA layer with `fused` (tile slots: the 8 most chosen), routing in runs of 96 tokens, "
                           "bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_fused_runs48.json")],
                           "MeteoRA layer with `fused`, routing in runs of 48 tokens (11-25% of choices miss their "
                           "tile's slots), bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_session15.json")],
                           "MeteoRA layer, `fused` against bmm after session 15 (the routed GEMM's own pipeline, two "
                           "output staging buffers), in one run, routing in runs of 96 tokens, bfloat16 gates",
                           "chained")
    lines += layer_section([load("meteora_layer_before_output_buffers.json")],
                           "The same run, the code before the second output staging buffer, N = 28 and 256", "chained")
    lines += routed_gemm_sweep_section(load("routed_gemm_tuning_pipeline_steps.json"),
                                       "its own pipeline (session 15, one output staging buffer)")
    lines += layer_section([load("meteora_layer_pipeline_steps.json")],
                           "MeteoRA layer with `fused`'s routed GEMM taking the adapters' step through its own "
                           "pipeline (four steps in flight; session 15), routing in runs of 96 tokens, bfloat16 gates",
                           "chained")
    lines += layer_section([load("meteora_layer_before_pipeline_steps.json")],
                           "The same run, the code before (emit_pipeline, three K steps in flight)", "chained")
    lines += layer_section([load("meteora_layer_adapter_votes.json")],
                           "MeteoRA layer with `fused`'s tile routing counting votes per adapter up to N = 256 "
                           "(session 14), routing in runs of 96 tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_before_adapter_votes.json")],
                           "The same run, the code before (votes counted pairwise at every N), N = 256", "chained")
    lines += tile_routing_section(load("tile_routing_tuning_adapter_votes.json"),
                                  "votes per adapter up to N = 256, pairwise beyond (`hybrid`) against pairwise only")
    lines += tile_routing_section(load("tile_routing_tuning_histogram.json"),
                                  "votes per adapter at every N (`histogram`) against pairwise")
    lines += layer_section([load("meteora_layer_session14.json")],
                           "MeteoRA layer, `fused` against bmm after session 14 (the gate's shares added by the "
                           "routing kernel), in one run, routing in runs of 96 tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_gate_shares.json")],
                           "MeteoRA layer with `fused`, the gate matmul in input slices whose shares the routing "
                           "kernel adds (session 14), routing in runs of 96 tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_before_shares.json")],
                           "The same run, the code before the gate's shares (session 13's), N = 256", "chained")
    lines += layer_section([load("meteora_layer_pallas_gate_t1024.json")],
                           "MeteoRA layer at 1024 tokens with the Pallas gate kernel (no cuBLAS workspace), routing in "
                           "runs of 96 tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_gate_shares_t1024.json")],
                           "MeteoRA layer at 1024 tokens, N = 1024, before the Pallas gate kernel (XLA's gate matmul "
                           "with its cuBLAS workspace)", "chained")
    lines += gate_routing_section(load("gate_routing_forms.json"))
    lines += shrink_sweep_section(load("tile_shrink_tuning_transposed_product.json"), "splits",
                                  "tokens per block and splits, with its product transposed (session 14)")
    lines += layer_section([load("meteora_layer_session13.json")],
                           "MeteoRA layer, the strategies issue 4's prefill targets compare after session 13, in one "
                           "run, routing in runs of 96 tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_miss_list.json")],
                           "MeteoRA layer with `fused`'s miss kernels walking the routing kernel's list of missed "
                           "tokens and its shrink's product transposed (session 13), N = 256, routing in runs of 96 "
                           "tokens, bfloat16 gates", "chained")
    lines += missed_add_section(load("missed_add_tuning_listed.json"),
                                ", session 13 (the passes walk the routing kernel's list of missed tokens)")
    lines += layer_section([load("meteora_layer_session12.json")],
                           "MeteoRA layer, every strategy after session 12 (issue 4's targets in one run), routing in "
                           "runs of 96 tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_decode_gate_tiles_bf16.json")],
                           "MeteoRA layer, decode with the gate read in steps with four in flight and, beyond 256 "
                           "adapters, the gate tile by its dtype; bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_decode_gate_tiles_f32.json")],
                           "The same, float32 gates", "chained")
    lines += decode_tuning_section(load("decode_tuning_gate_rows_stages.json"),
                                   "bfloat16 gates, N = 1024, 512-2048 gate rows with steps' loads in flight")
    lines += decode_tuning_section(load("decode_tuning_gate_stages.json"),
                                   "bfloat16 gates, N = 1024, steps' loads in flight (gate_num_stages)")
    lines += decode_tuning_section(load("decode_tuning_gate_columns_f32.json"),
                                   "float32 gates, N = 1024, gate columns, steps and loads in flight")
    lines += gate_prefill_section(load("gate_prefill_forms.json"))
    lines += layer_section([load("meteora_layer_shrink_stages_n28_n1024.json"),
                            load("meteora_layer_shrink_stages_n256.json")],
                           "MeteoRA layer with `fused`'s shrink reading A in 16-byte pieces, 3 loads in flight and one "
                           "split at 16384 tokens, routing in runs of 96 tokens, bfloat16 gates", "chained")
    lines += shrink_sweep_section(load("tile_shrink_tuning_one_split.json"), "num_stages",
                                  "loads in flight, A in 16-byte pieces")
    lines += shrink_sweep_section(load("tile_shrink_tuning_gathered.json"), "splits",
                                  "input splits, A in 16-byte pieces")
    lines += layer_section([load("meteora_layer_voter_chunks.json")],
                           "MeteoRA layer with `fused`'s tile routing counting votes 32 voters at a time, N = 256, "
                           "routing in runs of 96 tokens, bfloat16 gates", "chained")
    for chunk in (32, 16, 64):
        lines += tile_routing_section(load(f"tile_routing_tuning_voter_chunks_{chunk}.json"),
                                      f"votes counted {chunk} voters at a time (`chunk{chunk}`) against all at once")
    lines += tile_routing_section(load("tile_routing_tuning_flat_votes.json"),
                                  "votes against the tile's choices as one flat vector")
    lines += tile_routing_section(load("tile_routing_tuning.json"), "slot rounds only for voted adapters (kept out)")
    lines += layer_section([load("meteora_layer_decode_shared_rounds.json")],
                           "MeteoRA layer, decode at N = 1024 after the decode kernel took the routing kernel's "
                           "rounds (a NaN logit the largest)", "chained")
    lines += layer_section([load("meteora_layer_tile_routing.json")],
                           "MeteoRA layer with `fused`'s tile routing in one kernel (and the routing kernel), "
                           "routing in runs of 96 tokens, bfloat16 gates", "chained")
    lines += layer_section([load("meteora_layer_route_kernel.json")],
                           "MeteoRA layer with `fused` and `pallas` routing by one kernel, routing in runs of 96 "
                           "tokens, bfloat16 gates", "chained")
    lines += route_tuning_section(load("route_tuning_nan_rule.json"))
    lines += layer_section([load("meteora_layer_b_rows_in_gemm.json")],
                           "MeteoRA layer with `fused`, B rows gathered in the GEMM (64 x 256 tiles, 128-token routing "
                           "tiles), routing in runs of 96 tokens, bfloat16 gates", "chained")
    lines += slot_gather_section(load("routed_gemm_gather.json"), load("routed_gemm_tuning_bank.json"))
    lines += layer_section([load("meteora_layer_two_pass_misses.json")],
                           "MeteoRA layer with `fused`, the miss path in two passes, routing in runs of 96 tokens, "
                           "bfloat16 gates", "chained")
    lines += missed_two_pass_section(load("missed_add_tuning_two_pass.json"),
                                     load("missed_add_one_pass_same_run.json"))
    lines += missed_add_section(load("missed_add_tuning_session12.json"), ", session 12 (no misses against a few)")
    lines += missed_add_section(load("missed_add_tuning_block_in.json"), ", input steps and runs of 48 tokens")
    lines += missed_add_section(load("missed_add_tuning.json"))
    lines += layer_section([load("meteora_layer_fused_segments_gate_bf16.json")],
                           "MeteoRA layer with the `fused` strategy (routed GEMM), routing in runs, bfloat16 gates",
                           "chained")
    lines += layer_section([load("meteora_layer_fused_random.json")],
                           "MeteoRA layer with the `fused` strategy, random routing (its worst case)", "chained")
    lines += gemm_section(load("base_gemm_forms.json"), load("routed_gemm_tuning.json"),
                          load("tile_shrink_tuning.json"))
    lines += decode_tuning_section(load("decode_tuning_gate_bf16.json"), "bfloat16 gates, gate tiles")
    lines += decode_tuning_section(load("decode_tuning_shared_warps_bf16.json"),
                                   "bfloat16 gates, route_shrink and expand_add warps (then shared)")
    lines += decode_tuning_section(load("decode_tuning_gate_step_rows_bf16.json"),
                                   "bfloat16 gates, gate rows per step (route_shrink at 256 inputs, 4 warps)")
    lines += decode_tuning_section(load("decode_tuning_gate_warps_bf16.json"), "bfloat16 gates, gate warps")
    lines += tile_adapters_section(load("tile_adapters.json"))
    lines += layer_section([load("meteora_layer_decode.json")],
                           "MeteoRA layer, few-token cases after the decode gate's tiles moved (rows by N, read in "
                           "steps)", "chained")
    lines += gate_steps_section(load("decode_tuning_gate_steps.json"))
    lines += layer_section([load("meteora_layer_n28_decode_repeat.json")],
                           "MeteoRA layer, few-token cases repeated (N = 28; same code as above)", "chained")
    lines += layer_section([load("meteora_layer_fori_loop.json")],
                           "MeteoRA layer, previous run (`dense_fused` is today's `dense`)", "fori_loop")
    lines += decode_tuning_section(load("decode_tuning.json"))
    lines += segment_tuning_section(load("segment_tuning.json"))
    lines += segment_tuning_section(load("segment_tuning_block_tokens.json"),
                                    "Pallas prefill kernels, block_tokens alone at 2 and 4 warps")
    lines += tuning_section(load("pallas_tuning.json"))
    lines += pipeline_section(load("train_pipeline.json"))
    lines += bfloat16_gates_section(load("train_pipeline_gates_bf16_check.json"),
                                    load("train_pipeline_gates_bf16_check_validation.json"))
    lines += fused_tiles_section(load("train_pipeline_fused_frequency.json"),
                                 load("train_pipeline_fused_frequency_validation.json"), "the 8 most chosen")
    lines += fused_tiles_section(load("train_pipeline_fused_tiles.json"),
                                 load("train_pipeline_fused_tiles_validation.json"),
                                 "the first 8 distinct in index order, the first rule")
    lines += gate_strategy_section(load("train_gates_strategy.json"))
    lines += training_through_fused_section([
        ("auto as shipped", load("train_pipeline_gates_bf16_check.json")),
        ("`fused`, gradients through plain-JAX forms (per-token adapter copies)",
         load("train_pipeline_fused_frequency.json")),
        ("`fused`, miss path's gradients by XLA while loops", load("train_pipeline_fused_backward.json")),
        ("`fused`, miss path's input gradients by a kernel", load("train_pipeline_fused_backward_kernel.json")),
    ])
    lines += workspace_section(load("meteora_layer_workspace_n1024.json"))
    lines += shrink_sweep_section(load("tile_shrink_tuning_256.json"), "block_tokens", "tokens per program")
    lines += shrink_sweep_section(load("tile_shrink_tuning_transposed.json"), "transpose_a", "the layout of A")
    lines += pallas_backward_section(load("pallas_backward.json"))
    lines += layer_section([load("meteora_layer_barrier.json")],
                           "MeteoRA layer, `pallas` after the in-place kernels' barrier, routing in runs of 96 tokens, "
                           "bfloat16 gates", "chained")
    return "\n".join(lines)


def main() -> None:
    (HERE / "RESULTS.md").write_text(render())


if __name__ == "__main__":
    main()
