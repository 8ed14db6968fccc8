import json

import pytest
import transformers
from hf_reference import tiny_config

from meteora_jax.config import LlamaConfig


def test_hf_dict_round_trip_through_transformers():
    config = tiny_config(rope="llama3", tied=True)
    hf = transformers.LlamaConfig(**config.to_hf_dict())
    again = LlamaConfig.from_hf_dict(json.loads(hf.to_json_string()))
    assert again == config


def test_reads_transformers_v4_rope_scaling_keys():
    hf = tiny_config().to_hf_dict()
    hf["rope_scaling"] = {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}
    config = LlamaConfig.from_hf_dict(hf)
    assert config.rope_scaling.rope_type == "llama3" and config.rope_scaling.factor == 32.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "not a LLaMA-family model"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads=3"),
    ],
)
def test_bad_configs_name_the_problem(change, message):
    hf = {**tiny_config().to_hf_dict(), **change}
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_dict(hf)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_json_file(tmp_path / "config.json")
