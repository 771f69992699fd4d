"""Transformer building blocks shared by the decoder and encoder samples.

Each block emits the decomposed op sequence an exporter produces for the PyTorch module of the
same name (RMSNorm, LayerNorm, Linear, multi-head split/merge, scaled dot-product scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnx import TensorProto

from passes.samples._builder import GraphBuilder


@dataclass(frozen=True)
class SampleConfig:
    """Validated size parameters of a sample model."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    seed: int
    kv_heads: int  # key/value heads (grouped-query attention when fewer than `heads`)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def linear(b: GraphBuilder, x: str, name: str, d_in: int, d_out: int, *, bias: bool = True) -> str:
    """`MatMul(x, W) + b` with `W` stored as [d_in, d_out] (exporters pre-transpose Linear weights)."""
    with b.scope(name):
        y = b.op("MatMul", [x, b.param("weight", (d_in, d_out))])
        if not bias:
            return y
        bias_name = b.param("bias", (d_out,))
        return b.op("Add", [bias_name, y] if b.style.bias_first else [y, bias_name])


def rms_norm(b: GraphBuilder, x: str, hidden: int, eps: float) -> str:
    """`weight * x / sqrt(mean(x^2, -1) + eps)`, decomposed as TorchScript or dynamo emit it."""
    if b.style.cast_norm:
        x = b.op("Cast", [x], to=TensorProto.FLOAT)
    variance = b.reduce_mean(b.op("Pow", [x, b.const(2.0)]), [-1])
    std = b.op("Sqrt", [b.op("Add", [variance, b.const(eps)])])
    if b.style.reciprocal:
        inv_std = b.op("Reciprocal", [std])
    else:
        inv_std = b.op("Div", [b.const(1.0), std])
    y = b.op("Mul", [x, inv_std])
    if b.style.cast_norm:
        y = b.op("Cast", [y], to=TensorProto.FLOAT)
    return b.op("Mul", [b.param("weight", (hidden,), mean=1.0), y])


def layer_norm(b: GraphBuilder, x: str, hidden: int, eps: float) -> str:
    """`(x - mean) / sqrt(var + eps) * gamma + beta` over the last axis, decomposed."""
    centered = b.op("Sub", [x, b.reduce_mean(x, [-1])])
    variance = b.reduce_mean(b.op("Pow", [centered, b.const(2.0)]), [-1])
    std = b.op("Sqrt", [b.op("Add", [variance, b.const(eps)])])
    y = b.op("Mul", [b.op("Div", [centered, std]), b.param("weight", (hidden,), mean=1.0)])
    return b.op("Add", [y, b.param("bias", (hidden,))])


def gelu_erf(b: GraphBuilder, x: str) -> str:
    """`x * 0.5 * (1 + erf(x / sqrt(2)))`, the exact GELU as BERT exports spell it."""
    erf = b.op("Erf", [b.op("Div", [x, b.const(math.sqrt(2.0))])])
    y = b.op("Mul", [x, b.op("Add", [erf, b.const(1.0)])])
    return b.op("Mul", [y, b.const(0.5)])


def project_heads(b: GraphBuilder, x: str, name: str, cfg: SampleConfig, heads: int | None = None) -> str:
    """Project [B, S, H] to one of Q/K/V and split heads: [B, heads, S, head_dim] (`heads`: cfg.heads)."""
    heads = cfg.heads if heads is None else heads
    y = linear(b, x, name, cfg.hidden, heads * cfg.head_dim)
    y = b.reshape(y, x, (0, 1), (heads, cfg.head_dim))
    return b.op("Transpose", [y], perm=[0, 2, 1, 3])


def repeat_kv(b: GraphBuilder, x: str, cfg: SampleConfig) -> str:
    """HF `repeat_kv`: [B, kv_heads, S, D] -> [B, heads, S, D], each K/V head serving `heads // kv_heads`
    query heads (`x[:, :, None].expand(B, kv, rep, S, D).reshape(B, heads, S, D)`); no nodes when rep == 1."""
    rep = cfg.heads // cfg.kv_heads
    if rep == 1:
        return x
    batch, length = b.dim_1d(x, 0), b.dim_1d(x, 2)
    expanded = b.op("Expand", [b.unsqueeze(x, [2]), b.shape([batch, cfg.kv_heads, rep, length, cfg.head_dim])])
    return b.op("Reshape", [expanded, b.shape([batch, cfg.heads, length, cfg.head_dim])])


def merge_heads(b: GraphBuilder, context: str, source: str, cfg: SampleConfig) -> str:
    """[B, heads, S, head_dim] back to [B, S, H], the batch and sequence sizes read off `source`."""
    y = b.op("Transpose", [context], perm=[0, 2, 1, 3])
    return b.reshape(y, source, (0, 1), (cfg.hidden,))


def attention_scores(b: GraphBuilder, q: str, k: str, cfg: SampleConfig) -> str:
    """`Q @ K^T / sqrt(head_dim)`."""
    k_t = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [q, k_t])
    return b.op("Div", [scores, b.const(math.sqrt(cfg.head_dim))])


def attend(b: GraphBuilder, scores: str, v: str) -> str:
    """`softmax(scores, -1) @ V`."""
    return b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
