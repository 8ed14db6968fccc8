"""Device time of the float32 gate logits x @ W_g at decode sizes, written several ways.

At one token XLA turns the [1, I] x [I, N] float32 dot into a reduction that took ~5 us in the decode
layer's kernel trace, a third of the base matmul. This times the forms that could avoid it, each as 32
calls with their own gates in one program (as kernel_trace.py), summing the GPU kernel time per call.

Usage (GPU): python bench/gate_logits_forms.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from meteora_layer import environment  # noqa: E402
from profile_events import traced_kernel_events  # noqa: E402
from result_path import default_result_path  # noqa: E402

CALLS = 32
IN_FEATURES = 4096


def padded_rows(x, gate, rows=8):
    """The dot on x padded to `rows` rows, so that XLA keeps a matrix product."""
    pad = jnp.zeros((max(rows - x.shape[0], 0), x.shape[1]), x.dtype)
    return jnp.dot(jnp.concatenate([x, pad]).astype(jnp.float32), gate)[: x.shape[0]]


FORMS: dict[str, Callable] = {
    "dot f32": lambda x, g: jnp.dot(x.astype(jnp.float32), g),
    "dot highest": lambda x, g: jnp.dot(x.astype(jnp.float32), g, precision=jax.lax.Precision.HIGHEST),
    "dot padded to 8 rows": padded_rows,
    "transposed (g.T @ x.T).T": lambda x, g: jnp.dot(g.T, x.astype(jnp.float32).T).T,
    "multiply + sum": lambda x, g: jnp.sum(x.astype(jnp.float32)[:, :, None] * g[None], axis=1),
}


def busy_us_per_call(form: Callable, tokens: int, adapters: int) -> float:
    keys = jax.random.split(jax.random.key(0), CALLS + 1)
    gates = tuple(jax.random.normal(k, (IN_FEATURES, adapters), jnp.float32) * IN_FEATURES**-0.5 for k in keys[1:])
    x = jax.random.normal(keys[0], (tokens, IN_FEATURES), jnp.bfloat16)

    def program(x, gates):
        # Each call's input depends on the last call's logits, as layers do.
        for g in gates:
            x = x + form(x, g)[:, :1].astype(x.dtype)
        return x

    compiled = jax.jit(program).lower(x, gates).compile()
    jax.block_until_ready(compiled(x, gates))
    events = traced_kernel_events(lambda: jax.block_until_ready(compiled(x, gates)))
    return sum(d for _, _, d in events) / CALLS / 1e3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or default_result_path("gate_logits_forms.json")
    rows = [{"form": name, "tokens": t, "adapters": n, "busy_us": busy_us_per_call(form, t, n)}
            for t in (1, 16) for n in (28, 1024) for name, form in FORMS.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), "calls_per_program": CALLS, "results": rows}, indent=1) + "\n")
    print("| T | N | form | busy us per call (incl. the chaining add) |\n|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {r['busy_us']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
