"""convert/hf_llama_to_orbax.py: HF directory in, checkpoint out, round trip back to HF, and bad inputs."""

import json
import re

import jax
import numpy as np
import pytest
import torch
from hf_reference import random_hf_model, tiny_config
from safetensors.numpy import load_file, save_file

from convert.hf_llama_to_orbax import main as convert_main
from meteora_jax.checkpoint import load_model
from meteora_jax.convert_llama import convert_llama
from meteora_jax.hf_weights import params_to_hf

F32_TOLERANCE = 1e-5


def save_hf(tmp_path, config, name="hf", **kwargs):
    model = random_hf_model(config)
    path = tmp_path / name
    model.save_pretrained(path, **kwargs)
    return model, path


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single-file", "sharded"])
def test_convert_load_and_round_trip(tmp_path, rng, shard):
    config = tiny_config(tied=shard is None)
    model, src = save_hf(tmp_path, config, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    assert convert_main([str(src), str(tmp_path / "ckpt")]) == 0

    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == config
    tokens = rng.integers(3, config.vocab_size, (2, 10))
    ours, _ = loaded.module.apply({"params": loaded.params}, tokens)
    ref = hf_logits(model, tokens)
    assert np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref) < F32_TOLERANCE

    back = random_hf_model(config, seed=99)
    back.load_state_dict({k: torch.tensor(np.array(v)) for k, v in params_to_hf(loaded.params, config).items()},
                         strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        back.tie_weights()
    np.testing.assert_array_equal(hf_logits(back, tokens), ref)


def test_bfloat16_storage(tmp_path):
    _, src = save_hf(tmp_path, tiny_config())
    loaded = load_model(convert_llama(src, tmp_path / "ckpt", dtype="bfloat16", progress=False))
    assert loaded.config.param_dtype == "bfloat16"
    assert {x.dtype.name for x in jax.tree.leaves(loaded.params)} == {"bfloat16"}


def rewrite_weights(src, edit):
    path = src / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensors: model.layers.1.mlp.up_proj.weight"),
        (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}), "model.layers.0.extra.weight"),
        (lambda t: t.update({"model.norm.weight": np.zeros(31, np.float32)}), r"'model.norm.weight' has shape \(31,\)"),
    ],
    ids=["missing", "extra", "misshaped"],
)
def test_bad_tensors_are_named_and_nothing_is_written(tmp_path, capsys, edit, message):
    _, src = save_hf(tmp_path, tiny_config())
    rewrite_weights(src, edit)
    assert convert_main([str(src), str(tmp_path / "out")]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_truncated_safetensors(tmp_path):
    _, src = save_hf(tmp_path, tiny_config())
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        convert_llama(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bin_only_checkpoint_asks_for_safetensors(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    (src / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="convert them to safetensors"):
        convert_llama(src, tmp_path / "out", progress=False)


def test_not_a_llama(tmp_path):
    _, src = save_hf(tmp_path, tiny_config())
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a LLaMA-family model"):
        convert_llama(src, tmp_path / "out", progress=False)


def test_missing_source_and_existing_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_llama(tmp_path / "nowhere", tmp_path / "out")
    _, src = save_hf(tmp_path, tiny_config())
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_llama(src, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nowhere")
