"""Private helpers of `quantize-int8`: the numbers (int8 weights, uint8 activation parameters) and
what a MatMul/Gemm with a constant weight looks like to the rules (`WeightedMatMul`).

    weights:      s_n = max_k |W[k, n]| / 127,  q[k, n] = clip(round_half_even(W[k, n] / s_n), -127, 127)
    activations:  lo = min(x_min, 0), hi = max(x_max, 0),  s = (hi - lo) / 255,  zp = round(-lo / s)

Weights are symmetric per output channel (zero point 0, -128 never used), as every int8 GEMM wants.
Static activations are uint8 asymmetric, the form DynamicQuantizeLinear produces at run time, so both
W8A8 schemes emit the same MatMulInteger(uint8, int8): onnxruntime's fast path, and the u8 x s8 form
TVM's lowering keeps int8 (`passes.lowering._int8`) and the x86 VNNI / dot-product kernels take natively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra.rewrite import RewriteContext

Scheme = Literal["w8a8-dynamic", "w8a8-static", "w8a16"]

INT8_LIMIT = 127
UINT8_LEVELS = 255
#: the oldest opset with every op a scheme emits: DynamicQuantizeLinear (11), MatMulInteger and
#: per-tensor QuantizeLinear (10), per-axis DequantizeLinear (13).
MIN_OPSET: dict[str, tuple[int, str]] = {
    "w8a8-dynamic": (11, "DynamicQuantizeLinear"),
    "w8a8-static": (10, "QuantizeLinear"),
    "w8a16": (13, "per-axis DequantizeLinear"),
}


@dataclass(frozen=True)
class QuantizedWeight:
    """int8 weight in the layout it is stored ([K, N], or [N, K] for a Gemm with transB=1) and its
    float32 per-output-channel scales [N]."""

    values: np.ndarray
    scale: np.ndarray


def quantize_weight(weight: np.ndarray, channel_axis: int = 1) -> QuantizedWeight:
    """Symmetric per-channel int8 along `channel_axis` (the output channel n), round half to even
    like QuantizeLinear; an all-zero channel gets scale 1 (its values are 0 either way)."""
    w = np.asarray(weight, dtype=np.float32)
    reduce_axis = 1 - channel_axis
    peak = np.max(np.abs(w), axis=reduce_axis)
    scale = np.where(peak > 0, peak / np.float32(INT8_LIMIT), np.float32(1.0)).astype(np.float32)
    broadcast = scale[np.newaxis, :] if channel_axis == 1 else scale[:, np.newaxis]
    values = np.clip(np.rint(w / broadcast), -INT8_LIMIT, INT8_LIMIT).astype(np.int8)
    return QuantizedWeight(values, scale)


@dataclass(frozen=True)
class ActivationQuantization:
    """uint8 asymmetric per-tensor parameters: x ~ (q - zero_point) * scale."""

    scale: float
    zero_point: int


def activation_quantization(low: float, high: float) -> ActivationQuantization:
    """Parameters covering [min(low, 0), max(high, 0)] (0 exactly representable), as DynamicQuantizeLinear."""
    lo, hi = min(float(low), 0.0), max(float(high), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"activation range [{low}, {high}] is not finite")
    if hi == lo:
        return ActivationQuantization(1.0, 0)
    scale = float(np.float32((hi - lo) / UINT8_LEVELS))
    zero_point = int(np.clip(np.rint(-lo / scale), 0, UINT8_LEVELS))
    return ActivationQuantization(scale, zero_point)


@dataclass(frozen=True)
class QuantizeOptions:
    """The pass options a rule needs (the pass's fields, the regex compiled)."""

    scheme: Scheme
    skip: re.Pattern[str] | None
    min_elements: int


@dataclass(frozen=True)
class WeightedMatMul:
    """A MatMul or Gemm read as y = alpha * x @ W (+ bias) with W [K, N] = the stored weight (transposed
    for Gemm transB=1)."""

    node: gs.Node
    x: gs.Tensor
    weight: gs.Tensor
    trans_b: bool
    alpha: float
    bias: gs.Tensor | None
    beta: float


def weighted_matmul(node: gs.Node) -> WeightedMatMul:
    if node.op == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        return WeightedMatMul(node, node.inputs[0], node.inputs[1], bool(node.attrs.get("transB", 0)),
                              float(node.attrs.get("alpha", 1.0)), bias, float(node.attrs.get("beta", 1.0)))
    return WeightedMatMul(node, node.inputs[0], node.inputs[1], False, 1.0, None, 1.0)


def refusal(mm: WeightedMatMul, ctx: RewriteContext, options: QuantizeOptions) -> str | None:
    """Why `mm` is not quantized, or None (its weight is a constant 2-D float32 matrix it may change)."""
    node = mm.node
    if options.skip is not None and options.skip.search(node.name or ""):
        return f"name matches skip pattern '{options.skip.pattern}'"
    dequantize = ctx.producer(mm.weight, "DequantizeLinear")
    if dequantize is not None:
        return "weight is already quantized (DequantizeLinear)"
    weight = ctx.constant(mm.weight)
    if weight is None:
        return "weight is not a constant"
    if weight.ndim != 2:
        return f"weight is {weight.ndim}-D, not 2-D"
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} is not float32"
    if weight.size < options.min_elements:
        return f"weight has {weight.size} elements < min_elements={options.min_elements}"
    needed, op = MIN_OPSET[options.scheme]
    if ctx.opset < needed:
        return f"opset {ctx.opset} < {needed} needed by {op}"
    return _gemm_refusal(mm, ctx) if node.op == "Gemm" else _rank_refusal(mm)


def _rank_refusal(mm: WeightedMatMul) -> str | None:
    shape = mm.x.shape
    if shape is not None and len(shape) < 2:
        return f"activation '{mm.x.name}' is {len(shape)}-D (vector MatMul)"
    return None


def _gemm_refusal(mm: WeightedMatMul, ctx: RewriteContext) -> str | None:
    if int(mm.node.attrs.get("transA", 0)):
        return "Gemm transA=1"
    if mm.bias is not None and mm.beta != 1.0 and ctx.constant(mm.bias) is None:
        return f"Gemm beta={mm.beta:g} with a non-constant C"
    return None


def stored_weight(mm: WeightedMatMul, ctx: RewriteContext) -> np.ndarray:
    value = ctx.constant(mm.weight)
    assert value is not None  # `refusal` checked it
    return value


def bias_tensor(mm: WeightedMatMul, ctx: RewriteContext) -> gs.Tensor | None:
    """beta * C as a tensor to add after the rescale (None without a bias)."""
    if mm.bias is None:
        return None
    if mm.beta == 1.0:
        return mm.bias
    value = ctx.constant(mm.bias)
    assert value is not None  # `_gemm_refusal` checked it
    return ctx.const("quantized_bias", (value * np.float32(mm.beta)).astype(value.dtype))


def integer_matmul_tail(
    ctx: RewriteContext, mm: WeightedMatMul, x_q: gs.Tensor, x_zero: gs.Tensor | None, weight: np.ndarray,
    scale: gs.Tensor,
) -> tuple[list[gs.Node], gs.Tensor]:
    """Mul(Cast<float>(MatMulInteger(x_q, W_q [K, N], x_zero)), scale) (+ beta * C): nodes and result."""
    base = mm.node.name or "matmul"
    accumulated = ctx.variable(f"{base}/int32", np.int32)
    inputs = [x_q, ctx.const(f"{base}/weight_int8", weight)] + ([x_zero] if x_zero is not None else [])
    nodes = [ctx.node("MatMulInteger", inputs, [accumulated], base=f"{base}/MatMulInteger")]
    widened = ctx.variable(f"{base}/float", np.float32)
    nodes.append(ctx.node("Cast", [accumulated], [widened], base=f"{base}/Cast", to=1))
    scaled = ctx.variable(f"{base}/rescaled", np.float32)
    nodes.append(ctx.node("Mul", [widened, scale], [scaled], base=f"{base}/rescale"))
    bias = bias_tensor(mm, ctx)
    if bias is None:
        return nodes, scaled
    biased = ctx.variable(f"{base}/biased", np.float32)
    nodes.append(ctx.node("Add", [scaled, bias], [biased], base=f"{base}/bias"))
    return nodes, biased


def kn_weight(mm: WeightedMatMul, quantized: QuantizedWeight) -> np.ndarray:
    """The int8 weight as [K, N] (MatMulInteger has no transB)."""
    return np.ascontiguousarray(quantized.values.T if mm.trans_b else quantized.values)

