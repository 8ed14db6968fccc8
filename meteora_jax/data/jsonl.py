"""JSON-lines task files: one {"prompt": ..., "response": ...} object per line, as task records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets



def read_jsonl_records(path: str | os.PathLike, task: str | None = None) -> list[dict[str, str]]:
    """{prompt, response, task, subtask=""} records of a JSONL file; task defaults to the file stem.

    Blank lines are skipped; other keys on a line are ignored. A line that is not a JSON object with
    string "prompt" and "response" raises ValueError naming the file and the (1-based) line.
    """
    path = Path(path)
    task = path.stem if task is None else task
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e.msg}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in ("prompt", "response"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{lineno}: {key!r} must be a string, got {row.get(key)!r:.60}")
            records.append({"prompt": row["prompt"], "response": row["response"], "task": task, "subtask": ""})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def load_jsonl(path: str | os.PathLike, task: str | None = None) -> datasets.Dataset:
    """read_jsonl_records as a datasets.Dataset."""
    import datasets  # only here: machines without `datasets` still train from prepared arrays

    return datasets.Dataset.from_list(read_jsonl_records(path, task))
