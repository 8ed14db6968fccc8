"""meteora-jax: MeteoRA (many task LoRA adapters as a per-token mixture of experts) for LLaMA models in JAX."""

from meteora_jax.checkpoint import LoadedModel, load_model, save_model
from meteora_jax.config import LlamaConfig, RopeScaling
from meteora_jax.generate import Generation, generate
from meteora_jax.model import KVCache, LlamaForCausalLM
from meteora_jax.sampling import Sampling

__all__ = [
    "Generation",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoadedModel",
    "RopeScaling",
    "Sampling",
    "generate",
    "load_model",
    "save_model",
]
