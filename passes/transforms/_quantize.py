"""Private helpers of `quantize-int8`: the numbers (int8 weights, uint8 activation parameters) and
what a MatMul/Gemm with a constant weight looks like to the rules (`WeightedMatMul`).

    weights:      s_n = max_k |W[k, n]| / 127,  q[k, n] = clip(round_half_even(W[k, n] / s_n), -127, 127)
    activations:  lo = min(x_min, 0), hi = max(x_max, 0),  s = (hi - lo) / 255,  zp = round(-lo / s)
    per token:    s_m = max(max_k |x[m, k]| / 127, tiny),  q[m, k] = round_half_even(x[m, k] / s_m) + 128  (uint8)

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
Granularity = Literal["per-token", "per-tensor"]

#: per-token activations are symmetric int8 stored as uint8 with this constant zero point, so MatMulInteger
#: keeps its (uint8, int8) form and the lowering's constant-zero-point path (int8 kernels) applies.
TOKEN_ZERO_POINT = 128
#: the smallest row scale: an all-zero row quantizes to zeros instead of 0 / 0.
TINY_SCALE = np.float32(np.finfo(np.float32).tiny)

INT8_LIMIT = 127
UINT8_LEVELS = 255
#: the oldest opset with every op a scheme emits: DynamicQuantizeLinear (11), MatMulInteger and
#: per-tensor QuantizeLinear (10), per-axis DequantizeLinear (13).
MIN_OPSET: dict[str, tuple[int, str]] = {
    "w8a8-dynamic": (11, "DynamicQuantizeLinear"),
    "w8a8-static": (10, "QuantizeLinear"),
    "w8a16": (13, "per-axis DequantizeLinear"),
    "per-token": (10, "QuantizeLinear"),  # w8a8-dynamic with per-token scales: Abs, ReduceMax, Div, Max
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
    granularity: Granularity = "per-tensor"  # w8a8-dynamic's activation scales
    only: frozenset[str] | None = None  # output names of the matmuls this rule may rewrite (None: all)
    exclude: frozenset[str] = frozenset()  # output names this rule leaves to another rule


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
    key = node.outputs[0].name
    if key in options.exclude or (options.only is not None and key not in options.only):
        return "left to the mixed-precision fallback" if key in options.exclude else "not chosen for this rule"
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
    per_token = options.scheme == "w8a8-dynamic" and options.granularity == "per-token"
    needed, op = MIN_OPSET["per-token" if per_token else options.scheme]
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


def per_token_quantize(ctx: RewriteContext, x: gs.Tensor, base: str) -> tuple[list[gs.Node], gs.Tensor, gs.Tensor]:
    """Symmetric int8 per row of `x` (its last axis reduced), stored as uint8 + 128: nodes, the uint8
    tensor and the row scales [..., M, 1]. Six ops: Abs, ReduceMax, Div, Max, Div, QuantizeLinear."""
    magnitude = ctx.variable(f"{base}/abs", np.float32)
    peak = ctx.variable(f"{base}/row_peak", np.float32)
    nodes = [ctx.node("Abs", [x], [magnitude], base=f"{base}/abs")]
    if ctx.opset >= 18:
        axes = ctx.const(f"{base}/axes", np.array([-1], dtype=np.int64))
        nodes.append(ctx.node("ReduceMax", [magnitude, axes], [peak], base=f"{base}/row_peak", keepdims=1))
    else:
        nodes.append(ctx.node("ReduceMax", [magnitude], [peak], base=f"{base}/row_peak", axes=[-1], keepdims=1))
    unclamped = ctx.variable(f"{base}/row_scale_unclamped", np.float32)
    nodes.append(ctx.node("Div", [peak, ctx.const(f"{base}/int8_limit", np.array(INT8_LIMIT, dtype=np.float32))],
                          [unclamped], base=f"{base}/row_scale"))
    row_scale = ctx.variable(f"{base}/row_scale", np.float32)
    nodes.append(ctx.node("Max", [unclamped, ctx.const(f"{base}/tiny", np.array(TINY_SCALE))], [row_scale],
                          base=f"{base}/row_scale_clamp"))
    normalized = ctx.variable(f"{base}/x_normalized", np.float32)
    nodes.append(ctx.node("Div", [x, row_scale], [normalized], base=f"{base}/normalize"))
    x_q = ctx.variable(f"{base}/x_uint8", np.uint8)
    unit = ctx.const(f"{base}/unit_scale", np.array(1.0, dtype=np.float32))
    zero = ctx.const(f"{base}/token_zero_point", np.array(TOKEN_ZERO_POINT, dtype=np.uint8))
    nodes.append(ctx.node("QuantizeLinear", [normalized, unit, zero], [x_q], base=f"{base}/quantize_x"))
    return nodes, x_q, row_scale


def integer_matmul_tail(
    ctx: RewriteContext, mm: WeightedMatMul, x_q: gs.Tensor, x_zero: gs.Tensor | None, weight: np.ndarray,
    scale: gs.Tensor, row_scale: gs.Tensor | None = None,
) -> tuple[list[gs.Node], gs.Tensor]:
    """Mul(Cast<float>(MatMulInteger(x_q, W_q [K, N], x_zero)), scale) (* row_scale) (+ beta * C)."""
    base = mm.node.name or "matmul"
    accumulated = ctx.variable(f"{base}/int32", np.int32)
    inputs = [x_q, ctx.const(f"{base}/weight_int8", weight)] + ([x_zero] if x_zero is not None else [])
    nodes = [ctx.node("MatMulInteger", inputs, [accumulated], base=f"{base}/MatMulInteger")]
    widened = ctx.variable(f"{base}/float", np.float32)
    nodes.append(ctx.node("Cast", [accumulated], [widened], base=f"{base}/Cast", to=1))
    scaled = ctx.variable(f"{base}/rescaled", np.float32)
    nodes.append(ctx.node("Mul", [widened, scale], [scaled], base=f"{base}/rescale"))
    if row_scale is not None:
        per_row = ctx.variable(f"{base}/rescaled_rows", np.float32)
        nodes.append(ctx.node("Mul", [scaled, row_scale], [per_row], base=f"{base}/rescale_rows"))
        scaled = per_row
    bias = bias_tensor(mm, ctx)
    if bias is None:
        return nodes, scaled
    biased = ctx.variable(f"{base}/biased", np.float32)
    nodes.append(ctx.node("Add", [scaled, bias], [biased], base=f"{base}/bias"))
    return nodes, biased


def kn_weight(mm: WeightedMatMul, quantized: QuantizedWeight) -> np.ndarray:
    """The int8 weight as [K, N] (MatMulInteger has no transB)."""
    return np.ascontiguousarray(quantized.values.T if mm.trans_b else quantized.values)

