"""Call-time routing settings for MeteoRA layers, passed through the model to every projection."""

from __future__ import annotations

import jax
from flax import struct

from meteora_jax.lora_mixture import STRATEGIES


@struct.dataclass
class Routing:
    """Overrides of the checkpoint's MeteoRA defaults for one call; None keeps the default.

    top_k, temperature, strategy: the gate's k, softmax temperature T and forward strategy.
    force_adapter: send every token to this adapter alone (weight 1), e.g. the single-adapter baseline.
    assignment: [B, T] adapter id per token (weight 1), -1 for none; the one field that is an array.
    adapters_off: skip the adapters entirely, giving the base model.
    inference: the call is not differentiated (generate() sets it), so `auto` may take the `fused` strategy on
        long prompts: its forward is the fastest measured; through its gradients a training step was no faster
        than auto's (bench/NOTES.md).
    Static fields are part of the compiled program; a Routing without `assignment` is hashable.
    """

    top_k: int | None = struct.field(pytree_node=False, default=None)
    temperature: float | None = struct.field(pytree_node=False, default=None)
    strategy: str | None = struct.field(pytree_node=False, default=None)
    force_adapter: int | None = struct.field(pytree_node=False, default=None)
    adapters_off: bool = struct.field(pytree_node=False, default=False)
    inference: bool = struct.field(pytree_node=False, default=False)
    assignment: jax.Array | None = None

    def __post_init__(self):
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.force_adapter is not None and self.assignment is not None:
            raise ValueError("give force_adapter or assignment, not both")
