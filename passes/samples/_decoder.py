"""`tiny-llama`: a Llama-style decoder (RMSNorm, rotary Q/K, causal attention, SwiGLU MLP).

Q/K/V projections carry biases (as Qwen's do); with `kv_heads < heads` K/V have fewer heads and
`repeat_kv` spreads them over the query heads (grouped-query attention). Rotary tables are cached
up to `MAX_POSITIONS` and sliced to the key length in every layer, and every layer builds its own
causal mask from the query and key lengths, as per-layer attention modules traced by TorchScript do.
With a KV cache (`_kv_cache`) positions come from the `position_ids` input, keys and values are
appended to the pasts, and one padded causal mask built from `attention_mask` serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from passes.samples._blocks import (
    SampleConfig,
    attend,
    attention_scores,
    linear,
    merge_heads,
    project_heads,
    repeat_kv,
    rms_norm,
)
from passes.samples._builder import (
    FLOAT32_MIN,
    INT64_MAX,
    GraphBuilder,
    ExportStyle,
    float_output,
    token_input,
)
from passes.samples._kv_cache import (
    KvCache,
    LayerCache,
    append_past,
    cache_inputs,
    cache_outputs,
    kv_cache,
    total_length_1d,
)

MAX_POSITIONS = 2048
ROPE_THETA = 10000.0
RMS_EPS = 1e-6


@dataclass(frozen=True)
class Rotary:
    """Tensors every layer's rotary embedding reads."""

    cos_cache: str  # [MAX_POSITIONS, head_dim]
    sin_cache: str
    position_ids: str  # [1, seq], or the [batch, seq] graph input with a KV cache


def _rotary(b: GraphBuilder, input_ids: str, cfg: SampleConfig, position_ids: str | None) -> Rotary:
    """Cos/sin tables (fixed, not random) and `position_ids`, by default `Range(0, seq)[None]`."""
    inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    freqs = np.outer(np.arange(MAX_POSITIONS, dtype=np.float64), inv_freq)
    angles = np.concatenate([freqs, freqs], axis=-1)
    cos = b.initializer("rotary_emb.cos_cached", np.cos(angles).astype(np.float32))
    sin = b.initializer("rotary_emb.sin_cached", np.sin(angles).astype(np.float32))
    if position_ids is None:
        positions = b.op("Range", [b.const(0), b.dim(input_ids, 1), b.const(1)])
        position_ids = b.unsqueeze(positions, [0])
    return Rotary(cos, sin, position_ids)


def _cos_sin(b: GraphBuilder, rotary: Rotary, k: str, past_key: str | None) -> tuple[str, str]:
    """`cache[:kv_len][position_ids].unsqueeze(1)` for cos and sin: [1 or batch, 1, seq, head_dim];
    kv_len counts the past keys too."""
    tables = []
    with b.scope("rotary_emb"):
        for cache in (rotary.cos_cache, rotary.sin_cache):
            ends = b.dim_1d(k, 2) if past_key is None else total_length_1d(b, k, past_key)
            table = b.op("Slice", [cache, b.const([0]), ends, b.const([0]), b.const([1])])
            tables.append(table)
    cos, sin = (b.unsqueeze(b.op("Gather", [t, rotary.position_ids]), [1]) for t in tables)
    return cos, sin


def _rotate_half(b: GraphBuilder, x: str, head_dim: int) -> str:
    """`cat(-x[..., half:], x[..., :half])`, the half taken from the traced shape."""
    x1 = b.op("Slice", [x, b.const([0]), b.half_dim_1d(x, 3, head_dim), b.const([3]), b.const([1])])
    starts = b.half_dim_1d(x, 3, head_dim)
    x2 = b.op("Slice", [x, starts, b.const([INT64_MAX]), b.const([3]), b.const([1])])
    return b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)


def _apply_rotary(b: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """`x * cos + rotate_half(x) * sin`."""
    rotated = b.op("Mul", [_rotate_half(b, x, head_dim), sin])
    return b.op("Add", [b.op("Mul", [x, cos]), rotated])


def _causal_mask(b: GraphBuilder, q: str, k: str) -> str:
    """Additive mask [1, 1, q_len, k_len]: 0 where key <= query position, float32 min after it."""
    q_len, k_len = b.dim(q, 2), b.dim(k, 2)
    rows = b.op("Range", [b.const(0), q_len, b.const(1)])
    cols = b.op("Range", [b.const(0), k_len, b.const(1)])
    rows = b.op("Add", [rows, b.op("Sub", [k_len, q_len])])
    future = b.op("Greater", [b.unsqueeze(cols, [0]), b.unsqueeze(rows, [1])])
    mask = b.op("Where", [future, b.const(FLOAT32_MIN), b.const(0.0)])
    return b.unsqueeze(mask, [0, 1])


def _self_attention(b: GraphBuilder, x: str, rotary: Rotary, cfg: SampleConfig,
                    mask: str | None, cache: LayerCache | None) -> str:
    """Attention over this step's keys, or with `cache` over past + new keys under the shared `mask`."""
    q = project_heads(b, x, "q_proj", cfg)
    k = project_heads(b, x, "k_proj", cfg, cfg.kv_heads)
    v = project_heads(b, x, "v_proj", cfg, cfg.kv_heads)
    cos, sin = _cos_sin(b, rotary, k, None if cache is None else cache.past_key)
    q = _apply_rotary(b, q, cos, sin, cfg.head_dim)
    k = _apply_rotary(b, k, cos, sin, cfg.head_dim)
    if cache is not None:
        k = append_past(b, cache.past_key, k, cache.present_key)
        v = append_past(b, cache.past_value, v, cache.present_value)
    all_k, all_v = repeat_kv(b, k, cfg), repeat_kv(b, v, cfg)
    scores = attention_scores(b, q, all_k, cfg)
    scores = b.op("Add", [scores, _causal_mask(b, q, k) if mask is None else mask])
    context = merge_heads(b, attend(b, scores, all_v), x, cfg)
    return linear(b, context, "o_proj", cfg.hidden, cfg.hidden)


def _swiglu(b: GraphBuilder, x: str, cfg: SampleConfig) -> str:
    """`down(silu(gate(x)) * up(x))` with SiLU written as `x * Sigmoid(x)`."""
    gate = linear(b, x, "gate_proj", cfg.hidden, cfg.intermediate, bias=False)
    with b.scope("act_fn"):
        activated = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    up = linear(b, x, "up_proj", cfg.hidden, cfg.intermediate, bias=False)
    product = b.op("Mul", [activated, up])
    return linear(b, product, "down_proj", cfg.intermediate, cfg.hidden, bias=False)


def _decoder_layer(b: GraphBuilder, x: str, rotary: Rotary, cfg: SampleConfig,
                   cache: KvCache | None, index: int) -> str:
    with b.scope("input_layernorm"):
        h = rms_norm(b, x, cfg.hidden, RMS_EPS)
    with b.scope("self_attn"):
        if cache is None:
            h = _self_attention(b, h, rotary, cfg, None, None)
        else:
            h = _self_attention(b, h, rotary, cfg, cache.mask, cache.layers[index])
    x = b.op("Add", [x, h])
    with b.scope("post_attention_layernorm"):
        h = rms_norm(b, x, cfg.hidden, RMS_EPS)
    with b.scope("mlp"):
        h = _swiglu(b, h, cfg)
    return b.op("Add", [x, h])


def build_decoder(cfg: SampleConfig, style: ExportStyle, *, with_kv_cache: bool = False) -> onnx.ModelProto:
    """The `tiny-llama` graph: `input_ids` [batch, seq] -> `logits` [batch, seq, vocab]; with
    `with_kv_cache` also `attention_mask`, `position_ids` and past -> present keys and values (`_kv_cache`)."""
    b = GraphBuilder(style, cfg.seed)
    with b.scope("embed_tokens"):
        x = b.op("Gather", [b.param("weight", (cfg.vocab, cfg.hidden)), "input_ids"])
    cache = kv_cache(b, cfg) if with_kv_cache else None
    rotary = _rotary(b, "input_ids", cfg, None if cache is None else cache.position_ids)
    for index in range(cfg.layers):
        with b.scope(f"layers.{index}"):
            x = _decoder_layer(b, x, rotary, cfg, cache, index)
    with b.scope("norm"):
        x = rms_norm(b, x, cfg.hidden, RMS_EPS)
    with b.scope("lm_head"):
        b.op("MatMul", [x, b.param("weight", (cfg.hidden, cfg.vocab))], output="logits")
    doc = (f"tiny-llama ({style.idiom}, opset {style.opset}): layers={cfg.layers} hidden={cfg.hidden} "
           f"heads={cfg.heads} vocab={cfg.vocab} intermediate={cfg.intermediate} seed={cfg.seed}")
    if cfg.kv_heads != cfg.heads:
        doc += f" kv_heads={cfg.kv_heads}"
    inputs, outputs = [token_input("input_ids")], [float_output("logits", cfg.vocab)]
    if cache is not None:
        doc += " kv_cache"
        inputs, outputs = inputs + cache_inputs(cfg), outputs + cache_outputs(cfg)
    return b.model(inputs, outputs, "tiny_llama", doc)
