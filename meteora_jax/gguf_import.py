"""Read a llama.cpp GGUF LLaMA checkpoint as a Hugging Face config dict and float32 state dict."""

from __future__ import annotations

import os
import re

import gguf
import numpy as np

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (config.json-style LlamaConfig dict, state dict of HF-named float32 arrays)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {os.fspath(path)}")
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; only 'llama' is supported")

    config = _config(meta, {t.name for t in reader.tensors})
    state = {}
    for tensor in reader.tensors:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        # llama.cpp interleaves the rotary halves of each Q/K head; HF's rotate_half expects them split.
        if tensor.name.endswith(".attn_q.weight"):
            weight = _unpermute(weight, config["num_attention_heads"])
        elif tensor.name.endswith(".attn_k.weight"):
            weight = _unpermute(weight, config["num_key_value_heads"])
        state[_hf_name(tensor.name)] = weight
    return config, state


def _config(meta: dict, tensor_names: set[str]) -> dict:
    hidden_size = meta["llama.embedding_length"]
    num_heads = meta["llama.attention.head_count"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", num_heads),
        "head_dim": meta.get("llama.rope.dimension_count", hidden_size // num_heads),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for special in ("bos", "eos", "pad"):
        # GGUF spells the pad token "padding"; HF's GGUF loader maps it the same way.
        key = f"tokenizer.ggml.{'padding' if special == 'pad' else special}_token_id"
        if key in meta:
            config[f"{special}_token_id"] = meta[key]
    return config


def _rope_scaling(meta: dict) -> dict | None:
    # GGUF has no llama3 scaling type: llama.cpp bakes llama3 scaling into a rope_freqs tensor
    # (rejected below as unknown), so only linear scaling can arrive through metadata.
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta["llama.rope.scaling.factor"]}
    raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    # Inverse of llama.cpp convert_hf_to_gguf.py's permute, as in transformers' LlamaTensorProcessor.
    return weight.reshape(n_heads, weight.shape[0] // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_TENSOR_RE.fullmatch(name)
    if match is None or match[2] not in _LAYER_TENSORS:
        raise ValueError(f"unknown GGUF tensor {name!r}")
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.weight"
