"""Task data for MeteoRA: BIG-bench and JSONL tasks as records, composite-n prompts, token arrays with task labels."""

from meteora_jax.data.bigbench import (
    BIGBENCH_TASKS,
    format_example,
    load_bigbench,
    load_bigbench_task,
    load_task_records,
    split_records,
)
from meteora_jax.data.composite import (
    COMPOSITE_3,
    COMPOSITE_5,
    COMPOSITE_10,
    build_composite,
    parse_composite_answers,
    score_composite,
)
from meteora_jax.data.jsonl import load_jsonl, read_jsonl_records
from meteora_jax.data.tokenize import TokenizeStats, batch_stream, batches, epoch_order, tokenize_records

_FETCH = ("download_sdist", "extract_tasks")


def __getattr__(name):
    # Loaded on first use, so that `python -m meteora_jax.data.fetch_bigbench` runs a module not imported yet.
    if name in _FETCH:
        import importlib

        return getattr(importlib.import_module("meteora_jax.data.fetch_bigbench"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BIGBENCH_TASKS",
    "COMPOSITE_3",
    "COMPOSITE_5",
    "COMPOSITE_10",
    "TokenizeStats",
    "batch_stream",
    "batches",
    "build_composite",
    "download_sdist",
    "epoch_order",
    "extract_tasks",
    "format_example",
    "load_bigbench",
    "load_bigbench_task",
    "load_jsonl",
    "load_task_records",
    "parse_composite_answers",
    "read_jsonl_records",
    "score_composite",
    "split_records",
    "tokenize_records",
]
