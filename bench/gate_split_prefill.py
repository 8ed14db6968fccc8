"""The float32 gate logits of a bf16 prefill, three ways: device time and temporaries, with the top-1 routing.

    f32           x cast to float32 @ gate (XLA picks TF32 cuBLAS or a Triton fusion)
    split_concat  x @ [gate_hi | gate_lo] in bf16 with float32 accumulation, halves summed (compute_gate_logits)
    two_dots      x @ gate_hi + x @ gate_lo as two matmuls (XLA may merge them into the concat form)

Usage (GPU, under a minute): python bench/gate_split_prefill.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from meteora_layer import environment  # noqa: E402
from profile_events import traced_kernel_events  # noqa: E402
from result_path import default_result_path  # noqa: E402

CALLS = 5


def parts(x, gate):
    hi = gate.astype(x.dtype)
    return hi, (gate - hi.astype(jnp.float32)).astype(x.dtype)


def split_concat(x, gate):
    hi, lo = parts(x, gate)
    both = jnp.dot(x, jnp.concatenate([hi, lo], axis=1), preferred_element_type=jnp.float32)
    return both[:, : gate.shape[1]] + both[:, gate.shape[1] :]


def two_dots(x, gate):
    hi, lo = parts(x, gate)
    return jnp.dot(x, hi, preferred_element_type=jnp.float32) + jnp.dot(x, lo, preferred_element_type=jnp.float32)


FORMS = {"f32": lambda x, gate: jnp.dot(x.astype(jnp.float32), gate), "split_concat": split_concat,
         "two_dots": two_dots}


def measure(form, tokens: int, adapters: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (tokens, 4096), jnp.bfloat16)
    gate = jax.random.normal(jax.random.key(1), (4096, adapters), jnp.float32) * 0.02
    def logits_and_choice(x, gate):
        logits = form(x, gate)
        return logits, jnp.argmax(logits, -1)

    compiled = jax.jit(logits_and_choice).lower(x, gate).compile()
    jax.block_until_ready(compiled(x, gate))
    events = traced_kernel_events(lambda: jax.block_until_ready([compiled(x, gate) for _ in range(CALLS)]))
    return {"kernel_us": sum(d for _, _, d in events) / CALLS / 1e3,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "kernels": sorted({name for name, _, _ in events})}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = [{"tokens": t, "adapters": n, "form": name, **measure(form, t, n)}
            for t, n in ((4096, 1024), (16384, 256), (16384, 1024)) for name, form in FORMS.items()]
    out = args.out or default_result_path("gate_split_prefill.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), "calls": CALLS, "results": rows}, indent=1) + "\n")
    print("| T | N | form | kernel us | temp MiB |\n|---:|---:|---|---:|---:|")
    for r in rows:
        mib = r["temp_bytes"] / 2**20
        print(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {r['kernel_us']:.1f} | {mib:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
