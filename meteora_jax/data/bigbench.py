"""BIG-bench JSON tasks as {prompt, response, task, subtask} records with a fixed train/test split.

A task directory holds a task.json and/or subtask directories with their own task.json
(abstract_narrative_understanding/4_distractors/task.json, ...); every file that has examples is
one subtask, named by its directory relative to the task ("" for the top-level file), and all
subtasks are mixed.

The prompt is what BIG-bench's own JSON tasks build for a zero-shot query (bigbench/api/json_task.py):
task_prefix, example_input_prefix (default "\\nQ: ") + input, for multiple-choice examples (those with
target_scores) where append_choices_to_input (default True) the choices, sorted and then permuted by
numpy's RandomState(42) as BIG-bench does, each after choice_prefix (default "\\n  choice: "), then
example_output_prefix (default "\\nA: "); the whole prompt stripped. The response is the top-scoring
choice of a multiple-choice example (the first one on a tie) and otherwise the first target.

Format quirks of the real files (bigbench==1.0.0) handled here:
- contextual_parametric_knowledge_conflicts sets append_choices_to_input to the string "false";
  BIG-bench itself reads it as truthy, here it means False.
- strategyqa has both target ("Yes. <explanation>") and target_scores ({"Yes": 1, "No": 0}); the
  multiple-choice answer wins (prefer_target=True takes the target instead).
- reasoning_about_colored_objects has tied top scores ("3" and "three"): the first one is taken.
- object_counting has list targets (["three", "3"]) and an unused "prefix" key.
- Parent task.json files (logical_deduction/task.json, ...) carry no examples.
- logical_deduction, tracking_shuffled_objects and others set append_choices_to_input False, so the
  same input can appear with different answers (the question is implied by the choices that
  BIG-bench scores); append_choices=True forces the choices into every multiple-choice prompt.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

# The 20 MeteoRA BIG-bench tasks of the shared data directory (see fetch_bigbench to download them).
BIGBENCH_TASKS = (
    "abstract_narrative_understanding",
    "contextual_parametric_knowledge_conflicts",
    "cs_algorithms",
    "disfl_qa",
    "elementary_math_qa",
    "epistemic_reasoning",
    "formal_fallacies_syllogisms_negation",
    "goal_step_wikihow",
    "language_identification",
    "linguistics_puzzles",
    "logical_deduction",
    "object_counting",
    "play_dialog_same_or_different",
    "question_selection",
    "reasoning_about_colored_objects",
    "strategyqa",
    "tracking_shuffled_objects",
    "unit_conversion",
    "vitaminc_fact_verification",
    "winowhy",
)

BIGBENCH_CHOICE_SEED = 42  # BIG-bench's default random_seed for the choice permutation
SPLIT_SEED = 42

_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_DEFAULT_CHOICE_PREFIX = "\n  choice: "


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{where}: append_choices_to_input={value!r} is not a boolean")


@functools.lru_cache(maxsize=None)
def _choice_order(n: int, seed: int) -> tuple[int, ...]:
    # RandomState.permutation shuffles an index range and an array of n items identically.
    return tuple(int(i) for i in np.random.RandomState(seed).permutation(n))


def _top_choice(scores: Mapping[str, float]) -> str:
    best = max(scores.values())
    return next(k for k, v in scores.items() if v == best)


def format_example(
    example: Mapping[str, Any],
    task_data: Mapping[str, Any],
    *,
    append_choices: bool | None = None,
    prefer_target: bool = False,
    choice_seed: int = BIGBENCH_CHOICE_SEED,
    where: str = "example",
) -> tuple[str, str]:
    """(prompt, response) of one BIG-bench example under its task file's format keys."""
    text = example.get("input")
    if not isinstance(text, str):
        raise ValueError(f"{where}: 'input' must be a string, got {type(text).__name__}")
    scores = example.get("target_scores")
    target = example.get("target")
    if scores is None and target is None:
        raise ValueError(f"{where}: needs 'target' or 'target_scores'")
    if scores is not None and (not isinstance(scores, Mapping) or not scores):
        raise ValueError(f"{where}: 'target_scores' must be a non-empty object")
    if isinstance(target, list):
        if not target or not isinstance(target[0], str):
            raise ValueError(f"{where}: 'target' list must start with a string")
        target = target[0]
    elif target is not None and not isinstance(target, str):
        raise ValueError(f"{where}: 'target' must be a string or a list of strings")

    prompt = str(task_data.get("task_prefix", "")) + task_data.get("example_input_prefix", _DEFAULT_INPUT_PREFIX) + text
    if scores is not None:
        append = append_choices
        if append is None:
            append = _as_bool(task_data.get("append_choices_to_input", True), where)
        if append:
            choices = sorted(scores)
            choice_prefix = task_data.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
            prompt += "".join(choice_prefix + choices[i] for i in _choice_order(len(choices), choice_seed))
    prompt += task_data.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    if scores is not None and not (prefer_target and target is not None):
        response = _top_choice(scores)
    else:
        response = target
    return prompt.strip(), response.strip()


def _task_files(task_dir: Path) -> list[Path]:
    files = sorted(task_dir.rglob("task.json"), key=lambda p: p.parent.relative_to(task_dir).parts)
    if not files:
        raise FileNotFoundError(f"no task.json under {task_dir}")
    return files


def load_task_records(
    task_dir: str | os.PathLike,
    *,
    append_choices: bool | None = None,
    prefer_target: bool = False,
) -> list[dict[str, str]]:
    """Every distinct (prompt, response) record of a BIG-bench task, subtask by subtask in file order.

    Records are {prompt, response, task, subtask}; task is the directory name, subtask the
    subdirectory of its task.json ("" for the task's own file). Duplicates (same prompt and
    response, across subtasks too) are dropped, the first kept.
    """
    task_dir = Path(task_dir)
    task = task_dir.name
    seen: set[tuple[str, str]] = set()
    records = []
    for path in _task_files(task_dir):
        with open(path, encoding="utf-8") as f:
            try:
                task_data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from e
        examples = task_data.get("examples") or []
        if not isinstance(examples, list):
            raise ValueError(f"{path}: 'examples' must be a list")
        subtask = path.parent.relative_to(task_dir).as_posix()
        subtask = "" if subtask == "." else subtask
        for i, example in enumerate(examples):
            where = f"{path} example {i}"
            if not isinstance(example, Mapping):
                raise ValueError(f"{where}: not an object")
            pair = format_example(example, task_data, append_choices=append_choices, prefer_target=prefer_target,
                                  where=where)
            if pair in seen:
                continue
            seen.add(pair)
            records.append({"prompt": pair[0], "response": pair[1], "task": task, "subtask": subtask})
    if not records:
        raise ValueError(f"{task_dir}: no examples in any task.json")
    return records


def split_records(
    records: Sequence[Mapping[str, Any]],
    *,
    seed: int = SPLIT_SEED,
    test_fraction: float = 0.2,
    min_test: int = 16,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (train, test) split per subtask.

    Each subtask's records are shuffled with `seed`; the last max(test_fraction of them,
    min_test // number of subtasks) are test, but never more than half of a subtask's records
    (so tiny subtasks still train). Subtasks keep their first-appearance order.
    """
    by_subtask: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_subtask.setdefault(r["subtask"], []).append(dict(r))
    train, test = [], []
    for rows in by_subtask.values():
        n = len(rows)
        n_test = min(max(int(n * test_fraction), min_test // len(by_subtask)), n // 2)
        order = np.random.default_rng(seed).permutation(n)
        shuffled = [rows[i] for i in order]
        train.extend(shuffled[: n - n_test])
        test.extend(shuffled[n - n_test :])
    return train, test


def load_bigbench_task(
    task_dir: str | os.PathLike,
    *,
    seed: int = SPLIT_SEED,
    test_fraction: float = 0.2,
    min_test: int = 16,
    append_choices: bool | None = None,
    prefer_target: bool = False,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) datasets.Dataset of one BIG-bench task directory; see load_task_records and split_records."""
    records = load_task_records(task_dir, append_choices=append_choices, prefer_target=prefer_target)
    train, test = split_records(records, seed=seed, test_fraction=test_fraction, min_test=min_test)
    import datasets  # only here: machines without `datasets` still train from prepared arrays

    return datasets.Dataset.from_list(train), datasets.Dataset.from_list(test)


def load_bigbench(
    root: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, tuple[datasets.Dataset, datasets.Dataset]]:
    """{task: (train, test)} for `tasks` (default: every task directory under root, sorted)."""
    root = Path(root)
    if tasks is None:
        tasks = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.rglob("task.json")))
    missing = [t for t in tasks if not (root / t).is_dir()]
    if missing:
        raise FileNotFoundError(f"tasks {missing} not found under {root}")
    return {t: load_bigbench_task(root / t, **kwargs) for t in tasks}
