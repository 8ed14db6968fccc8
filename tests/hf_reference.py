"""Builds Hugging Face transformers models that share weights with ours, for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from meteora_jax.config import LlamaConfig, RopeScaling
from meteora_jax.hf_weights import hf_to_params


def tiny_config(
    *, heads: int = 4, kv_heads: int = 2, tied: bool = False, rope: str = "default", layers: int = 2, **kw
) -> LlamaConfig:
    scaling = RopeScaling()
    if rope == "llama3":
        # Small original context so the scaled band covers the tiny model's frequencies.
        scaling = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64)
    fields = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=scaling, max_position_embeddings=256, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )
    fields.update(kw)
    return LlamaConfig(**fields)


def random_hf_model(config: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).eval()
    # HF initialises norms to ones; random scales make the parity check see the norm weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def params_from_hf(model: transformers.LlamaForCausalLM, config: LlamaConfig):
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return hf_to_params(state.items(), config, dtype=np.float32)
