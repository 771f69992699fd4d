"""`quantize-int8`: int8 weights (per output channel, symmetric) for MatMul/Gemm with a constant weight.

    w8a8-dynamic: MatMul(x, W) -> Mul(Mul(Cast(MatMulInteger(xq, Wq, 128)), sW), s_row)   (per token, the default)
                  where s_row = max(max_k |x[.., k]| / 127, tiny), xq = QuantizeLinear(x / s_row, 1, 128)
    w8a8-dynamic{activations=per-tensor}:
                  MatMul(x, W) -> Mul(Cast(MatMulInteger(xq, Wq, zx)), sx * sW) where (xq, sx, zx) = DynamicQuantizeLinear(x)
    w8a8-static:  MatMul(x, W) -> Mul(Cast(MatMulInteger(QuantizeLinear(x, sx, zx), Wq, zx)), sx * sW)   (sx, zx calibrated)
    w8a16:        MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, sW, axis=1))

Wq = clip(round_half_even(W / sW), -127, 127) with sW[n] = max_k |W[k, n]| / 127 (see `_quantize`).
Activations are uint8 asymmetric in both W8A8 schemes (DynamicQuantizeLinear's form), so MatMulInteger
always sees (uint8, int8), which onnxruntime and the TVM lowering run as int8. A Gemm's alpha is folded
into the rescale and beta * C added after it; transB is handled (the int8 weight is stored [K, N] for
MatMulInteger, and w8a16 keeps the Gemm with its transB, dequantizing along axis 0). Each rewritten
matmul keeps its output tensor (name included), so per-layer accuracy can match layers by name.

w8a8-static needs activation ranges: from `calibration` (an .npz of inputs by name, or text cut into
token windows with `tokenizer`), else from inputs generated with `passes.numerics.verify.random_feeds` at
the model's shapes (`stats["calibration"] = "generated"`). `percentile` < 100 clips each range to that
percentile of |values| on both sides (100 is min-max).

Mixed precision: with `min_sqnr` > 0, each W8A8 candidate's own error is measured on the calibration set
(`_sensitivity.local_sqnr`); those below `min_sqnr` dB become W8A16 instead (float where the opset is < 13),
and `stats["layers"]` lists every candidate's SQNR and what it kept.

Ordering: run after `fold-constants` and the fusions (fuse-qkv, fuse-matmul-add): fold-constants would
fold a small DequantizeLinear(Wq) back to a float weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, StatValue
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules
from passes.transforms._quantize import (
    MIN_OPSET,
    ActivationQuantization,
    Granularity,
    QuantizedWeight,
    QuantizeOptions,
    Scheme,
    activation_quantization,
    bias_tensor,
    integer_matmul_tail,
    kn_weight,
    per_token_quantize,
    quantize_weight,
    refusal,
    stored_weight,
    WeightedMatMul,
    weighted_matmul,
)
from passes.transforms._sensitivity import LayerSensitivity, local_sqnr


class _QuantizeRule(RewriteRule):
    """Match any MatMul/Gemm; `_quantize.refusal` says which ones have a weight to quantize."""

    anchor_ops = ("MatMul", "Gemm")

    def __init__(self, options: QuantizeOptions) -> None:
        self.options = options

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        if len(anchor.inputs) < 2:
            return None
        return Match(anchor, [anchor], {"mm": weighted_matmul(anchor)})

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        return refusal(match["mm"], ctx, self.options)

    @staticmethod
    def weight(match: Match, ctx: RewriteContext) -> tuple[WeightedMatMul, str, QuantizedWeight]:
        """The matched matmul, the base name of what replaces it, and its int8 weight."""
        mm = match["mm"]
        return mm, mm.node.name or "matmul", quantize_weight(stored_weight(mm, ctx), 0 if mm.trans_b else 1)


class QuantizeDynamicW8A8(_QuantizeRule):
    math = "MatMul(x, W) -> Mul(Cast(MatMulInteger(DynamicQuantizeLinear(x), Wq, zx)), sx * sW)"

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        mm, base, quantized = self.weight(match, ctx)
        x_q, x_scale, x_zero = (ctx.variable(f"{base}/{part}", dtype)
                                for part, dtype in (("x_uint8", np.uint8), ("x_scale", np.float32),
                                                    ("x_zero_point", np.uint8)))
        nodes = [ctx.node("DynamicQuantizeLinear", [mm.x], [x_q, x_scale, x_zero], base=f"{base}/quantize_x")]
        scale = ctx.variable(f"{base}/scale", np.float32)
        weight_scale = ctx.const(f"{base}/weight_scale", quantized.scale * np.float32(mm.alpha))
        nodes.append(ctx.node("Mul", [x_scale, weight_scale], [scale], base=f"{base}/scale"))
        tail, result = integer_matmul_tail(ctx, mm, x_q, x_zero, kn_weight(mm, quantized), scale)
        return Replacement(nodes + tail, [result])


class QuantizeTokenW8A8(_QuantizeRule):
    math = "MatMul(x, W) -> Mul(Mul(Cast(MatMulInteger(QuantizeLinear(x / s_row, 1, 128), Wq, 128)), sW), s_row)"

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        mm, base, quantized = self.weight(match, ctx)
        nodes, x_q, row_scale = per_token_quantize(ctx, mm.x, base)
        x_zero = nodes[-1].inputs[2]  # QuantizeLinear's zero point, the constant 128
        weight_scale = ctx.const(f"{base}/weight_scale", (quantized.scale * np.float32(mm.alpha)).astype(np.float32))
        tail, result = integer_matmul_tail(ctx, mm, x_q, x_zero, kn_weight(mm, quantized), weight_scale, row_scale)
        return Replacement(nodes + tail, [result])


class QuantizeStaticW8A8(_QuantizeRule):
    math = "MatMul(x, W) -> Mul(Cast(MatMulInteger(QuantizeLinear(x, sx, zx), Wq, zx)), sx * sW)"

    def __init__(self, options: QuantizeOptions, activations: Mapping[str, ActivationQuantization]) -> None:
        super().__init__(options)
        self.activations = activations

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        reason = super().check(match, ctx)
        if reason is None and match["mm"].x.name not in self.activations:
            return f"no calibration range for activation '{match['mm'].x.name}'"
        return reason

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        mm, base, quantized = self.weight(match, ctx)
        params = self.activations[mm.x.name]
        x_scale = ctx.const(f"{base}/x_scale", np.array(params.scale, dtype=np.float32))
        x_zero = ctx.const(f"{base}/x_zero_point", np.array(params.zero_point, dtype=np.uint8))
        x_q = ctx.variable(f"{base}/x_uint8", np.uint8)
        nodes = [ctx.node("QuantizeLinear", [mm.x, x_scale, x_zero], [x_q], base=f"{base}/quantize_x")]
        combined = (np.float32(params.scale) * quantized.scale * np.float32(mm.alpha)).astype(np.float32)
        scale = ctx.const(f"{base}/scale", combined)
        tail, result = integer_matmul_tail(ctx, mm, x_q, x_zero, kn_weight(mm, quantized), scale)
        return Replacement(nodes + tail, [result])


class QuantizeWeightOnlyW8A16(_QuantizeRule):
    math = "MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, sW, axis=n))"

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        mm, base, quantized = self.weight(match, ctx)
        axis = 0 if mm.trans_b else 1
        weight = ctx.variable(f"{base}/weight_dequantized", np.float32)
        inputs = [ctx.const(f"{base}/weight_int8", quantized.values), ctx.const(f"{base}/weight_scale", quantized.scale)]
        nodes = [ctx.node("DequantizeLinear", inputs, [weight], base=f"{base}/dequantize_weight", axis=axis)]
        out = ctx.variable(f"{base}/output", mm.node.outputs[0].dtype)
        if mm.node.op == "Gemm":
            bias = bias_tensor(mm, ctx)
            attrs = {k: v for k, v in mm.node.attrs.items() if k != "beta"}
            nodes.append(ctx.node("Gemm", [mm.x, weight] + ([bias] if bias is not None else []), [out],
                                  base=base, **attrs))
        else:
            nodes.append(ctx.node("MatMul", [mm.x, weight], [out], base=base))
        return Replacement(nodes, [out])


@dataclass(frozen=True)
class QuantizeInt8(Pass):
    """Quantize MatMul/Gemm weights to per-channel int8 (W8A8 dynamic or static, or weight-only W8A16)."""

    name = "quantize-int8"
    exact = False  # int8 is lossy: accuracy is stated as output SQNR (>= 30 dB), not a tolerance
    scheme: Scheme = field(default="w8a8-dynamic", metadata={
        "help": "w8a8-dynamic (activations quantized at run time), w8a8-static (calibrated) or w8a16 (weights only)"})
    skip: str = field(default="", metadata={"help": "regex on node names left in float (e.g. lm_head)"})
    min_elements: int = field(default=0, metadata={"min": 0, "help": "weights with fewer elements stay float"})
    calibration: str = field(default="", metadata={
        "help": ".npz of inputs by name for w8a8-static (default: generated random inputs)"})
    percentile: float = field(default=100.0, metadata={"min": 50.0, "max": 100.0,
        "help": "w8a8-static range estimator: percentile of values kept (100 = min-max)"})
    activations: Granularity = field(default="per-token", metadata={
        "help": "w8a8-dynamic activation scales: per-token (a scale per row) or per-tensor (DynamicQuantizeLinear)"})
    min_sqnr: float = field(default=0.0, metadata={
        "help": "mixed precision: W8A8 layers whose own SQNR on the calibration set is below this (dB) stay W8A16 (0 = off)"})
    tokenizer: str = field(default="", metadata={
        "help": "with calibration=TEXT: a tokenizer.json (or its folder) that cuts the text into token windows"})
    samples: int = field(default=8, metadata={"min": 1, "help": "calibration windows cut from text"})

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.min_elements < 0:
            raise ValueError(f"min_elements must be >= 0, got {self.min_elements}")
        if not 0.0 <= self.min_sqnr < 200.0:
            raise ValueError(f"min_sqnr must be in [0, 200) dB, got {self.min_sqnr}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.tokenizer and not self.calibration:
            raise ValueError("tokenizer needs calibration=TEXT (the text to cut into windows)")
        if self.calibration:
            from passes.numerics.calibration import check_calibration_file

            check_calibration_file(self.calibration, tokenizer=self.tokenizer)
        try:
            re.compile(self.skip)
        except re.error as err:
            raise ValueError(f"skip is not a valid regex: {self.skip!r} ({err})") from err

    def _options(self, scheme: Scheme | None = None, **limits: frozenset[str] | None) -> QuantizeOptions:
        return QuantizeOptions(scheme or self.scheme, re.compile(self.skip) if self.skip else None,
                               self.min_elements, self.activations, **limits)  # type: ignore[arg-type]

    def call(self, graph: gs.Graph) -> PassResult:
        options = self._options()
        extra: dict[str, StatValue] = {"scheme": self.scheme}
        if self.scheme == "w8a16":
            result = run_rules(graph, [QuantizeWeightOnlyW8A16(options)], "matmuls_quantized")
            result.stats.update(extra)
            return result
        if self.scheme == "w8a8-dynamic":
            extra["activations"] = self.activations
        candidates = _candidates(graph, options)
        needs_data = self.scheme == "w8a8-static" or self.min_sqnr > 0
        samples: dict[str, list[np.ndarray]] = {}
        if needs_data and candidates:
            samples, extra["calibration"] = self._calibration_samples(graph, candidates)
        activations = ({name: _range(values, self.percentile) for name, values in samples.items()}
                       if self.scheme == "w8a8-static" else {})
        layers = self._sensitivity(graph, candidates, samples, activations) if self.min_sqnr > 0 else []
        fallback = frozenset(layer.layer for layer in layers if layer.kept != "w8a8")
        options = self._options(exclude=fallback)
        rules: list[RewriteRule]
        if self.scheme == "w8a8-static":
            rules = [QuantizeStaticW8A8(options, activations)]
        elif self.activations == "per-token":
            rules = [QuantizeTokenW8A8(options)]
        else:
            rules = [QuantizeDynamicW8A8(options)]
        if fallback and RewriteContext(graph).opset >= MIN_OPSET["w8a16"][0]:
            rules.append(QuantizeWeightOnlyW8A16(self._options("w8a16", only=fallback)))
        result = run_rules(graph, rules, "matmuls_quantized")
        result.stats.update(extra)
        if self.min_sqnr > 0:
            result.stats["min_sqnr_db"] = self.min_sqnr
            result.stats["w8a8_layers"] = sum(1 for layer in layers if layer.kept == "w8a8")
            result.stats["fallback_layers"] = len(fallback)
            result.stats["layers"] = [layer.to_dict() for layer in layers]  # type: ignore[assignment]
        return result

    def _calibration_samples(self, graph: gs.Graph, candidates: Mapping[str, tuple[str, np.ndarray]]
                             ) -> tuple[dict[str, list[np.ndarray]], str]:
        """Each candidate activation's values on the calibration set, and where that set came from."""
        from passes.numerics import calibration

        model, values = ir.hollow_export(graph)  # the weights stay the graph's arrays
        if self.calibration:
            feeds = calibration.load_calibration(self.calibration, model, tokenizer=self.tokenizer or None,
                                                 samples=self.samples)
            source = "text" if self.tokenizer else "file"
        else:
            feeds, source = calibration.generated_feeds(model), "generated"
        names = list(dict.fromkeys(x for x, _ in candidates.values()))
        return calibration.collect_tensors(model, names, feeds, weights=values), source

    def _sensitivity(self, graph: gs.Graph, candidates: Mapping[str, tuple[str, np.ndarray]],
                     samples: Mapping[str, list[np.ndarray]],
                     activations: Mapping[str, ActivationQuantization]) -> list[LayerSensitivity]:
        granularity = "per-token" if self.scheme == "w8a8-dynamic" and self.activations == "per-token" else "per-tensor"
        fallback = "w8a16" if RewriteContext(graph).opset >= MIN_OPSET["w8a16"][0] else "float"
        layers = []
        for output, (x, weight) in candidates.items():
            sqnr = local_sqnr(samples[x], weight, granularity=granularity, static=activations.get(x))
            layers.append(LayerSensitivity(output, sqnr, "w8a8" if sqnr >= self.min_sqnr else fallback))
        return layers


def _range(values: list[np.ndarray], percentile: float) -> ActivationQuantization:
    from passes.numerics.calibration import estimate_range

    flat = np.concatenate([v.reshape(-1).astype(np.float64) for v in values])
    estimate = estimate_range(flat, "minmax" if percentile >= 100.0 else "percentile", percentile)
    return activation_quantization(estimate.low, estimate.high)


def _candidates(graph: gs.Graph, options: QuantizeOptions) -> dict[str, tuple[str, np.ndarray]]:
    """The matmuls a W8A8 rule would rewrite: output name -> (activation name, weight as [K, N] float32)."""
    ctx = RewriteContext(graph)
    found: dict[str, tuple[str, np.ndarray]] = {}
    for node in graph.nodes:
        if node.op not in _QuantizeRule.anchor_ops or not ir.is_default_domain(node) or len(node.inputs) < 2:
            continue
        mm = weighted_matmul(node)
        if refusal(mm, ctx, options) is None:
            weight = stored_weight(mm, ctx)
            found[node.outputs[0].name] = (mm.x.name, weight.T if mm.trans_b else weight)
    return found
