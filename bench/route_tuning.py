"""Block sizes of the routing kernel (meteora_jax/pallas/route_tokens.py) against XLA's routing (lora_mixture.route:
k rounds of max and argmax, then a softmax): device (kernel) time of top-2 routing from float32 logits [T, N] drawn
as a gate's would be, with each configuration's agreement with XLA's choices.

Usage: python bench/route_tuning.py [--out FILE]   (GPU)
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_sweep import fastest, output_path, sweep, write_rows  # noqa: E402
from meteora_layer import TOP_K, traced_kernel_ms  # noqa: E402

from meteora_jax.lora_mixture import route  # noqa: E402
from meteora_jax.pallas.route_tokens import RouteBlockSizes, route_tokens  # noqa: E402

CASES = ((16384, 256), (16384, 1024), (4096, 1024), (4096, 28))


def block_grid():
    for block_tokens, num_warps in itertools.product((16, 32), (4, 8)):
        yield RouteBlockSizes(block_tokens=block_tokens, num_warps=num_warps)


def main() -> None:
    out = output_path("route_tuning.json")
    rows = []
    for tokens, adapters in CASES:
        logits = jax.random.normal(jax.random.key(adapters), (tokens, adapters), jnp.float32)
        xla = jax.jit(lambda v: route(v, TOP_K, 1.0))
        ref_indices, _ = xla(logits)
        xla_ms = traced_kernel_ms(xla, (logits,))
        rows.append({"tokens": tokens, "adapters": adapters, "form": "xla", "kernel_ms": xla_ms})

        def measure(blocks):
            fn = jax.jit(lambda v: route_tokens(v, TOP_K, 1.0, blocks=blocks))
            indices, _ = fn(logits)
            return {"same_choices": float(jnp.mean(indices == ref_indices)),
                    "kernel_ms": traced_kernel_ms(fn, (logits,))}

        configs = sweep({"tokens": tokens, "adapters": adapters, "form": "kernel"}, "blocks", block_grid(), measure)
        rows += configs
        best = fastest(configs)
        summary = f"{best['kernel_ms'] * 1e3:.1f} us {best['blocks']}" if best else "none ran"
        print(f"T={tokens} N={adapters}: xla {xla_ms * 1e3:.1f} us; kernel best {summary}")
        write_rows(out, rows)


if __name__ == "__main__":
    main()
