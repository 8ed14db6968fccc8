"""What the block-size sweeps share: the --out argument, bf16 GEMM operands, one row per configuration (or the
error of one the kernel rejects), the fastest row, and the JSON they rewrite after each shape."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
from meteora_layer import environment
from result_path import default_result_path


def output_path(filename: str) -> Path:
    """--out, else result_path's default for `filename`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args().out or default_result_path(filename)


def gemm_operands(keys, tokens: int, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
    """x [T, I] unit normal (from keys[0]) and w [I, O] scaled by I^-1/2 (from keys[1]), both bfloat16."""
    x = jax.random.normal(keys[0], (tokens, in_features), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (in_features, out_features), jnp.float32) / in_features**0.5).astype(jnp.bfloat16)
    return x, w


def measured(row: dict, measure: Callable[[], dict]) -> dict:
    """row plus what measure() returns, or the error of a configuration the kernel rejects (recorded, not fatal)."""
    try:
        row.update(measure())
    except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return row


def sweep(row: dict, field: str, configs: Iterable, measure: Callable[[object], dict]) -> list[dict]:
    """One `measured` row per configuration: `row` plus field = repr(config)."""
    return [measured({**row, field: repr(config)}, lambda config=config: measure(config)) for config in configs]


def fastest(rows: list[dict]) -> dict | None:
    timed_rows = [r for r in rows if r.get("kernel_ms")]
    return min(timed_rows, key=lambda r: r["kernel_ms"]) if timed_rows else None


def write_rows(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
