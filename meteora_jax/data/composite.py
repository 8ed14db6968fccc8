"""Composite-n prompts (MeteoRA, section 4): the test questions of n tasks in one numbered prompt.

Each composite example asks n questions, question i from task i, after `num_shots` worked composite
examples built from the tasks' train splits:

    Answer every numbered question; give the answers as a numbered list in the same order.

    Questions:
    1. <train question of task 1>
    ...
    Answers:
    1. <its answer>
    ...

    Questions:
    1. <test question of task 1>
    ...
    Answers:

The expected response is "1. <answer 1>\\n2. <answer 2>...". parse_composite_answers reads answer i
from a model's output with the paper's regex "{i}. (.*?)(\\n|$)" on the lowercased text.

Every record carries character spans ({start, end, task}) over its prompt and response: each
question and each answer, few-shot ones included, is labelled with its task, so tokenize_records
can give every token of question i the task index of task i.

Task lists: COMPOSITE_3 and COMPOSITE_5 are the paper's. The paper's composite-10 also used
news_commentary_de and alpaca, which are not among our BIG-bench task files; COMPOSITE_10 here is
COMPOSITE_5 plus five available tasks with short prompts and one-line answers: object_counting,
reasoning_about_colored_objects, unit_conversion, winowhy, epistemic_reasoning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

COMPOSITE_3 = ("logical_deduction", "question_selection", "strategyqa")
COMPOSITE_5 = COMPOSITE_3 + ("abstract_narrative_understanding", "goal_step_wikihow")
# Substitutes for the paper's tasks that we lack (news_commentary_de, alpaca, ...): see the module docstring.
COMPOSITE_10 = COMPOSITE_5 + (
    "object_counting",
    "reasoning_about_colored_objects",
    "unit_conversion",
    "winowhy",
    "epistemic_reasoning",
)

INSTRUCTION = "Answer every numbered question; give the answers as a numbered list in the same order."


class _SpannedText:
    """Text built piece by piece, remembering which task each labelled piece belongs to."""

    def __init__(self):
        self.parts: list[str] = []
        self.spans: list[dict[str, Any]] = []
        self.length = 0

    def add(self, text: str, task: str | None = None) -> None:
        if task is not None:
            self.spans.append({"start": self.length, "end": self.length + len(text), "task": task})
        self.parts.append(text)
        self.length += len(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _pairs(rows: Any) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a datasets.Dataset or a sequence of records."""
    if hasattr(rows, "column_names"):
        return list(zip(rows["prompt"], rows["response"]))
    return [(r["prompt"], r["response"]) for r in rows]


def _one_line(answer: str) -> str:
    return " ".join(answer.split("\n")).strip()


def _add_questions(out: _SpannedText, tasks: Sequence[str], questions: Sequence[str]) -> None:
    out.add("Questions:\n")
    for i, (task, q) in enumerate(zip(tasks, questions), start=1):
        out.add(f"{i}. {q}", task)
        out.add("\n")
    out.add("Answers:\n")


def _add_answers(out: _SpannedText, tasks: Sequence[str], answers: Sequence[str]) -> None:
    for i, (task, a) in enumerate(zip(tasks, answers), start=1):
        if i > 1:
            out.add("\n")
        out.add(f"{i}. {a}", task)


def build_composite(
    data: Mapping[str, tuple[Any, Any]],
    tasks: Sequence[str],
    *,
    num_examples: int | None = None,
    num_shots: int = 2,
    seed: int = 0,
    instruction: str = INSTRUCTION,
) -> list[dict[str, Any]]:
    """Composite-n records for `tasks` (n = len(tasks), any list) from {task: (train, test)} splits.

    data: as load_bigbench returns (datasets or record lists). Test question k of task t is the
    k-th of a seeded permutation of t's test split, so the examples use distinct questions;
    num_examples defaults to the smallest test split. Each example's num_shots worked examples
    are distinct train records of every task, drawn with the same seeded generator.

    Returns records {prompt, response, task="composite", subtask="composite-n", tasks, answers,
    prompt_spans, response_spans}; a span is {start, end, task} over the prompt or response text.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("build_composite needs at least one task")
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"no data for tasks {missing}")
    train = {t: _pairs(data[t][0]) for t in tasks}
    test = {t: _pairs(data[t][1]) for t in tasks}
    smallest = min(len(test[t]) for t in tasks)
    num_examples = smallest if num_examples is None else num_examples
    if num_examples > smallest:
        raise ValueError(f"num_examples={num_examples} exceeds the smallest test split ({smallest})")
    short = [t for t in tasks if len(train[t]) < num_shots]
    if short:
        raise ValueError(f"tasks {short} have fewer than num_shots={num_shots} train records")

    rng = np.random.default_rng(seed)
    test_order = {t: rng.permutation(len(test[t]))[:num_examples] for t in tasks}
    records = []
    for k in range(num_examples):
        shots = {t: rng.choice(len(train[t]), size=num_shots, replace=False) for t in tasks}
        prompt = _SpannedText()
        prompt.add(instruction + "\n\n")
        for s in range(num_shots):
            pairs = [train[t][shots[t][s]] for t in tasks]
            _add_questions(prompt, tasks, [q for q, _ in pairs])
            _add_answers(prompt, tasks, [_one_line(a) for _, a in pairs])
            prompt.add("\n\n")
        pairs = [test[t][test_order[t][k]] for t in tasks]
        answers = [_one_line(a) for _, a in pairs]
        _add_questions(prompt, tasks, [q for q, _ in pairs])
        response = _SpannedText()
        _add_answers(response, tasks, answers)
        records.append(
            {
                "prompt": prompt.text,
                "response": response.text,
                "task": "composite",
                "subtask": f"composite-{len(tasks)}",
                "tasks": tasks,
                "answers": answers,
                "prompt_spans": prompt.spans,
                "response_spans": response.spans,
            }
        )
    return records


def parse_composite_answers(output: str, n: int, *, strict: bool = False) -> list[str]:
    """The n answers of a composite output: answer i is group 1 of the paper's regex
    "{i}. (.*?)(\\n|$)" searched in the lowercased output, stripped; "" where it does not match.

    strict=True escapes the dot and anchors the number at a line start, so that "23 apples" in
    answer 1 is not read as answer 2.
    """
    text = output.lower()
    answers = []
    for i in range(1, n + 1):
        pattern = rf"(?:^|\n){i}\. (.*?)(?:\n|$)" if strict else f"{i}. (.*?)(\n|$)"
        match = re.search(pattern, text)
        answers.append(match.group(1).strip() if match else "")
    return answers


def score_composite(output: str, answers: Sequence[str], *, strict: bool = False) -> list[bool]:
    """Per question: the parsed answer equals the expected one (both lowercased and stripped)."""
    parsed = parse_composite_answers(output, len(answers), strict=strict)
    return [p == a.lower().strip() for p, a in zip(parsed, answers)]
