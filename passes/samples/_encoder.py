"""`tiny-bert`: a BERT-style post-LayerNorm encoder with an additive padding-mask bias.

Word and position embeddings (position ids from a run-time `Range` over the sequence length),
decomposed LayerNorm, multi-head attention biased by `(1 - mask) * float32_min`, and a GELU
MLP written with `Erf`, as TorchScript traces of Hugging Face's `BertModel` spell them.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from passes.samples._blocks import (
    SampleConfig,
    attend,
    attention_scores,
    gelu_erf,
    layer_norm,
    linear,
    merge_heads,
    project_heads,
)
from passes.samples._builder import FLOAT32_MIN, ExportStyle, GraphBuilder, float_output, token_input

MAX_POSITIONS = 512
LAYER_NORM_EPS = 1e-12


def _embeddings(b: GraphBuilder, cfg: SampleConfig) -> str:
    """`LayerNorm(word[input_ids] + position[Range(0, seq)[None]])`."""
    with b.scope("embeddings"):
        positions = b.op("Range", [b.const(0), b.dim("input_ids", 1), b.const(1)])
        positions = b.unsqueeze(positions, [0])
        with b.scope("word_embeddings"):
            words = b.op("Gather", [b.param("weight", (cfg.vocab, cfg.hidden)), "input_ids"])
        with b.scope("position_embeddings"):
            where = b.op("Gather", [b.param("weight", (MAX_POSITIONS, cfg.hidden)), positions])
        x = b.op("Add", [words, where])
        with b.scope("LayerNorm"):
            return layer_norm(b, x, cfg.hidden, LAYER_NORM_EPS)


def _mask_bias(b: GraphBuilder) -> str:
    """`(1 - attention_mask[:, None, None, :]) * float32_min`: [batch, 1, 1, seq]."""
    mask = b.op("Cast", [b.unsqueeze("attention_mask", [1, 2])], to=TensorProto.FLOAT)
    inverted = b.op("Sub", [b.const(1.0), mask])
    return b.op("Mul", [inverted, b.const(FLOAT32_MIN)])


def _attention(b: GraphBuilder, x: str, mask_bias: str, cfg: SampleConfig) -> str:
    with b.scope("self"):
        q = project_heads(b, x, "query", cfg)
        k = project_heads(b, x, "key", cfg)
        v = project_heads(b, x, "value", cfg)
        scores = b.op("Add", [attention_scores(b, q, k, cfg), mask_bias])
        context = merge_heads(b, attend(b, scores, v), x, cfg)
    with b.scope("output"):
        h = linear(b, context, "dense", cfg.hidden, cfg.hidden)
        h = b.op("Add", [h, x])
        with b.scope("LayerNorm"):
            return layer_norm(b, h, cfg.hidden, LAYER_NORM_EPS)


def _encoder_layer(b: GraphBuilder, x: str, mask_bias: str, cfg: SampleConfig) -> str:
    with b.scope("attention"):
        x = _attention(b, x, mask_bias, cfg)
    with b.scope("intermediate"):
        h = gelu_erf(b, linear(b, x, "dense", cfg.hidden, cfg.intermediate))
    with b.scope("output"):
        h = b.op("Add", [linear(b, h, "dense", cfg.intermediate, cfg.hidden), x])
        with b.scope("LayerNorm"):
            return layer_norm(b, h, cfg.hidden, LAYER_NORM_EPS)


def build_encoder(cfg: SampleConfig, style: ExportStyle) -> onnx.ModelProto:
    """The `tiny-bert` graph: `input_ids`, `attention_mask` -> `last_hidden_state` [batch, seq, hidden]."""
    b = GraphBuilder(style, cfg.seed)
    x = _embeddings(b, cfg)
    mask_bias = _mask_bias(b)
    with b.scope("encoder"):
        for index in range(cfg.layers):
            with b.scope(f"layer.{index}"):
                x = _encoder_layer(b, x, mask_bias, cfg)
    b.name_output(x, "last_hidden_state")
    doc = (f"tiny-bert ({style.idiom}, opset {style.opset}): layers={cfg.layers} hidden={cfg.hidden} "
           f"heads={cfg.heads} vocab={cfg.vocab} intermediate={cfg.intermediate} seed={cfg.seed}")
    inputs = [token_input("input_ids"), token_input("attention_mask")]
    return b.model(inputs, [float_output("last_hidden_state", cfg.hidden)], "tiny_bert", doc)
