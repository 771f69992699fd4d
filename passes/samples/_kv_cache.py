"""The key/value cache of `tiny-llama` built with `kv_cache=True`, as `torch.onnx.export` writes a
Hugging Face Llama called with `past_key_values`.

Inputs: `input_ids` [batch, seq], `attention_mask` [batch, total] (1 = attend, 0 = padding),
`position_ids` [batch, seq], then per layer `past_key_values.{i}.key` / `.value`
[batch, kv_heads, past, head_dim]. Outputs: `logits`, then per layer `present.{i}.key` / `.value`
[batch, kv_heads, total, head_dim] = `cat([past, new], dim=-2)`, total = past + seq.

The model builds one additive mask [batch, 1, seq, total] before its layers, as `LlamaModel` does:
key j is visible to query i iff j <= past + i (causal in absolute positions) and
`attention_mask[b, j] == 1`; `Where(visible, 0, finfo(float32).min)` is added to every layer's scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from passes.samples._blocks import SampleConfig
from passes.samples._builder import FLOAT32_MIN, GraphBuilder

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache tensors: graph inputs `past_*`, graph outputs `present_*`."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass(frozen=True)
class KvCache:
    """What the layers of a cached decoder read."""

    mask: str  # additive [batch, 1, seq, total]
    position_ids: str  # graph input [batch, seq]
    layers: tuple[LayerCache, ...]


def layer_caches(layers: int) -> tuple[LayerCache, ...]:
    return tuple(LayerCache(f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                            f"present.{i}.key", f"present.{i}.value") for i in range(layers))


def kv_cache(b: GraphBuilder, cfg: SampleConfig) -> KvCache:
    """The cache's names and the shared mask (built here, so its nodes come before the layers')."""
    layers = layer_caches(cfg.layers)
    return KvCache(padded_causal_mask(b, layers[0].past_key), POSITION_IDS, layers)


def padded_causal_mask(b: GraphBuilder, past_key: str) -> str:
    """`Where(causal & attention_mask == 1, 0, float32 min)`: [batch, 1, seq, total]."""
    past_len = b.dim(past_key, 2)
    queries = b.op("Range", [b.const(0), b.dim(INPUT_IDS, 1), b.const(1)])
    queries = b.op("Add", [queries, past_len])  # absolute positions of the new tokens
    keys = b.op("Range", [b.const(0), b.dim(ATTENTION_MASK, 1), b.const(1)])
    causal = b.op("LessOrEqual", [b.unsqueeze(keys, [0]), b.unsqueeze(queries, [1])])  # [seq, total]
    attended = b.op("Equal", [ATTENTION_MASK, b.const(1)])  # [batch, total]
    visible = b.op("And", [b.unsqueeze(causal, [0, 1]), b.unsqueeze(attended, [1, 2])])
    return b.op("Where", [visible, b.const(0.0), b.const(FLOAT32_MIN)])


def append_past(b: GraphBuilder, past: str, new: str, present: str) -> str:
    """`torch.cat([past, new], dim=-2)`, written to graph output `present`."""
    return b.op("Concat", [past, new], axis=-2, output=present)


def total_length_1d(b: GraphBuilder, new: str, past: str) -> str:
    """`new.shape[-2] + past.shape[-2]` as shape [1] (HF's `kv_seq_len`), in the style's dim idiom."""
    if b.style.shape_slices:
        return b.op("Add", [b.dim_1d(new, 2), b.dim_1d(past, 2)])
    return b.unsqueeze(b.op("Add", [b.dim(new, 2), b.dim(past, 2)]), [0])


def cache_inputs(cfg: SampleConfig) -> list[onnx.ValueInfoProto]:
    """`attention_mask`, `position_ids` and the pasts (after `input_ids`)."""
    infos = [helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total"]),
             helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch", "seq"])]
    for layer in layer_caches(cfg.layers):
        infos += [_cache_info(layer.past_key, cfg, "past"), _cache_info(layer.past_value, cfg, "past")]
    return infos


def cache_outputs(cfg: SampleConfig) -> list[onnx.ValueInfoProto]:
    """The presents (after `logits`)."""
    infos = []
    for layer in layer_caches(cfg.layers):
        infos += [_cache_info(layer.present_key, cfg, "total"), _cache_info(layer.present_value, cfg, "total")]
    return infos


def _cache_info(name: str, cfg: SampleConfig, length: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", cfg.kv_heads, length, cfg.head_dim])
