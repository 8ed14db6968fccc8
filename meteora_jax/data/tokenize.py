"""Task records to training arrays with per-token task labels, and a resumable batch iterator.

tokenize_records gives a dict of numpy arrays, rows padded on the right to max_length:
  tokens      int32 [B, L]  token ids (0 on padding)
  segment_ids int32 [B, L]  1, 2, ... per example inside a row, 0 on padding (one segment per row
                            without packing)
  loss_mask   bool  [B, L]  True on response tokens: the LM loss predicts token t from tokens < t
                            where loss_mask[t]
  task_ids    int32 [B, L]  gate target: the task index (position in task_names) of every real token,
                            prompt and response alike; -1 on padding

A plain record's tokens all get the index of its task. A record with prompt_spans/response_spans
(composite records) labels each token by the span holding its first character; a token outside
every span (a separator, a chat-template wrapper) takes the task of the next span, and after the
last span the task of the last one.

Without a chat template the prompt is tokenized with the tokenizer's special tokens (its BOS, if
any) and the response after `response_separator` (left out when the prompt ends or the response
starts with whitespace), followed by EOS. With chat_template=True the prompt is the user turn
rendered with add_generation_prompt=True and the response is the rest of the rendered
user + assistant conversation, end-of-turn tokens included. Prompt and response are tokenized
separately, so the prompt tokens are those a model sees at inference.

An example longer than max_length loses prompt tokens from the left; if the response alone does not
fit, it keeps one prompt token and loses response tokens from the right. Both are counted in the
TokenizeStats that return_stats=True returns, and logged.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizeStats:
    examples: int
    rows: int
    real_tokens: int
    truncated: int  # examples that lost prompt tokens
    response_truncated: int  # examples whose response alone did not fit (also counted in truncated)


def _columns(records: Any) -> dict[str, list[Any]]:
    """prompt, response and task columns, and span columns (empty lists where absent) if any record has spans."""
    if hasattr(records, "column_names"):  # datasets.Dataset: column access is much faster than rows
        names = records.column_names
        column = lambda k: list(records[k]) if k in names else [None] * len(records)
    else:
        rows = list(records)
        column = lambda k: [r.get(k) for r in rows]
    cols = {k: column(k) for k in ("prompt", "response", "task")}
    for k in ("prompt", "response"):
        bad = next((i for i, v in enumerate(cols[k]) if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"record {bad}: {k!r} must be a string, got {cols[k][bad]!r:.60}")
    spans = {k: column(k) for k in ("prompt_spans", "response_spans")}
    if any(any(v) for v in spans.values()):
        cols.update({k: [s or [] for s in v] for k, v in spans.items()})
    return cols


def _render(prompts, responses, tokenizer, chat_template: bool, separator: str):
    """Prompt texts, response texts and where the raw prompt / response start inside them."""
    prompt_texts, response_texts, prompt_at, response_at = [], [], [], []
    for prompt, response in zip(prompts, responses):
        if chat_template:
            user = {"role": "user", "content": prompt}
            head = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": response}], tokenize=False)
            if not full.startswith(head):
                raise ValueError("the chat template's rendering of the user turn is not a prefix of the conversation")
            tail = full[len(head) :]
            prompt_texts.append(head)
            response_texts.append(tail)
            prompt_at.append(head.find(prompt))
            response_at.append(tail.find(response))
        else:
            sep = "" if prompt[-1:].isspace() or response[:1].isspace() else separator
            prompt_texts.append(prompt)
            response_texts.append(sep + response)
            prompt_at.append(0)
            response_at.append(len(sep))
    return prompt_texts, response_texts, prompt_at, response_at


def _span_labels(offsets, text_len: int, spans, at: int, task_index: Mapping[str, int], what: str) -> np.ndarray:
    """Per-token task index from character spans (see the module docstring)."""
    if at < 0:
        raise ValueError(f"the {what} text was not found verbatim in its rendering; cannot place its spans")
    chars = np.full(max(text_len, 1), -1, np.int32)
    for span in spans:
        chars[at + span["start"] : at + span["end"]] = _index(task_index, span["task"])
    covered = np.flatnonzero(chars >= 0)
    if covered.size == 0:
        raise ValueError(f"no {what} span covers any character")
    nearest = np.minimum(np.searchsorted(covered, np.arange(chars.size)), covered.size - 1)
    chars = chars[covered[nearest]]
    starts = np.array([s for s, _ in offsets], np.int64).reshape(-1)
    return chars[np.minimum(starts, chars.size - 1)]


def _index(task_index: Mapping[str, int], task: Any) -> int:
    try:
        return task_index[task]
    except KeyError:
        raise ValueError(f"task {task!r} is not in task_names {list(task_index)}") from None


def _pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, no row longer than max_length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            rows.append([i])
            room, row = max_length - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(j)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def tokenize_records(
    records: Any,
    tokenizer: Any,
    task_names: Sequence[str],
    max_length: int,
    *,
    chat_template: bool = False,
    pack: bool = False,
    response_separator: str = " ",
    add_eos: bool = True,
    return_stats: bool = False,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], TokenizeStats]:
    """Arrays {tokens, segment_ids, loss_mask, task_ids} [B, max_length] of `records` (see the module docstring).

    records: a datasets.Dataset or an iterable of {prompt, response, task} mappings, optionally with
    prompt_spans / response_spans. tokenizer: a fast transformers tokenizer (offset mappings are
    needed for span records). task_names: task index = position in this list. pack: several
    examples per row, best fit, rows in a deterministic order; otherwise one example per row in
    record order.
    """
    if max_length < 2:
        raise ValueError(f"{max_length=} must be >= 2")
    task_index = {t: i for i, t in enumerate(task_names)}
    cols = _columns(records)
    n = len(cols["prompt"])
    if n == 0:
        raise ValueError("no records to tokenize")
    spans = "prompt_spans" in cols
    prompt_texts, response_texts, prompt_at, response_at = _render(
        cols["prompt"], cols["response"], tokenizer, chat_template, response_separator
    )
    enc_p = tokenizer(prompt_texts, add_special_tokens=not chat_template, return_offsets_mapping=spans)
    enc_r = tokenizer(response_texts, add_special_tokens=False, return_offsets_mapping=spans)
    eos = tokenizer.eos_token_id if add_eos and not chat_template else None

    examples = []  # (tokens, labels, n_prompt) per record
    truncated = response_truncated = 0
    for i in range(n):
        p_ids, r_ids = list(enc_p["input_ids"][i]), list(enc_r["input_ids"][i])
        if eos is not None:
            r_ids.append(eos)
        if spans and (cols["prompt_spans"][i] or cols["response_spans"][i]):
            p_lab = _span_labels(enc_p["offset_mapping"][i], len(prompt_texts[i]), cols["prompt_spans"][i],
                                 prompt_at[i], task_index, "prompt")
            r_lab = _span_labels(enc_r["offset_mapping"][i], len(response_texts[i]), cols["response_spans"][i],
                                 response_at[i], task_index, "response")
            if eos is not None:
                r_lab = np.append(r_lab, r_lab[-1] if r_lab.size else p_lab[-1])
        else:
            task = _index(task_index, cols["task"][i])
            p_lab = np.full(len(p_ids), task, np.int32)
            r_lab = np.full(len(r_ids), task, np.int32)
        if len(p_ids) + len(r_ids) > max_length:
            truncated += 1
            if len(r_ids) > max_length - 1:
                response_truncated += 1
                r_ids, r_lab = r_ids[: max_length - 1], r_lab[: max_length - 1]
            keep = max_length - len(r_ids)
            # A leading BOS stays: inference prompts always start with it.
            head = 1 if p_ids and p_ids[0] == getattr(tokenizer, "bos_token_id", None) and keep > 1 else 0
            p_ids = p_ids[:head] + p_ids[len(p_ids) - keep + head :]
            p_lab = np.concatenate([p_lab[:head], p_lab[len(p_lab) - keep + head :]])
        examples.append((p_ids + r_ids, np.concatenate([p_lab, r_lab]), len(p_ids)))

    lengths = [len(e[0]) for e in examples]
    layout = _pack(lengths, max_length) if pack else [[i] for i in range(n)]
    rows = len(layout)
    out = {
        "tokens": np.zeros((rows, max_length), np.int32),
        "segment_ids": np.zeros((rows, max_length), np.int32),
        "loss_mask": np.zeros((rows, max_length), bool),
        "task_ids": np.full((rows, max_length), -1, np.int32),
    }
    for row, members in enumerate(layout):
        pos = 0
        for segment, i in enumerate(members, start=1):
            ids, labels, n_prompt = examples[i]
            end = pos + len(ids)
            out["tokens"][row, pos:end] = ids
            out["segment_ids"][row, pos:end] = segment
            out["loss_mask"][row, pos + n_prompt : end] = True
            out["task_ids"][row, pos:end] = labels
            pos = end

    stats = TokenizeStats(examples=n, rows=rows, real_tokens=sum(lengths), truncated=truncated,
                          response_truncated=response_truncated)
    if truncated:
        log.warning("%d of %d examples longer than max_length=%d were truncated (%d of them in the response)",
                    truncated, n, max_length, response_truncated)
    return (out, stats) if return_stats else out


def _row_tasks(task_ids: np.ndarray) -> np.ndarray:
    """The most frequent task of each row's real tokens (-1 for an empty row)."""
    rows, width = task_ids.shape[0], int(task_ids.max(initial=-1)) + 2
    flat = (np.arange(rows, dtype=np.int64)[:, None] * width + task_ids + 1).ravel()
    counts = np.bincount(flat, minlength=rows * width).reshape(rows, width)
    counts[:, 0] = 0  # padding
    return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1) - 1, -1)


def epoch_order(arrays: Mapping[str, np.ndarray], seed: int, epoch: int, *, task_balanced: bool = False) -> np.ndarray:
    """Row indices of one epoch, a pure function of (rows, seed, epoch).

    task_balanced: every draw picks a task uniformly (a row's task is the most frequent one among
    its tokens), then one of that task's rows uniformly, with replacement; as many draws as rows.
    """
    rows = len(arrays["tokens"])
    rng = np.random.default_rng([seed, epoch])
    if not task_balanced:
        return rng.permutation(rows)
    row_task = _row_tasks(np.asarray(arrays["task_ids"]))
    groups = [np.flatnonzero(row_task == t) for t in np.unique(row_task[row_task >= 0])]
    if not groups:
        raise ValueError("task_balanced needs rows with task labels")
    pick = rng.integers(len(groups), size=rows)
    order = np.empty(rows, np.int64)
    for g, members in enumerate(groups):
        chosen = pick == g
        order[chosen] = members[rng.integers(len(members), size=int(chosen.sum()))]
    return order


def batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int,
    epoch: int,
    task_balanced: bool = False,
    *,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch in a deterministic order given (seed, epoch), from batch `start` on.

    Full batches only: max(rows // batch_size, 1) per epoch (fewer rows than batch_size repeat
    rows to fill one batch). A resumed run that passes the same (seed, epoch) and the number of
    batches it already took as `start` sees the same data as an uninterrupted one.
    """
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    order = epoch_order(arrays, seed, epoch, task_balanced=task_balanced)
    count = max(len(order) // batch_size, 1)
    order = np.resize(order, count * batch_size)
    for b in range(start, count):
        index = order[b * batch_size : (b + 1) * batch_size]
        yield {k: np.asarray(v)[index] for k, v in arrays.items()}


def batch_stream(
    arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, *, task_balanced: bool = False, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Batches across epochs without end, from global batch number `start` on.

    Each epoch's order is computed once and depends only on (seed, epoch), so a run resumed at
    `start` reads exactly the batches an uninterrupted run would.
    """
    per_epoch = max(len(arrays["tokens"]) // batch_size, 1)
    epoch, index = divmod(start, per_epoch)
    while True:
        yield from batches(arrays, batch_size, seed, epoch, task_balanced, start=index)
        epoch, index = epoch + 1, 0
