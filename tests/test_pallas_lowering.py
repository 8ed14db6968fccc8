"""Every GPU kernel lowers for CUDA, checked on the CPU: interpret mode runs a kernel's semantics but not Pallas'
Triton and Mosaic GPU lowerings, which reject operations the interpreter accepts. jax lowers for a platform this
machine lacks; compiling the lowered kernels to GPU code still needs the GPU (the `gpu` tests)."""

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meteora_jax.gate_logits import gate_logit_shares
from meteora_jax.pallas.decode_layer import decode_layer
from meteora_jax.pallas.dense_expand import dense_expand_add
from meteora_jax.pallas.fused_linear import fused_linear
from meteora_jax.pallas.gate_shares import gate_shares_matmul
from meteora_jax.pallas.mixture import mixture_pallas
from meteora_jax.pallas.pair_grads import pair_adapter_grads
from meteora_jax.pallas.route_tokens import route_tokens
from meteora_jax.pallas.tile_routing import route_tiles
from meteora_jax.pallas.tile_shrink import TileShrinkBlockSizes, tile_shrink

IN, OUT, N, R = 128, 256, 6, 8


def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def mixture_operands(tokens):
    return (spec((tokens, IN)), spec((N, IN, R)), spec((N, R, OUT)), spec((N,), jnp.float32),
            spec((tokens, 2), jnp.int32), spec((tokens, 2), jnp.float32))


def forward_and_backward(layer):
    """The layer's summed output and its gradients in x (first operand) and the routing weights (last), so the
    forward's kernels and the backward's both lower: a gradient alone lets jax drop forward kernels it needs no
    output of."""

    def run(x, *operands):
        *fixed, weights = operands

        def loss(x, weights):
            return jnp.sum(layer(x, *fixed, weights).astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=(0, 1))(x, weights)

    return run


def mixture(x, a, b, scaling, indices, weights):
    return mixture_pallas(x, a, b, scaling, indices, weights, interpret=False)


def fused(x, w, a, b, scaling, indices, weights):
    return fused_linear(x, w, a, b, scaling, indices, weights, interpret=False)


def decode(x, gate, y, a, b, scaling):
    return decode_layer(x, gate, y, a, b, scaling, top_k=2, temperature=1.0, interpret=False)


def dense_expand(h, b, y):
    return dense_expand_add(h, b, y, interpret=False)


# Each case: the layer, its operands, and the kernels its module must call: ours by name, "mosaic_gpu" for the
# routed GEMM (Mosaic GPU names it no more precisely).
CASES = {
    "pallas mixture, decode (gather kernel)": (forward_and_backward(mixture), mixture_operands(4),
                                               {"meteora_lora_gather"}),
    "pallas mixture, prefill (segment kernels)": (forward_and_backward(mixture), mixture_operands(64),
                                                  {"meteora_lora_shrink", "meteora_lora_expand"}),
    "decode layer (gate, routing, shrink, expand)": (
        decode, (spec((4, IN)), spec((IN, N), jnp.float32), spec((4, OUT)), spec((N, IN, R)), spec((N, R, OUT)),
                 spec((N,), jnp.float32)), {"meteora_decode_gate", "meteora_decode_route_shrink",
                                            "meteora_decode_expand_add"}),
    "dense expand": (dense_expand, (spec((64, N * R)), spec((N * R, OUT)), spec((64, OUT))), {"meteora_dense_expand"}),
    # The missed pairs' shrink runs in the tile shrink's launch: no meteora_missed_shrink.
    "fused (tile routing, tile shrink with the missed shrink, routed GEMM, missed add)": (
        forward_and_backward(fused), (spec((256, IN)), spec((IN, OUT)), *mixture_operands(256)[1:]),
        {"meteora_route_tiles", "meteora_tile_shrink", "mosaic_gpu", "meteora_missed_add", "meteora_pair_grads"}),
    "the missed pairs' adapter gradients (atomic adds)": (
        pair_adapter_grads, (spec((256, IN)), *mixture_operands(256)[1:3], spec((256, 2), jnp.int32),
                             spec((256, 2), jnp.float32), spec((256, OUT))), {"meteora_pair_adapter_grads"}),
    "tile routing with votes counted pairwise (N > 256)": (
        lambda indices, weights, scaling: route_tiles(indices, weights, scaling, tile_tokens=128, slots=8),
        (spec((256, 2), jnp.int32), spec((256, 2), jnp.float32), spec((300,), jnp.float32)), {"meteora_route_tiles"}),
    "routing of many tokens": (lambda logits: route_tokens(logits, 2, 1.0), (spec((64, N), jnp.float32),),
                               {"meteora_route_tokens"}),
    "gate shares (a float32 gate in two parts, two input slices) and their routing": (
        lambda x, gate: route_tokens(gate_logit_shares(x, gate, 2, functools.partial(gate_shares_matmul,
                                                                                     interpret=False)), 2, 1.0),
        (spec((64, IN)), spec((IN, N), jnp.float32)), {"meteora_gate_shares", "meteora_route_tokens"}),
    "tile shrink at rank 12 (padded lanes)": (
        lambda x, a, adapters, coef: tile_shrink(x, a, adapters, coef, tile_tokens=256),
        (spec((256, IN)), spec((N, IN, 12)), spec((1, 5), jnp.int32), spec((256, 5), jnp.float32)),
        {"meteora_tile_shrink"}),
    "tile shrink in one split": (
        lambda x, a, adapters, coef: tile_shrink(x, a, adapters, coef, tile_tokens=256,
                                                 blocks=TileShrinkBlockSizes(splits=1)),
        (spec((256, IN)), spec((N, IN, R)), spec((1, 64 // R), jnp.int32), spec((256, 64 // R), jnp.float32)),
        {"meteora_tile_shrink"}),
}


@pytest.fixture(scope="module")
def cuda_lowering():
    """Skips where this jax cannot lower Triton kernels for CUDA without a GPU: jaxlib 0.10.2 only serialises the
    kernel; later ones compile it while lowering, which needs the CUDA plugin's Triton compiler."""

    def add_one(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1

    probe = pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                           compiler_params=plt.CompilerParams(num_warps=1))
    try:
        jax.jit(probe).trace(jax.ShapeDtypeStruct((16,), jnp.float32)).lower(lowering_platforms=("cuda",))
    except RuntimeError as error:
        if "Triton compilation handler" not in str(error):
            raise
        pytest.skip(f"this jax compiles Triton kernels while lowering and has no CUDA compiler here: {error}")


@pytest.mark.parametrize("name", CASES)
def test_kernels_lower_for_cuda(name, monkeypatch, cuda_lowering):
    routed_gemm = importlib.import_module("meteora_jax.pallas.routed_gemm")
    monkeypatch.setattr(routed_gemm, "on_hopper", lambda: True)
    monkeypatch.setattr(routed_gemm, "program_count", lambda interpret: 132)  # an H100's multiprocessors
    fn, operands, kernels = CASES[name]
    module = jax.jit(fn).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    calls = set(re.findall(r"stablehlo.custom_call @([\w$.]+)", module))
    # Triton kernels: __gpu$xla.gpu.triton (jaxlib 0.10) or triton_kernel_call_ffi; Mosaic GPU: mosaic_gpu_v2.
    backends = {backend for backend in ("triton", "mosaic_gpu") if any(backend in call for call in calls)}
    assert backends == {"triton"} | (kernels & {"mosaic_gpu"})
    assert set(re.findall(r"meteora_(?!jax\b)[a-z_]+", module)) | (backends & {"mosaic_gpu"}) == kernels
