"""Device time and temporaries of the Pallas strategies' prefill gate and routing, written several ways.

Each form computes x @ W_g (x bfloat16 [T, 4096], a bfloat16 gate) and routes its tokens with
meteora_jax/pallas/route_tokens.py (top-2):
  - "xla dot": XLA's dot to the logits, then the routing kernel (before session 14). Where the output is small
    XLA splits the dot over its inputs itself and adds the halves in a reduction kernel of its own.
  - "xla shares S": the inputs in S slices as one batched XLA matmul; the routing kernel adds the S shares.
  - "pallas BMxBNxBK sS": meteora_jax/pallas/gate_shares.py's kernel (tiles of BM tokens x BN columns, BK-input steps,
    S slices), which needs no cuBLAS workspace; the routing kernel adds its shares.
The table gives every kernel's time per call, the compiled temporaries (which count the workspace XLA gives cuBLAS,
up to 32 MiB), and the share of tokens whose choices match the first form's.

Usage (GPU): python bench/gate_routing_forms.py [--out FILE] [--cases TxN,...]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_tuning import int_list  # noqa: E402
from meteora_layer import environment, temp_bytes, traced_kernel_ms  # noqa: E402

from meteora_jax.gate_logits import compute_gate_logits, gate_logit_shares  # noqa: E402
from meteora_jax.pallas.gate_shares import GateSharesBlockSizes, gate_shares_matmul  # noqa: E402
from meteora_jax.pallas.route_tokens import route_tokens  # noqa: E402

IN_FEATURES = 4096
DEFAULT_CASES = "1024x256,2048x256,4096x256,8192x256,16384x256,1024x1024,2048x1024,4096x1024,16384x1024,4096x28," \
                "16384x28"
# (block_tokens, block_columns, block_in, splits, num_warps, num_stages); measured up to 4096 tokens.
PALLAS_TILES = ((128, 128, 64, 1, 4, 4), (128, 128, 64, 2, 4, 4), (64, 128, 64, 1, 4, 4), (64, 128, 64, 2, 4, 4),
                (128, 128, 64, 4, 4, 4), (64, 256, 64, 1, 8, 3), (128, 256, 64, 2, 8, 3))
PALLAS_MAX_TOKENS = 4096


def forms(tokens: int, adapters: int) -> dict:
    found = {"xla dot": lambda x, g: compute_gate_logits(x, g)[:, None]}
    for splits in (2, 4):
        found[f"xla shares {splits}"] = functools.partial(lambda x, g, s: gate_logit_shares(x, g, s), s=splits)
    if tokens <= PALLAS_MAX_TOKENS:
        for bm, bn, bk, splits, warps, stages in PALLAS_TILES:
            if adapters % bn:
                continue
            blocks = GateSharesBlockSizes(block_tokens=bm, block_columns=bn, block_in=bk, num_warps=warps,
                                          num_stages=stages)
            matmul = functools.partial(gate_shares_matmul, blocks=blocks)
            found[f"pallas {bm}x{bn}x{bk} s{splits} w{warps} st{stages}"] = functools.partial(
                lambda x, g, s, m: gate_logit_shares(x, g, s, m), s=splits, m=matmul)
    return found


def measure(tokens: int, adapters: int) -> list[dict]:
    x = jax.random.normal(jax.random.key(0), (tokens, IN_FEATURES), jnp.bfloat16)
    gate = (jax.random.normal(jax.random.key(1), (IN_FEATURES, adapters)) * IN_FEATURES**-0.5).astype(jnp.bfloat16)
    rows, first = [], None
    for name, shares in forms(tokens, adapters).items():
        fn = jax.jit(lambda x, g, shares=shares: route_tokens(shares(x, g), 2, 1.0))
        compiled = fn.lower(x, gate).compile()
        indices, _ = fn(x, gate)
        first = indices if first is None else first
        rows.append({"tokens": tokens, "adapters": adapters, "form": name,
                     "kernel_us": traced_kernel_ms(fn, (x, gate)) * 1e3, "temp_bytes": temp_bytes(compiled),
                     "same_choices": float(jnp.mean(jnp.all(indices == first, axis=-1)))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", type=int_list("x", 2), default=int_list("x", 2)(DEFAULT_CASES))
    args = parser.parse_args(argv)
    from result_path import default_result_path

    out = args.out or default_result_path("gate_routing_forms.json")
    rows = [row for tokens, adapters in args.cases for row in measure(tokens, adapters)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), "gate_dtype": "bfloat16", "in_features": IN_FEATURES,
                               "results": rows}, indent=1) + "\n")
    print("| T | N | form | kernels us | temp MiB | same choices |\n|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['adapters']} | {r['form']} | {r['kernel_us']:.1f} | "
              f"{r['temp_bytes'] / 2**20:.1f} | {r['same_choices']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
