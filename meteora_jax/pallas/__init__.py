"""Pallas GPU kernels for the low-memory MeteoRA path (see README.md in this folder)."""

from meteora_jax.pallas.decode_layer import DecodeBlockSizes, decode_layer, decode_layer_reference
from meteora_jax.pallas.dense_expand import DenseExpandBlockSizes, dense_expand_add, dense_expand_reference
from meteora_jax.pallas.lora_gather import GatherBlockSizes, lora_gather, lora_gather_reference
from meteora_jax.pallas.lora_segment import SegmentBlockSizes, group_by_adapter, lora_segment, lora_segment_add
from meteora_jax.pallas.mixture import mixture_pallas, mixture_pallas_add

__all__ = [
    "DecodeBlockSizes",
    "DenseExpandBlockSizes",
    "GatherBlockSizes",
    "SegmentBlockSizes",
    "decode_layer",
    "decode_layer_reference",
    "dense_expand_add",
    "dense_expand_reference",
    "group_by_adapter",
    "lora_gather",
    "lora_gather_reference",
    "lora_segment",
    "lora_segment_add",
    "mixture_pallas",
    "mixture_pallas_add",
]
