"""Splits a parameter tree into trainable leaves (by leaf name, e.g. the gates) and frozen ones.

Differentiating only with respect to the trainable part keeps gradients, and their cost, off the
frozen base and adapters; optax then needs no state for frozen leaves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flax import traverse_util

GATES = ("gate",)
GATES_AND_ADAPTERS = ("gate", "lora_a", "lora_b")


def split_trainable(params: dict[str, Any], trainable: Iterable[str] = GATES) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees; a leaf is trainable when its own name is in `trainable`."""
    names = set(trainable)
    flat = traverse_util.flatten_dict(params)
    chosen = {k: v for k, v in flat.items() if k[-1] in names}
    if not chosen:
        raise ValueError(f"no parameters named {sorted(names)} in the tree: is it a MeteoRA model?")
    rest = {k: v for k, v in flat.items() if k[-1] not in names}
    return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def merge_params(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)
