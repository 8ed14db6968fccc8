"""Device time of the prefill gate logits x @ W_g (bfloat16, float32 out), written several ways.

At 4096 tokens and N = 256 cuBLAS takes 128 x 128 tiles for the gate's [4096, 4096] x [4096, 256]: 64 programs
on an H100's 132 multiprocessors (bench/NOTES.md). Splitting the inputs (K) in S parts as a batched matmul
gives S times the programs; the partial logits [S, T, N] then need a sum, which the routing kernel could do
as it reads them. Each form runs as 32 calls with their own gates in one program (as kernel_trace.py); each
call's logits feed the next call's input through a sum over all of them, so no form's output is cut short.
The table gives the matmul kernels' time per call apart from the chaining sum.

Usage (GPU): python bench/gate_prefill_forms.py [--out FILE] [--tokens T,...] [--adapters N,...]
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

from decode_tuning import int_list  # noqa: E402
from meteora_layer import environment  # noqa: E402
from profile_events import kernel_us_per_call  # noqa: E402
from result_path import default_result_path  # noqa: E402
from results_tables import is_matmul_kernel  # noqa: E402

CALLS = 32
IN_FEATURES = 4096


def split_inputs(parts: int) -> Callable:
    """x @ g as `parts` partial products over slices of the inputs: [parts, T, N] float32."""

    def form(x, g):
        t, i = x.shape
        return jnp.einsum("tsk,skn->stn", x.reshape(t, parts, i // parts), g.reshape(parts, i // parts, -1),
                          preferred_element_type=jnp.float32)

    return form


FORMS: dict[str, Callable] = {
    "dot": lambda x, g: jnp.dot(x, g, preferred_element_type=jnp.float32),
    "transposed (g.T @ x.T).T": lambda x, g: jnp.dot(g.T, x.T, preferred_element_type=jnp.float32).T,
    "inputs split in 2": split_inputs(2),
    "inputs split in 4": split_inputs(4),
}


def form_kernels_us(form: Callable, tokens: int, adapters: int) -> dict[str, float]:
    keys = jax.random.split(jax.random.key(tokens + adapters), CALLS + 1)
    gates = tuple((jax.random.normal(k, (IN_FEATURES, adapters)) * IN_FEATURES**-0.5).astype(jnp.bfloat16)
                  for k in keys[1:])
    x = jax.random.normal(keys[0], (tokens, IN_FEATURES), jnp.bfloat16)

    def program(x, gates):
        for g in gates:
            logits = form(x, g)
            x = x + jnp.sum(logits.reshape(-1, tokens, adapters), axis=(0, 2))[:, None].astype(x.dtype) * 1e-6
        return x

    return kernel_us_per_call(program, (x, gates), CALLS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tokens", type=int_list(), default=[4096, 16384])
    parser.add_argument("--adapters", type=int_list(), default=[256, 1024])
    args = parser.parse_args(argv)
    out = args.out or default_result_path("gate_prefill_forms.json")
    rows = []
    for t in args.tokens:
        for n in args.adapters:
            for name, form in FORMS.items():
                kernels = form_kernels_us(form, t, n)
                rows.append({"form": name, "tokens": t, "adapters": n, "kernels_us": kernels,
                             "matmul_us": sum(v for k, v in kernels.items() if is_matmul_kernel(k))})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), "calls_per_program": CALLS, "gate_dtype": "bfloat16",
                               "results": rows}, indent=1) + "\n")
    print("| T | N | form | matmul us per call | kernels (us per call) |\n|---:|---:|---|---:|---|")
    for r in rows:
        kernels = "; ".join(f"{k} {v:.1f}" for k, v in sorted(r["kernels_us"].items(), key=lambda kv: -kv[1]))
        print(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {r['matmul_us']:.1f} | {kernels} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
