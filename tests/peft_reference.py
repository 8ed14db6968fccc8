"""Real peft LoRA adapters on a random transformers base, saved the way users get them."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch


def make_adapter(base_model, out: Path, *, seed: int, **lora_kwargs) -> Path:
    """Saves a peft LoRA adapter with random A and B (peft starts B at zero) under `out`."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora_kwargs})
    model = peft.get_peft_model(copy.deepcopy(base_model), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def peft_logits(base_model, adapter_dir: Path, tokens) -> "torch.Tensor":
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()
