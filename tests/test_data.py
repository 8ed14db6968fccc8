"""The task-data pipeline: BIG-bench and JSONL records, composite-n prompts, token arrays, batches, fetching."""

import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from meteora_jax.data import (
    BIGBENCH_TASKS,
    COMPOSITE_3,
    COMPOSITE_5,
    COMPOSITE_10,
    batches,
    build_composite,
    download_sdist,
    extract_tasks,
    fetch_bigbench,
    format_example,
    load_bigbench,
    load_bigbench_task,
    load_jsonl,
    load_task_records,
    parse_composite_answers,
    score_composite,
    tokenize_records,
)

FIXTURES = Path(__file__).parent / "fixtures" / "bigbench"
REAL_BIGBENCH = Path(__file__).parents[2] / "shared" / "data" / "bigbench"


def _record(task, index=0, subtask=None):
    records = load_task_records(FIXTURES / task)
    if subtask is not None:
        records = [r for r in records if r["subtask"] == subtask]
    return records[index]


def _write_task(path: Path, examples, **keys):
    path.mkdir(parents=True, exist_ok=True)
    (path / "task.json").write_text(json.dumps({"name": path.name, **keys, "examples": examples}))


class CharTokenizer:
    """A character-level stand-in for a fast tokenizer: id = code point + 3, BOS 1, EOS 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True, return_offsets_mapping=False):
        ids, offsets = [], []
        for text in texts:
            head = [1] if add_special_tokens else []
            ids.append(head + [ord(c) + 3 for c in text])
            offsets.append([(0, 0)] * len(head) + [(k, k + 1) for k in range(len(text))])
        return {"input_ids": ids, "offset_mapping": offsets} if return_offsets_mapping else {"input_ids": ids}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + "<assistant>" if add_generation_prompt else text

    def decode(self, ids):
        return "".join({1: "<s>", 2: "</s>"}.get(int(i)) or chr(int(i) - 3) for i in ids)


@pytest.fixture(scope="session")
def fixture_data():
    return load_bigbench(FIXTURES)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """The SmolLM2 tokenizer: from the converted checkpoint when there is one, else read from the GGUF."""
    import transformers

    from meteora_jax.embedded import cache_dir

    converted = cache_dir() / "SmolLM2-135M-Instruct"
    if (converted / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(str(converted))
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


# BIG-bench loading


def test_prompt_default_prefixes_and_multiple_choice_answer_over_target():
    # strategyqa: no format keys (defaults "\nQ: ", "\nA: "), target and target_scores both given.
    r = _record("strategyqa")
    assert r == {
        "prompt": "Q: Is it common to see frost during some college commencements?\nA:",
        "response": "Yes",
        "task": "strategyqa",
        "subtask": "",
    }
    example = json.loads((FIXTURES / "strategyqa" / "task.json").read_text())["examples"][0]
    _, response = format_example(example, {}, prefer_target=True)
    assert response.startswith("Yes. College commencement ceremonies")


def test_prompt_append_choices_string_false_and_task_prefix():
    # contextual_parametric_knowledge_conflicts: append_choices_to_input is the string "false".
    r = _record("contextual_parametric_knowledge_conflicts")
    assert r["prompt"] == (
        "What is the answer to the question, assuming the context is true.\n\n\n"
        "Question: who was the guy that played the predator?\nContext: Owen Hart\nAnswer:"
    )
    assert r["response"] == "Owen Hart"


def test_prompt_list_target():
    r = _record("object_counting")
    assert r["prompt"] == "Q: I have a clarinet, a violin, and a flute. How many musical instruments do I have?\nA:"
    assert r["response"] == "three"


def test_prompt_subtask_with_task_prefix_and_no_choices():
    r = _record("logical_deduction", subtask="three_objects")
    assert r["prompt"] == (
        "The following paragraphs each describe a set of three objects arranged in a fixed order. The statements "
        "are logically consistent within each paragraph.\n\nOn a shelf, there are three books: a black book, an "
        "orange book, and a blue book. The blue book is to the right of the orange book. The orange book is to the "
        "right of the black book."
    )
    assert r["response"] == "The black book is the leftmost."
    assert r["task"] == "logical_deduction"


def test_prompt_default_choices_in_bigbench_order():
    r = _record("goal_step_wikihow", subtask="goal_inference")
    assert r["prompt"] == (
        "Q: The most reasonable goal of 'Have the butcher make them' is \n"
        "  choice: Buy Microfiber Towels\n  choice: Buy iBooks on a Mac\n  choice: Buy Burger Patties\n"
        "  choice: Buy Stuff on Sweatcoin on iPhone or iPad\nA:"
    )
    assert r["response"] == "Buy Burger Patties"


def test_prompt_explicit_append_choices_and_custom_prefixes():
    r = _record("language_identification")
    assert r["prompt"] == (
        "Given a sentence, select the correct language among the choices\nSentence: Ihtin orhor nohe kat tan "
        "tongnoya kat tan tongnoya ma hatipri oh nohe basmur. At orhe damdapat orhor Mama ap tan moh mama han yot "
        "ihit sa tongnotipri rim mamen mat at pat yot han ihitwi orhe amamen mat pat ap tan tei oh tongnotiprimur "
        "pongopri.\n  choice: Kuni-Boazi\n  choice: Ancient Greek\n  choice: Southern Nambikuara\n  choice: Urarina"
        "\n  choice: Czech\n  choice: Chiquihuitlan Mazatec\n  choice: Patep\n  choice: Kobon\n  choice: Oksapmin"
        "\n  choice: Eastern Kaqchikel\n  choice: Mangga Buang\nLanguage:"
    )
    assert r["response"] == "Oksapmin"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 11, 18])
def test_choice_order_is_bigbench_permutation_of_sorted_choices(n):
    choices = [f"c{k:02d}" for k in reversed(range(n))]
    example = {"input": "x", "target_scores": {c: int(c == "c00") for c in choices}}
    prompt, _ = format_example(example, {"choice_prefix": "|"})
    expected = np.random.RandomState(42).permutation(sorted(choices))
    assert prompt == "Q: x" + "".join("|" + str(c) for c in expected) + "\nA:"


def test_tied_top_scores_take_the_first():
    assert _record("reasoning_about_colored_objects", index=-1)["response"] == "3"  # "3" and "three" both score 1


def test_append_choices_override_and_bad_values():
    example = {"input": "x", "target_scores": {"b": 0, "a": 1}}
    assert format_example(example, {"append_choices_to_input": False})[0] == "Q: x\nA:"
    assert format_example(example, {"append_choices_to_input": False}, append_choices=True)[0] == (
        "Q: x\n  choice: b\n  choice: a\nA:"
    )
    with pytest.raises(ValueError, match="append_choices_to_input='maybe'"):
        format_example(example, {"append_choices_to_input": "maybe"})
    with pytest.raises(ValueError, match="needs 'target' or 'target_scores'"):
        format_example({"input": "x"}, {})


def test_duplicates_dropped():
    examples = json.loads((FIXTURES / "strategyqa" / "task.json").read_text())["examples"]
    assert len(examples) == 8 and examples[-1] == examples[-2]
    records = load_task_records(FIXTURES / "strategyqa")
    assert len(records) == 7
    assert len({(r["prompt"], r["response"]) for r in records}) == 7


def test_duplicates_across_subtasks_dropped_and_top_level_examples_kept(tmp_path):
    same = [{"input": "q", "target": "a"}]
    _write_task(tmp_path / "t", [{"input": "top", "target": "x"}])
    _write_task(tmp_path / "t" / "s1", same)
    _write_task(tmp_path / "t" / "s2", same + [{"input": "q", "target": "b"}])
    records = load_task_records(tmp_path / "t")
    assert [(r["subtask"], r["prompt"], r["response"]) for r in records] == [
        ("", "Q: top\nA:", "x"),
        ("s1", "Q: q\nA:", "a"),
        ("s2", "Q: q\nA:", "b"),
    ]


@pytest.mark.parametrize(
    "sizes, test_sizes",
    [([50], [16]), ([100], [20]), ([100, 100], [20, 20]), ([30, 30, 30, 30], [6, 6, 6, 6]), ([12, 40], [6, 8])],
)
def test_split_sizes_per_subtask(tmp_path, sizes, test_sizes):
    # last max(20%, 16 // subtasks) of each subtask are test, at most half of it
    for s, n in enumerate(sizes):
        _write_task(tmp_path / "t" / f"s{s}", [{"input": f"{s}-{k}", "target": "a"} for k in range(n)])
    train, test = load_bigbench_task(tmp_path / "t")
    count_train, count_test = Counter(train["subtask"]), Counter(test["subtask"])
    for s, (n, n_test) in enumerate(zip(sizes, test_sizes)):
        assert count_test[f"s{s}"] == n_test
        assert count_train[f"s{s}"] == n - n_test


def test_fixture_splits_are_deterministic_and_disjoint(fixture_data):
    assert sorted(fixture_data) == sorted(p.name for p in FIXTURES.iterdir())
    again = load_bigbench(FIXTURES)
    for task, (train, test) in fixture_data.items():
        assert train.to_list() == again[task][0].to_list() and test.to_list() == again[task][1].to_list()
        pairs = lambda d: {(r["prompt"], r["response"]) for r in d}
        assert not pairs(train) & pairs(test)
        assert pairs(train) | pairs(test) == pairs(load_task_records(FIXTURES / task))
    train, test = fixture_data["goal_step_wikihow"]  # two subtasks of 6: 3 test each (capped at half)
    assert Counter(test["subtask"]) == {"goal_inference": 3, "step_ordering": 3}
    assert len(train) == 6
    shuffled = load_bigbench_task(FIXTURES / "goal_step_wikihow", seed=7)
    assert shuffled[1].to_list() != test.to_list()


@pytest.mark.skipif(not REAL_BIGBENCH.is_dir(), reason=f"the shared BIG-bench task files are not at {REAL_BIGBENCH}")
def test_all_real_tasks_load():
    data = load_bigbench(REAL_BIGBENCH, BIGBENCH_TASKS)
    assert set(COMPOSITE_10) <= set(data)
    for task, (train, test) in data.items():
        assert len(test) >= 16 and len(train) > len(test), task
        assert set(train["task"]) == {task}
        for column in ("prompt", "response"):
            assert all(text.strip() for text in list(train[column]) + list(test[column])), (task, column)
    assert data["strategyqa"][0][0]["response"] in ("Yes", "No")


# JSONL


def test_jsonl_records(tmp_path):
    path = tmp_path / "my_task.jsonl"
    path.write_text('{"prompt": "p1", "response": "r1"}\n\n{"prompt": "p2", "response": "r2", "extra": 1}\n')
    ds = load_jsonl(path)
    assert ds.to_list() == [
        {"prompt": "p1", "response": "r1", "task": "my_task", "subtask": ""},
        {"prompt": "p2", "response": "r2", "task": "my_task", "subtask": ""},
    ]
    assert set(load_jsonl(path, "other")["task"]) == {"other"}


@pytest.mark.parametrize(
    "bad, message",
    [("{not json", "not valid JSON"), ('["a list"]', "expected a JSON object"), ('{"prompt": "p"}', "'response'"),
     ('{"prompt": 3, "response": "r"}', "'prompt' must be a string")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=rf"t\.jsonl:3: .*{message}"):
        load_jsonl(path)


# Composite-n


def test_composite_task_lists():
    assert COMPOSITE_3 == ("logical_deduction", "question_selection", "strategyqa")
    assert COMPOSITE_5[:3] == COMPOSITE_3 and len(set(COMPOSITE_5)) == 5
    assert COMPOSITE_10[:5] == COMPOSITE_5 and len(set(COMPOSITE_10)) == 10
    assert set(COMPOSITE_10) <= set(BIGBENCH_TASKS)


def test_composite_build(fixture_data):
    records = build_composite(fixture_data, COMPOSITE_3, seed=0)
    assert len(records) == min(len(fixture_data[t][1]) for t in COMPOSITE_3)  # default: smallest test split
    tests = {t: {(r["prompt"], r["response"]) for r in fixture_data[t][1]} for t in COMPOSITE_3}
    trains = {t: {r["prompt"] for r in fixture_data[t][0]} for t in COMPOSITE_3}
    for rec in records:
        assert rec["tasks"] == list(COMPOSITE_3)
        assert rec["response"] == "\n".join(f"{i}. {a}" for i, a in enumerate(rec["answers"], 1))
        assert rec["prompt"].endswith("Answers:\n")
        spans = rec["prompt_spans"]
        assert len(spans) == 2 * (3 + 3) + 3  # 2 shots of 3 questions and 3 answers, then 3 questions
        questions = [rec["prompt"][s["start"] : s["end"]] for s in spans[-3:]]
        for i, (task, q, a) in enumerate(zip(COMPOSITE_3, questions, rec["answers"]), 1):
            assert spans[-4 + i]["task"] == task and q.startswith(f"{i}. ")
            assert (q[len(f"{i}. ") :], a) in tests[task]
        shots = [rec["prompt"][s["start"] : s["end"]] for s in spans[:3]]
        assert all(s.split(". ", 1)[1] in trains[t] for s, t in zip(shots, COMPOSITE_3))
        for i, s in enumerate(rec["response_spans"], 1):
            assert rec["response"][s["start"] : s["end"]] == f"{i}. {rec['answers'][i - 1]}"
            assert s["task"] == COMPOSITE_3[i - 1]
    # distinct test questions across examples; seeded
    assert len({r["prompt"].rsplit("Questions:", 1)[1] for r in records}) == len(records)
    assert build_composite(fixture_data, COMPOSITE_3, seed=0) == records
    assert build_composite(fixture_data, COMPOSITE_3, seed=1) != records


def test_composite_any_task_list_and_errors(fixture_data):
    tasks = ["object_counting", "strategyqa", "language_identification", "goal_step_wikihow"]
    records = build_composite(fixture_data, tasks, num_examples=2, num_shots=1, seed=3)
    assert len(records) == 2 and records[0]["subtask"] == "composite-4"
    with pytest.raises(ValueError, match="no data for tasks"):
        build_composite(fixture_data, ["nope"])
    with pytest.raises(ValueError, match="exceeds the smallest test split"):
        build_composite(fixture_data, tasks, num_examples=100)


def test_composite_parser():
    output = "1. The Black book is the leftmost.\n2.  What is it?  \n3. yes"
    assert parse_composite_answers(output, 3) == ["the black book is the leftmost.", "what is it?", "yes"]
    assert parse_composite_answers("1. a\n3. c", 3) == ["a", "", "c"]
    assert parse_composite_answers("", 2) == ["", ""]
    assert score_composite("1. Yes\n2. no\n3. 12", ["yes", "Yes", "12"]) == [True, False, True]
    # The paper's regex has an unescaped dot and no anchor; strict=True fixes what that misreads.
    assert parse_composite_answers("1. 23 apples\n2. b", 2) == ["23 apples", "apples"]
    assert parse_composite_answers("1. 23 apples\n2. b", 2, strict=True) == ["23 apples", "b"]


# Tokenization


def _segments(arrays):
    """(tokens, loss_mask, task_ids) of every segment in every row."""
    out = []
    for row in range(len(arrays["tokens"])):
        seg = arrays["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            m = seg == s
            out.append((arrays["tokens"][row][m], arrays["loss_mask"][row][m], arrays["task_ids"][row][m]))
    return out


def _check_layout(arrays, max_length):
    assert arrays["tokens"].dtype == np.int32 and arrays["segment_ids"].dtype == np.int32
    assert arrays["task_ids"].dtype == np.int32 and arrays["loss_mask"].dtype == bool
    assert {a.shape for a in arrays.values()} == {(len(arrays["tokens"]), max_length)}
    pad = arrays["segment_ids"] == 0
    assert (arrays["task_ids"][pad] == -1).all() and (arrays["task_ids"][~pad] >= 0).all()
    assert not arrays["loss_mask"][pad].any() and (arrays["tokens"][pad] == 0).all()
    for real in ~pad:  # padding on the right
        assert real[: real.sum()].all()


def test_tokenize_labels_and_loss_mask_char_tokenizer(fixture_data):
    tasks = sorted(fixture_data)
    records = [r for t in tasks for r in fixture_data[t][1].to_list()]
    tok = CharTokenizer()
    arrays, stats = tokenize_records(records, tok, tasks, 1024, return_stats=True)
    _check_layout(arrays, 1024)
    assert stats.rows == stats.examples == len(records) and stats.truncated == 0
    for r, (ids, loss, labels) in zip(records, _segments(arrays)):
        assert tok.decode(ids[~loss]) == "<s>" + r["prompt"]
        assert tok.decode(ids[loss]) == " " + r["response"] + "</s>"
        assert (labels == tasks.index(r["task"])).all()
    assert (arrays["segment_ids"].max(axis=1) == 1).all()


def test_tokenize_chat_template_char_tokenizer(fixture_data):
    records = fixture_data["strategyqa"][1].to_list()
    tok = CharTokenizer()
    arrays = tokenize_records(records, tok, ["x", "strategyqa"], 256, chat_template=True)
    for r, (ids, loss, labels) in zip(records, _segments(arrays)):
        assert tok.decode(ids[~loss]) == f"<user>{r['prompt']}</user><assistant>"
        assert tok.decode(ids[loss]) == f"{r['response']}</assistant>"
        assert (labels == 1).all()


def test_tokenize_unknown_task():
    with pytest.raises(ValueError, match="'b' is not in task_names"):
        tokenize_records([{"prompt": "p", "response": "r", "task": "b"}], CharTokenizer(), ["a"], 16)


def test_truncation_keeps_the_response():
    tok = CharTokenizer()
    records = [
        {"prompt": "abcdefghij", "response": "xyz", "task": "a"},
        {"prompt": "ab", "response": "x", "task": "a"},
        {"prompt": "abc", "response": "0123456789", "task": "a"},
    ]
    arrays, stats = tokenize_records(records, tok, ["a"], 8, return_stats=True)
    assert (stats.truncated, stats.response_truncated) == (2, 1)
    (ids0, loss0, _), (ids1, _, _), (ids2, loss2, _) = _segments(arrays)
    assert tok.decode(ids0) == "<s>ij xyz</s>" and tok.decode(ids0[loss0]) == " xyz</s>"  # BOS survives
    assert tok.decode(ids1) == "<s>ab x</s>"
    assert tok.decode(ids2) == "c 012345" and loss2.sum() == 7  # one prompt token kept


def test_composite_labels_char_tokenizer(fixture_data):
    records = build_composite(fixture_data, COMPOSITE_3, num_examples=2)
    tasks = ["pad_task", *COMPOSITE_3]
    tok = CharTokenizer()
    for chat in (False, True):
        arrays = tokenize_records(records, tok, tasks, 8192, chat_template=chat)
        _check_layout(arrays, 8192)
        for rec, (ids, loss, labels) in zip(records, _segments(arrays)):
            prompt_labels, response_labels = labels[~loss], labels[loss]
            start = 1 if not chat else len("<user>")  # BOS, or the chat wrapper before the prompt
            for s in rec["prompt_spans"]:
                assert (prompt_labels[start + s["start"] : start + s["end"]] == tasks.index(s["task"])).all()
            for s in rec["response_spans"]:  # no separator: the prompt ends with a newline
                assert (response_labels[s["start"] : s["end"]] == tasks.index(s["task"])).all()
            assert prompt_labels[0] == tasks.index(COMPOSITE_3[0])  # before the first span: the next span's task
            assert response_labels[-1] == tasks.index(COMPOSITE_3[-1])  # after the last: the last span's
            assert set(labels) == {1, 2, 3}


def test_tokenize_smollm2(fixture_data, smollm2_tokenizer):
    tok = smollm2_tokenizer
    tasks = sorted(fixture_data)
    records = [r for t in tasks for r in fixture_data[t][0].to_list()]
    for chat in (False, True):
        arrays = tokenize_records(records, tok, tasks, 512, chat_template=chat)
        _check_layout(arrays, 512)
        for r, (ids, loss, labels) in zip(records, _segments(arrays)):
            response = tok.decode(ids[loss])
            if chat:
                assert response == r["response"] + "<|im_end|>\n"
                assert tok.decode(ids[~loss]).endswith(r["prompt"] + "<|im_end|>\n<|im_start|>assistant\n")
            else:
                assert response == " " + r["response"] + tok.eos_token
                assert tok.decode(ids[~loss]) == r["prompt"]
            assert (labels == tasks.index(r["task"])).all()


def test_composite_labels_smollm2(fixture_data, smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = build_composite(fixture_data, COMPOSITE_3, num_examples=2)
    tasks = list(COMPOSITE_3)
    arrays = tokenize_records(records, tok, tasks, 4096, chat_template=True)
    for rec, (ids, loss, labels) in zip(records, _segments(arrays)):
        assert tok.decode(ids[loss]) == rec["response"] + "<|im_end|>\n"
        # every question and answer lies inside a run of tokens labelled with its task
        runs = []
        for k in range(len(ids)):
            if k == 0 or labels[k] != labels[k - 1]:
                runs.append((int(labels[k]), []))
            runs[-1][1].append(int(ids[k]))
        runs = [(label, tok.decode(run)) for label, run in runs]
        for text, spans in ((rec["prompt"], rec["prompt_spans"]), (rec["response"], rec["response_spans"])):
            for s in spans:
                piece = text[s["start"] : s["end"]]
                assert any(piece in run for label, run in runs if label == tasks.index(s["task"])), piece


def test_packing(fixture_data):
    tasks = sorted(fixture_data)
    records = [r for t in tasks for r in fixture_data[t][0].to_list()]
    tok = CharTokenizer()
    plain = tokenize_records(records, tok, tasks, 1024)
    packed, stats = tokenize_records(records, tok, tasks, 1024, pack=True, return_stats=True)
    _check_layout(packed, 1024)
    assert stats.rows < len(records) // 2
    for row in packed["segment_ids"]:  # segments 1..k, contiguous, in order
        real = row[row > 0]
        assert (np.diff(real) >= 0).all() and set(real) == set(range(1, real.max() + 1))
    key = lambda seg: (seg[0].tobytes(), seg[1].tobytes(), seg[2].tobytes())
    assert Counter(map(key, _segments(packed))) == Counter(map(key, _segments(plain)))
    again = tokenize_records(records, tok, tasks, 1024, pack=True)
    assert all((again[k] == packed[k]).all() for k in packed)


# Batches


def _arrays(task_counts):
    labels = np.concatenate([np.full(n, t) for t, n in enumerate(task_counts)])
    rows = len(labels)
    return {
        "tokens": np.arange(rows, dtype=np.int32)[:, None].repeat(4, axis=1),
        "segment_ids": np.ones((rows, 4), np.int32),
        "loss_mask": np.ones((rows, 4), bool),
        "task_ids": labels.astype(np.int32)[:, None].repeat(4, axis=1),
    }


def test_batches_deterministic_and_resumable():
    arrays = _arrays([30, 7])
    first = [b["tokens"][:, 0].tolist() for b in batches(arrays, 4, seed=1, epoch=0)]
    assert len(first) == 37 // 4 and all(len(b) == 4 for b in first)
    flat = sum(first, [])
    assert len(set(flat)) == len(flat)  # an epoch visits each row at most once
    assert first == [b["tokens"][:, 0].tolist() for b in batches(arrays, 4, seed=1, epoch=0)]
    assert first[3:] == [b["tokens"][:, 0].tolist() for b in batches(arrays, 4, seed=1, epoch=0, start=3)]
    assert first != [b["tokens"][:, 0].tolist() for b in batches(arrays, 4, seed=1, epoch=1)]
    assert first != [b["tokens"][:, 0].tolist() for b in batches(arrays, 4, seed=2, epoch=0)]
    batch = next(batches(arrays, 4, seed=1, epoch=0))
    assert set(batch) == set(arrays) and (batch["task_ids"][:, 0] == (batch["tokens"][:, 0] >= 30)).all()
    small = list(batches(_arrays([3]), 8, seed=0, epoch=0))  # fewer rows than a batch: one batch, rows repeated
    assert len(small) == 1 and sorted(set(small[0]["tokens"][:, 0])) == [0, 1, 2]


def test_batches_task_balanced():
    arrays = _arrays([90, 9, 1])
    seen = Counter()
    for epoch in range(40):
        for b in batches(arrays, 10, seed=0, epoch=epoch, task_balanced=True):
            seen.update(b["task_ids"][:, 0].tolist())
    total = sum(seen.values())
    assert total == 40 * 100
    assert all(abs(seen[t] / total - 1 / 3) < 0.03 for t in range(3)), seen
    plain = Counter(b for e in range(5) for x in batches(arrays, 10, seed=0, epoch=e) for b in x["task_ids"][:, 0])
    assert plain[0] == 5 * 90


# Fetching


def _tar(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sdist(tmp_path):
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    return _tar(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            f"{root}/alpha/task.json": '{"examples": []}',
            f"{root}/alpha/README.md": "not copied",
            f"{root}/beta/task.json": '{"name": "beta"}',
            f"{root}/beta/sub/task.json": '{"name": "sub"}',
            f"{root}/gamma/task.py": "# a programmatic task: no task.json",
            "bigbench-1.0.0/bigbench/api/task.json": "{}",
        },
    )


def test_extract_tasks(tmp_path):
    archive, out = _sdist(tmp_path), tmp_path / "out"
    written = extract_tasks(archive, out, ["alpha", "beta"])
    assert written == [out / "alpha", out / "beta"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["alpha/task.json", "beta/sub/task.json", "beta/task.json"]
    assert (out / "beta" / "sub" / "task.json").read_text() == '{"name": "sub"}'
    with pytest.raises(FileExistsError, match="alpha"):
        extract_tasks(archive, out, ["alpha"])
    (out / "alpha" / "stale.json").write_text("{}")
    extract_tasks(archive, out, ["alpha"], overwrite=True)
    assert not (out / "alpha" / "stale.json").exists() and (out / "alpha" / "task.json").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_extract_missing_task_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"\['gamma', 'delta'\]"):
        extract_tasks(_sdist(tmp_path), out, ["alpha", "gamma", "delta"])
    assert list(out.iterdir()) == []


def test_fetch_main_with_local_archive(tmp_path, capsys):
    archive = _sdist(tmp_path)
    assert fetch_bigbench.main(["--out", str(tmp_path / "o"), "--tasks", "beta", "--archive", str(archive)]) == 0
    assert (tmp_path / "o" / "beta" / "sub" / "task.json").is_file()
    assert fetch_bigbench.main(["--out", str(tmp_path / "o"), "--tasks", "nope", "--archive", str(archive)]) == 1
    assert "nope" in capsys.readouterr().err


def test_download_failure_is_clear(tmp_path, monkeypatch):
    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch_bigbench.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="(?s)pip download of bigbench==1.0.0 failed.*No matching distribution"):
        download_sdist(tmp_path)
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0",
                            "-d", str(tmp_path)]
