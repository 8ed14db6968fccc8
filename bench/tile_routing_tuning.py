"""Warps of the `fused` strategy's tile routing kernel (meteora_jax/pallas/tile_routing.py): device (kernel) time
on top-2 choices routed in runs of 96 tokens (5% of choices random), checked equal to the plain reference.
--baseline PATH times another commit's tile_routing.py (e.g. `git show REV:meteora_jax/pallas/tile_routing.py`) on
the same inputs in the same run, since H100s lent at different times differ by up to 25% in these timings.

Usage: python bench/tile_routing_tuning.py [--baseline FILE] [--labels KERNEL,BASELINE] [--out FILE]   (GPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_sweep import fastest, sweep, write_rows  # noqa: E402
from meteora_layer import traced_kernel_ms  # noqa: E402
from result_path import default_result_path  # noqa: E402

from meteora_jax.pallas import tile_routing  # noqa: E402
from meteora_jax.pallas.routed_gemm import RoutedGemmBlockSizes  # noqa: E402

CASES = ((4096, 256), (16384, 256), (16384, 1024))
RUN_TOKENS = 96
SLOTS = 8  # r = 8
TILE_TOKENS = RoutedGemmBlockSizes().tile_tokens


def routed_choices(tokens: int, adapters: int, seed: int):
    rng = np.random.default_rng(seed)
    runs = np.repeat(rng.integers(0, adapters, (tokens // RUN_TOKENS + 1, 2)), RUN_TOKENS, axis=0)[:tokens]
    indices = np.where(rng.random((tokens, 2)) < 0.05, rng.integers(0, adapters, (tokens, 2)), runs)
    indices[:, 1] = np.where(indices[:, 1] == indices[:, 0], (indices[:, 0] + 1) % adapters, indices[:, 1])
    weights = rng.dirichlet([1, 1], tokens)
    scaling = rng.uniform(0.5, 2.0, adapters)
    return (jnp.asarray(indices, jnp.int32), jnp.asarray(weights, jnp.float32), jnp.asarray(scaling, jnp.float32))


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("baseline_tile_routing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another commit's meteora_jax/pallas/tile_routing.py")
    parser.add_argument("--labels", default="kernel,baseline", help="the two forms' names in the rows")
    parser.add_argument("--out", type=Path, default=default_result_path("tile_routing_tuning.json"))
    args = parser.parse_args()
    kernel_label, baseline_label = args.labels.split(",")
    forms = {kernel_label: tile_routing}
    if args.baseline:
        forms[baseline_label] = load_module(args.baseline)
    rows = []
    for tokens, adapters in CASES:
        choices = routed_choices(tokens, adapters, seed=adapters)
        ref = tile_routing.route_tiles_reference(*choices, tile_tokens=TILE_TOKENS, slots=SLOTS)
        for form, module in forms.items():

            def measure(blocks, module=module):
                fn = jax.jit(lambda *a: module.route_tiles(*a, tile_tokens=TILE_TOKENS, slots=SLOTS, blocks=blocks))
                got = fn(*choices)
                same = all(bool(jnp.array_equal(g, w)) for g, w in zip(got, ref))
                return {"same_as_reference": same, "kernel_ms": traced_kernel_ms(fn, choices, "meteora_route_tiles")}

            grid = (module.TileRoutingBlockSizes(num_warps=w) for w in (4, 8, 16))
            configs = sweep({"tokens": tokens, "adapters": adapters, "form": form}, "blocks", grid, measure)
            rows += configs
            best = fastest(configs)
            summary = f"{best['kernel_ms'] * 1e3:.1f} us {best['blocks']}" if best else "none ran"
            print(f"T={tokens} N={adapters} {form}: best {summary}")
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
