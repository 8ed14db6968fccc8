import gguf
import numpy as np
import pytest

from meteora_jax.gguf_import import read_gguf


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return read_gguf(smollm2_gguf)


def test_state_dict_matches_transformers_bit_for_bit(ours, smollm2_hf):
    config, state = ours
    hf_state = smollm2_hf.state_dict()
    assert config["tie_word_embeddings"]
    # A tied HF model still lists lm_head.weight, as the embedding tensor itself; we omit it when tied.
    assert smollm2_hf.lm_head.weight is smollm2_hf.model.embed_tokens.weight
    assert "lm_head.weight" not in state
    assert set(state) == set(hf_state) - {"lm_head.weight"}
    for name, array in state.items():
        assert array.dtype == np.float32, name
        assert np.array_equal(array, hf_state[name].float().numpy()), name


def test_config_matches_transformers(ours, smollm2_hf):
    config, _ = ours
    hf = smollm2_hf.config
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
