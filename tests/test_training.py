"""train.gates and train.lora end to end on a tiny model with the SmolLM2 tokenizer and real peft adapters."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_reference import random_hf_model, tiny_config
from peft_reference import make_adapter, peft_logits

from convert.hf_lora_to_orbax import main as import_main
from meteora_jax.convert_llama import convert_llama
from meteora_jax.meteora_checkpoint import load_meteora, read_meteora
from meteora_jax.routing import Routing
from train.gates import main as gates_main
from train.lora import main as lora_main

REPO = Path(__file__).resolve().parents[1]
WORDS = {"fruit": "apple banana cherry grape lemon mango peach plum".split(),
         "digits": "one two three four five six seven eight nine".split()}


def write_task(path: Path, words: list[str], rows: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            prompt = " ".join(rng.choice(words, 12))
            f.write(json.dumps({"prompt": prompt, "response": " ".join(rng.choice(words, 4))}) + "\n")
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory, smollm2_checkpoint):
    root = tmp_path_factory.mktemp("toy")
    config = tiny_config(vocab_size=49152, max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,))
    hf = random_hf_model(config, seed=5)
    hf.save_pretrained(root / "hf")
    transformers.AutoTokenizer.from_pretrained(str(smollm2_checkpoint)).save_pretrained(root / "hf")
    convert_llama(root / "hf", root / "base", progress=False)
    args = ["--base", str(root / "base"), "--out", str(root / "meteora")]
    for seed, name in enumerate(WORDS):
        args += ["--adapter", f"{name}={make_adapter(hf, root / f'adapter-{name}', seed=seed, r=4, lora_alpha=8)}"]
    assert import_main(args) == 0
    data = [f"jsonl:{name}={write_task(root / f'{name}.jsonl', words, 40, i)}" for i, (name, words) in
            enumerate(WORDS.items())]
    return root, hf, data


def gate_args(root: Path, data: list[str], out: Path, *extra: str) -> list[str]:
    args = ["--base", str(root / "base"), "--meteora", str(root / "meteora"), "--out", str(out),
            "--batch-size", "8", "--max-length", "48", "--lr", "3e-2", "--warmup", "2", "--eval-rows", "16"]
    for spec in data:
        args += ["--data", spec]
    return args + list(extra)


def test_gates_learn_the_tasks_and_nothing_else_moves(toy):
    root, _, data = toy
    out = root / "run"
    assert gates_main(gate_args(root, data, out, "--steps", "80", "--save-every", "40", "--eval-every", "40")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    validation = json.loads((out / "validation.json").read_text())
    assert validation["mean_gate_accuracy"] > 0.9
    # Trained gates held in bfloat16 route nearly every token as in float32.
    bf16 = validation["bfloat16_gates"]
    assert bf16["mean_gate_accuracy"] > 0.9 and bf16["mean_routing_agreement"] > 0.9
    assert set(bf16["layers_routing_agreement"]) == set(validation["layers"])
    fused = validation["fused_strategy"]
    assert 0 <= fused["mean_missed_share"] <= fused["max_layer_missed_share"] <= 1
    assert set(fused["layers_missed_share"]) == set(validation["layers"])
    before, _ = read_meteora(root / "meteora")
    after, manifest = read_meteora(out / "meteora")
    assert manifest["trained"]["steps"] == 80
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (path[-1].key, not np.array_equal(np.asarray(a), np.asarray(b))), before, after)
    changed = {name for name, differs in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)) if differs}
    assert changed == {"gate"}


def run_gates(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "train.gates", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_sigkill_ends_with_the_same_gates(toy):
    root, _, data = toy
    common = ["--steps", "8", "--save-every", "1", "--eval-every", "100"]
    assert gates_main(gate_args(root, data, root / "straight", *common)) == 0

    killed = run_gates(gate_args(root, data, root / "killed", *common))
    checkpoints = root / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "3").is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (root / "killed" / "meteora").exists()
    assert gates_main(gate_args(root, data, root / "killed", *common, "--resume")) == 0
    straight, _ = read_meteora(root / "straight" / "meteora")
    resumed, _ = read_meteora(root / "killed" / "meteora")
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy, capsys):
    root, _, data = toy
    out = root / "diverged"
    assert gates_main(gate_args(root, data, out, "--steps", "2", "--save-every", "1")) == 0
    code = gates_main(gate_args(root, data, out, "--steps", "6", "--save-every", "1", "--resume", "--lr", "1e38",
                                "--clip-norm", "1e30"))
    assert code == 1
    err = capsys.readouterr().err
    assert "loss became" in err and "last good checkpoint is step" in err
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 6


def test_the_step_compiles_once(toy, caplog, tmp_path):
    # Uncommitted optimiser state on the first call once made the second step compile everything again.
    root, _, data = toy
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            assert gates_main(gate_args(root, data, tmp_path / "run", "--steps", "3", "--save-every", "100",
                                        "--eval-every", "100", "--max-length", "40")) == 0
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
    assert len(compiles) == 1


def test_strategy_flag_reaches_the_meteora_layers(toy, tmp_path, monkeypatch):
    root, _, data = toy
    import meteora_jax.meteora as meteora

    seen, original = set(), meteora.gated_output

    def spy(*args, **kwargs):
        seen.add(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(meteora, "gated_output", spy)
    assert gates_main(gate_args(root, data, tmp_path / "run", "--steps", "1", "--save-every", "100",
                                "--eval-every", "100", "--strategy", "bmm")) == 0
    assert seen == {"bmm"}
    assert json.loads((tmp_path / "run" / "run_settings.json").read_text())["strategy"] == "bmm"


def test_existing_run_needs_resume(toy, capsys):
    root, _, data = toy
    out = root / "twice"
    assert gates_main(gate_args(root, data, out, "--steps", "1")) == 0
    assert gates_main(gate_args(root, data, out, "--steps", "1")) == 1
    assert "pass --resume" in capsys.readouterr().err


def test_missing_task_data_is_named(toy, capsys):
    root, _, data = toy
    assert gates_main(gate_args(root, data[:1], root / "partial", "--steps", "1")) == 1
    assert "no data for adapters ['digits']" in capsys.readouterr().err


def test_trained_lora_loads_in_peft_with_equal_logits(toy, rng):
    root, hf, data = toy
    out = root / "lora-fruit"
    assert lora_main(["--base", str(root / "base"), "--task", data[0], "--task", data[1], "--out", str(out),
                      "--rank", "4", "--alpha", "8", "--steps", "6", "--batch-size", "8", "--max-length", "32",
                      "--lr", "1e-2"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert import_main(["--base", str(root / "base"), "--adapter", f"trained={out}", "--out",
                        str(root / "meteora-trained")]) == 0
    loaded = load_meteora(root / "base", root / "meteora-trained")
    tokens = rng.integers(3, 49152, (2, 9))
    ours, _ = loaded.module.apply({"params": loaded.params}, tokens, routing=Routing(force_adapter=0))
    ref = peft_logits(hf, out, tokens)
    with torch.no_grad():
        base = hf(torch.tensor(tokens)).logits.numpy()
    assert np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref) < 1e-5
    assert np.linalg.norm(ref - base) / np.linalg.norm(base) > 1e-6  # training moved the adapter


def test_lora_each_task_gets_its_own_adapter(toy):
    root, _, data = toy
    out = root / "each"
    assert lora_main(["--base", str(root / "base"), "--task", data[0], "--task", data[1], "--out", str(out),
                      "--each", "--rank", "2", "--steps", "2", "--batch-size", "4", "--max-length", "32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(WORDS)
    summary = json.loads((out / "fruit" / "training_summary.json").read_text())
    assert summary["tasks"] == ["fruit"] and summary["steps"] == 2
