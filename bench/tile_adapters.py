"""Design experiment: the adapter mixture per token tile, over the few adapters that tile's tokens chose.

Prefill tokens route in runs (the tokens of one task choose the same pair of adapters), so a tile of 64
neighbouring tokens chooses only a few distinct adapters. Two Pallas kernels, as a LoRA would run:
    shrink   one program per tile: h = x_tile @ [A_u for the tile's U adapters], scaled per token by its
             routing coefficient for u (zero if it did not choose u);
    expand   one program per (tile, output tile): y += h @ [B_u ...], added into y in place.
x is read once and y read and written once, where the grouped kernels read x and write y once per slot. A tile
whose tokens chose more than U adapters (at a run's edge) takes a second pass over the next U; adapters past 2U
are dropped by this prototype, and counted.

Against the mixture alone of `bmm` and the grouped (`pallas`) kernels, on the inputs of
`meteora_layer.py --segment-tokens`: device (kernel) time and the error against the reference.

Usage: python bench/tile_adapters.py [--smoke] [--out FILE]   (GPU; --smoke runs tiny shapes interpreted)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meteora_layer import Case, environment, kernel_ms_per_call, make_params, segment_inputs  # noqa: E402
from result_path import default_result_path  # noqa: E402

from meteora_jax.lora_mixture import compute_gate_logits, mixture_bmm, route  # noqa: E402
from meteora_jax.pallas.mixture import mixture_pallas_add  # noqa: E402

TOP_K, TEMPERATURE = 2, 1.0
RANK_BLOCK = 16  # Triton's smallest dot dimension; ranks below it are zero-padded


def tile_routing(indices, coef, num_adapters: int, block_tokens: int, slots: int):
    """Per tile: its first `slots` distinct adapters [tiles, U] (padding repeats adapter 0 with zero weight), each
    token's coefficient per slot [T, U], and per tile the number of distinct adapters it chose [tiles]."""
    t, k = indices.shape
    tiles = t // block_tokens
    per_tile = indices.reshape(tiles, block_tokens * k)

    def one_tile(chosen):
        distinct = jnp.unique(chosen, size=slots, fill_value=num_adapters)
        count = jnp.sum(jnp.diff(jnp.sort(chosen)) != 0) + 1
        return distinct, count

    adapters, counts = jax.vmap(one_tile)(per_tile)
    tile_of_token = jnp.arange(t) // block_tokens
    match = indices[:, :, None] == adapters[tile_of_token][:, None, :]  # [T, K, U]
    token_coef = jnp.einsum("tk,tku->tu", coef, match.astype(coef.dtype))
    return jnp.where(adapters == num_adapters, 0, adapters), token_coef, counts


def _shrink_group(adapters_ref, coef_ref, x_ref, a_ref, h_ref, tile, group, *, in_features, rank, block_tokens,
                  block_in, slots):
    """h for the tile's adapter slots group * U .. group * U + U - 1."""
    ranks = jnp.arange(RANK_BLOCK)
    first = group * slots
    adapters = [adapters_ref[tile, first + u] for u in range(slots)]

    def step(j, accs):
        start = j * block_in
        cols = start + jnp.arange(block_in)
        x = plt.load(x_ref.at[pl.ds(tile * block_tokens, block_tokens), pl.ds(start, block_in)],
                     mask=cols[None, :] < in_features, other=0)
        return tuple(
            acc + jnp.dot(x, plt.load(a_ref.at[adapter, pl.ds(start, block_in), pl.ds(0, RANK_BLOCK)],
                                      mask=(cols[:, None] < in_features) & (ranks[None, :] < rank), other=0),
                          preferred_element_type=jnp.float32)
            for acc, adapter in zip(accs, adapters)
        )

    zeros = tuple(jnp.zeros((block_tokens, RANK_BLOCK), jnp.float32) for _ in range(slots))
    accs = jax.lax.fori_loop(0, pl.cdiv(in_features, block_in), step, zeros)
    for u in range(slots):
        c = plt.load(coef_ref.at[pl.ds(tile * block_tokens, block_tokens), jnp.int32(first + u)])
        plt.store(h_ref.at[pl.ds(tile * block_tokens, block_tokens), pl.ds((first + u) * RANK_BLOCK, RANK_BLOCK)],
                  (accs[u] * c[:, None]).astype(h_ref.dtype))


def _shrink_kernel(counts_ref, adapters_ref, coef_ref, x_ref, a_ref, h_ref, **sizes):
    tile = pl.program_id(0)
    _shrink_group(adapters_ref, coef_ref, x_ref, a_ref, h_ref, tile, 0, **sizes)

    @pl.when(counts_ref[tile] > sizes["slots"])  # the second pass only for a tile that chose more adapters
    def _():
        _shrink_group(adapters_ref, coef_ref, x_ref, a_ref, h_ref, tile, 1, **sizes)


def _expand_group(adapters_ref, h_ref, b_ref, out_ref, tile, first_col, group, *, out_features, rank, block_tokens,
                  block_out, slots):
    """y tile += the product of the tile's adapter slots group * U .. group * U + U - 1."""
    cols = first_col + jnp.arange(block_out)
    ranks = jnp.arange(RANK_BLOCK)
    acc = jnp.zeros((block_tokens, block_out), jnp.float32)
    for u in range(group * slots, group * slots + slots):
        h = plt.load(h_ref.at[pl.ds(tile * block_tokens, block_tokens), pl.ds(u * RANK_BLOCK, RANK_BLOCK)])
        b = plt.load(b_ref.at[adapters_ref[tile, u], pl.ds(0, RANK_BLOCK), pl.ds(first_col, block_out)],
                     mask=(ranks[:, None] < rank) & (cols[None, :] < out_features), other=0)
        acc += jnp.dot(h, b, preferred_element_type=jnp.float32)
    tile_ref = out_ref.at[pl.ds(tile * block_tokens, block_tokens), pl.ds(first_col, block_out)]
    plt.store(tile_ref, (plt.load(tile_ref).astype(jnp.float32) + acc).astype(out_ref.dtype))


def _expand_kernel(counts_ref, adapters_ref, h_ref, b_ref, y_ref, out_ref, **sizes):
    del y_ref  # aliased to out_ref
    # Program ids are read here: interpret mode cannot read them inside pl.when's branch.
    tile, first_col = pl.program_id(0), pl.program_id(1) * sizes["block_out"]
    _expand_group(adapters_ref, h_ref, b_ref, out_ref, tile, first_col, 0, **sizes)

    @pl.when(counts_ref[tile] > sizes["slots"])
    def _():
        _expand_group(adapters_ref, h_ref, b_ref, out_ref, tile, first_col, 1, **sizes)


@functools.partial(jax.jit, static_argnames=("block_tokens", "slots", "block_in", "block_out", "interpret"))
def tile_mixture_add(x, lora_a, lora_b, scaling, indices, weights, y, *, block_tokens=64, slots=4, block_in=128,
                     block_out=128, interpret=False):
    """(y + the mixture, each tile's count of distinct adapters). A tile's first `slots` adapters take one pass,
    the next `slots` a second pass run only where the tile chose more; adapters past 2 x slots are dropped (the
    counts show where). Tokens a multiple of block_tokens (a prototype)."""
    t, i = x.shape
    n, _, r = lora_a.shape
    o = lora_b.shape[-1]
    coef = weights * scaling[indices]
    adapters, token_coef, counts = tile_routing(indices, coef, n, block_tokens, 2 * slots)
    h = pl.pallas_call(
        functools.partial(_shrink_kernel, in_features=i, rank=r, block_tokens=block_tokens, block_in=block_in,
                          slots=slots),
        out_shape=jax.ShapeDtypeStruct((t, 2 * slots * RANK_BLOCK), x.dtype),
        grid=(t // block_tokens,),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="tile_shrink",
    )(counts, adapters, token_coef, x, lora_a)
    out = pl.pallas_call(
        functools.partial(_expand_kernel, out_features=o, rank=r, block_tokens=block_tokens, block_out=block_out,
                          slots=slots),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(t // block_tokens, pl.cdiv(o, block_out)),
        input_output_aliases={4: 0},
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="tile_expand",
    )(counts, adapters, h, lora_b, y)
    return out, counts


def kernel_us(fn, *args) -> float:
    return kernel_ms_per_call(jax.jit(fn).lower(*args).compile(), args, calls=1) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--slots", default="2,4", help="comma-separated adapters per tile and pass to try")
    parser.add_argument("--adapters", default="256,1024")
    parser.add_argument("--tokens", default="4096,16384")
    args = parser.parse_args(argv)
    shapes = [Case(64, 96, 8, 256)] if args.smoke else [
        Case(4096, 4096, int(n), int(t)) for n in args.adapters.split(",") for t in args.tokens.split(",")]
    segment = 64 if args.smoke else 256
    rows = []
    for case in shapes:
        p = make_params(case, jax.random.key(case.adapters))
        x = segment_inputs(jax.random.key(case.tokens), case.tokens, p["gate"], segment)
        y = x @ p["w"]
        indices, weights = route(compute_gate_logits(x, p["gate"]), TOP_K, TEMPERATURE)
        args_ = (x, p["lora_a"], p["lora_b"], p["scaling"], indices, weights)
        ref = y.astype(jnp.float32) + mixture_bmm(*args_)
        for slots in map(int, args.slots.split(",")):
            out, counts = tile_mixture_add(*args_, y, slots=slots, interpret=args.smoke)
            err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref - y.astype(jnp.float32)))
            row = {"adapters": case.adapters, "tokens": case.tokens, "slots": slots, "rel_error_of_delta": err,
                   "tiles_in_second_pass": float(jnp.mean(counts > slots)),
                   "tiles_over_two_passes": float(jnp.mean(counts > 2 * slots)), "max_distinct": int(counts.max())}
            if not args.smoke:
                row["tile_us"] = kernel_us(lambda *a, s=slots: tile_mixture_add(*a, slots=s)[0], *args_, y)
            rows.append(row)
        if not args.smoke:
            rows[-1]["bmm_us"] = kernel_us(lambda *a: a[-1] + mixture_bmm(*a[:-1]).astype(a[-1].dtype), *args_, y)
            rows[-1]["grouped_us"] = kernel_us(lambda *a: mixture_pallas_add(*a[:-1], a[-1]), *args_, y)
        print(json.dumps(rows[-2:]), flush=True)
    out = args.out or default_result_path("tile_adapters.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), "segment_tokens": segment, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
