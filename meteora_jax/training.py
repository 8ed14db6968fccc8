"""MeteoRA gate training: the loss (LM + lambda x gate cross-entropy), the optimiser and a jitted step.

Only the trainable subtree (the gates, or gates and adapters) is differentiated and updated: the
frozen base and adapters get no gradient computation and no optimiser state at all, which is what a
frozen-parameter mask in optax would achieve, without paying for the frozen gradients first.

A batch is a dict of arrays [B, L]: tokens, segment_ids (0 = padding), loss_mask (the LM loss
predicts the tokens where it is True) and task_ids (the gate target per token, -1 = none).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from meteora_jax.lora_mixture import FUSED_TILE_TOKENS
from meteora_jax.trainable import merge_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    total_steps: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    gate_loss_weight: float = 50.0  # lambda of the MeteoRA paper


def committed(tree: Any) -> Any:
    """`tree` placed on the default device. A jitted step's cache key includes whether each argument is
    committed to a device: optax's fresh state is not, the step's outputs are, so without this the
    second step compiles the whole step again (minutes with the Pallas kernels on a GPU)."""
    return jax.device_put(tree, jax.devices()[0])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=max(config.warmup_steps, 1),
        decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=config.learning_rate * 0.1,
    )
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def gate_logits_by_layer(intermediates: dict[str, Any]) -> dict[str, jax.Array]:
    """{'layers_3/mlp/up_proj': gate logits [B, L, N]} from the model's `intermediates` collection."""
    flat = traverse_util.flatten_dict(intermediates)
    return {"/".join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == "gate_logits"}


def lm_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over target positions inside one segment, and their count."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    targets = tokens[:, 1:]
    mask = batch["loss_mask"][:, 1:] & (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(count, 1), count


def gate_loss(gate_logits: dict[str, jax.Array], task_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of every layer's gate against the per-token task, averaged over layers; and
    each layer's top-1 accuracy [num_layers] in sorted layer-name order."""
    valid = task_ids >= 0
    count = jnp.maximum(jnp.sum(valid), 1)
    target = jnp.maximum(task_ids, 0)
    losses, accuracies = [], []
    for name in sorted(gate_logits):
        logits = gate_logits[name].astype(jnp.float32)
        ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        losses.append(jnp.sum(ce * valid) / count)
        accuracies.append(jnp.sum((jnp.argmax(logits, axis=-1) == target) & valid) / count)
    return jnp.mean(jnp.stack(losses)), jnp.stack(accuracies)


def loss_and_metrics(module: nn.Module, params: Any, batch: dict[str, jax.Array], gate_loss_weight: float):
    (logits, _), state = module.apply(
        {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], mutable=["intermediates"]
    )
    lm, targets = lm_loss(logits, batch)
    gates = gate_logits_by_layer(state["intermediates"])
    if not gates:
        raise ValueError("the model has no MeteoRA layers: nothing sows gate logits")
    gate, accuracy = gate_loss(gates, batch["task_ids"])
    total = lm + gate_loss_weight * gate
    return total, {"loss": total, "lm_loss": lm, "gate_loss": gate, "gate_accuracy": jnp.mean(accuracy),
                   "layer_gate_accuracy": accuracy, "target_tokens": targets}


@functools.partial(jax.jit, static_argnames=("module", "optimizer", "gate_loss_weight"), donate_argnums=(1, 2))
def train_step(module, trainable, opt_state, frozen, micro_batches, *, optimizer, gate_loss_weight):
    """One optimiser step over micro_batches ([A, B, L] arrays: A accumulated micro-batches)."""

    def micro(grads_sum, batch):
        def loss_fn(t):
            return loss_and_metrics(module, merge_params(t, frozen), batch, gate_loss_weight)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, metrics = jax.lax.scan(micro, zeros, micro_batches)
    steps = jax.tree.leaves(micro_batches)[0].shape[0]
    grads = jax.tree.map(lambda g: g / steps, grads)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(trainable, updates), opt_state, metrics


@functools.partial(jax.jit, static_argnames=("module",))
def layer_gate_accuracy(module, params, batch):
    """Per-layer gate top-1 accuracy [num_layers] on one batch (sorted layer-name order)."""
    _, state = module.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                            mutable=["intermediates"])
    return gate_loss(gate_logits_by_layer(state["intermediates"]), batch["task_ids"])[1]


@functools.partial(jax.jit, static_argnames=("module",))
def compare_routing(module, params, other_params, batch) -> dict[str, jax.Array]:
    """How `other_params` (e.g. the gates held in bfloat16) route one batch against `params`, per layer in sorted
    layer-name order: "gate_accuracy" and "other_gate_accuracy", each tree's gate top-1 accuracy [num_layers],
    "routing_agreement", the share of real tokens choosing the same set of adapters under both trees
    [num_layers], and "fused_missed_share" of `params`' routing (see `fused_missed_share`) [num_layers]. Each
    layer sees its own tree's inputs, so a change of route early on shows in the layers after it."""

    def forward(p):
        _, state = module.apply({"params": p}, batch["tokens"], segment_ids=batch["segment_ids"],
                                mutable=["intermediates"])
        sown = state.get("intermediates", {})
        flat = traverse_util.flatten_dict(sown)
        chosen = {"/".join(k[:-1]): jnp.sort(v[0], axis=-1) for k, v in flat.items() if k[-1] == "adapter_indices"}
        if not chosen:
            raise ValueError("the model has no MeteoRA layers: nothing sows adapter choices")
        return chosen, gate_logits_by_layer(sown)

    (ours, our_logits), (theirs, their_logits) = forward(params), forward(other_params)
    real = batch["segment_ids"] > 0
    count = jnp.maximum(jnp.sum(real), 1)
    agreement = jnp.stack([jnp.sum(jnp.all(ours[n] == theirs[n], axis=-1) & real) / count for n in sorted(ours)])
    num_adapters = next(iter(our_logits.values())).shape[-1]
    rank = next(v.shape[-1] for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "lora_a")
    return {"gate_accuracy": gate_loss(our_logits, batch["task_ids"])[1],
            "other_gate_accuracy": gate_loss(their_logits, batch["task_ids"])[1], "routing_agreement": agreement,
            "fused_missed_share": jnp.stack([fused_missed_share(ours[n], num_adapters, rank) for n in sorted(ours)])}


def fused_missed_share(indices, num_adapters: int, rank: int, tile_tokens: int = FUSED_TILE_TOKENS) -> jax.Array:
    """The share of (token, choice) pairs [..., K] that would miss their tile's adapter slots in the `fused`
    strategy (meteora_jax/pallas/fused_linear.py), for the tokens as one layer call sees them (flattened, the
    batch's padding tokens included); the rows that fill the last tile neither vote nor count. Every choice votes
    here, where `fused_linear` counts those with a nonzero coefficient (the same for softmax weights). These are
    the pairs it adds per token, outside its GEMM."""
    from meteora_jax.pallas.tile_routing import slot_count, tile_slots  # Pallas imports stay off the default path

    flat = indices.reshape(-1, indices.shape[-1])
    real = jnp.ones(flat.shape, bool)
    padding = ((0, -flat.shape[0] % tile_tokens), (0, 0))
    flat, real = jnp.pad(flat, padding), jnp.pad(real, padding)
    slots = slot_count(rank)
    _, slot = tile_slots(flat, num_adapters, tile_tokens, slots, counted=real)
    return jnp.sum((slot >= slots) & real) / jnp.sum(real)


def peak_memory_bytes() -> int | None:
    """Peak device memory so far (None where the backend keeps no statistics, e.g. the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def step_summary(step_seconds: list[float], step_tokens: list[int]) -> dict[str, Any]:
    """Steady-state step time and throughput: medians over the steps after the first (which compiles);
    tokens/s = mean real tokens per step / median step time. Raw step times are kept alongside."""
    if not step_seconds:
        return {"median_step_s": None, "tokens_per_s": None, "first_step_s": None, "step_seconds": []}
    seconds, tokens = (step_seconds[1:], step_tokens[1:]) if len(step_seconds) > 1 else (step_seconds, step_tokens)
    median = float(np.median(seconds))
    return {"median_step_s": median, "tokens_per_s": float(np.mean(tokens)) / median,
            "first_step_s": step_seconds[0], "step_seconds": [round(t, 5) for t in step_seconds]}
