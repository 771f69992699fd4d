"""How much a quantized model deviates from its float original, per layer and per output.

    report = quantization_report(original, quantized, feeds)     # feeds: one input set or a list
    report.min_output_sqnr_db, report.to_dict()

SQNR (dB) = 10 log10(sum ref^2 / sum (ref - q)^2) accumulated over every feed (inf when equal).
Layers are the original model's MatMul/Gemm outputs, matched by tensor name in the quantized model
(quantize-int8 keeps each matmul's output tensor). A layer's error is end to end: it includes the
error its inputs already carry from the layers before it, which is what the model's output sees.
Both models run under onnxruntime as copies with those tensors exposed (see `passes.numerics.calibration`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from passes.numerics.calibration import collect_tensors

MATMUL_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class TensorAccuracy:
    """One tensor's SQNR (dB, inf when exact) and max |ref - q| over all feeds."""

    name: str
    sqnr_db: float
    max_abs_error: float
    quantized: bool = True  # layers: whether the quantized model rewrote the matmul producing it


@dataclass
class AccuracyReport:
    layers: list[TensorAccuracy] = field(default_factory=list)
    outputs: list[TensorAccuracy] = field(default_factory=list)
    samples: int = 0

    @property
    def min_output_sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=math.inf)

    @property
    def min_layer_sqnr_db(self) -> float:
        return min((layer.sqnr_db for layer in self.layers if layer.quantized), default=math.inf)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: infinities become the string "inf"."""
        def clean(value: object) -> object:
            if isinstance(value, float) and not math.isfinite(value):
                return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean({**asdict(self), "min_output_sqnr_db": self.min_output_sqnr_db,  # type: ignore[return-value]
                      "min_layer_sqnr_db": self.min_layer_sqnr_db})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def sqnr_db(reference: Sequence[np.ndarray] | np.ndarray, candidate: Sequence[np.ndarray] | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `candidate` against `reference`, in dB, over all pairs."""
    refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
    cands = [candidate] if isinstance(candidate, np.ndarray) else list(candidate)
    signal = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in refs)
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - c.astype(np.float64)))) for r, c in zip(refs, cands))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def tensor_accuracy(name: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                    quantized: bool = True) -> TensorAccuracy:
    """SQNR and max abs error of one tensor; shapes must agree pair by pair."""
    for r, c in zip(reference, candidate):
        if r.shape != c.shape:
            raise ValueError(f"'{name}': reference is {list(r.shape)}, candidate {list(c.shape)}")
    error = max((float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64)), initial=0.0))
                 for r, c in zip(reference, candidate)), default=0.0)
    return TensorAccuracy(name, sqnr_db(reference, candidate), error, quantized)


def output_accuracy(reference: Sequence[Mapping[str, np.ndarray]],
                    candidate: Sequence[Mapping[str, np.ndarray]]) -> list[TensorAccuracy]:
    """Per-output accuracy of outputs computed elsewhere (a TVM build, say) against the reference's."""
    names = list(reference[0]) if reference else []
    return [tensor_accuracy(n, [r[n] for r in reference], [c[n] for c in candidate]) for n in names]


def quantization_report(original: onnx.ModelProto, quantized: onnx.ModelProto,
                        feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], *,
                        original_weights: Mapping[str, np.ndarray] | None = None,
                        quantized_weights: Mapping[str, np.ndarray] | None = None) -> AccuracyReport:
    """Per-layer and per-output accuracy of `quantized` against `original` on `feeds`; the `*_weights`
    are the values of hollow initializers (see `passes.numerics.verify.ModelRunner`). The two models
    run one after the other."""
    feed_list = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    layers = _layers(original, quantized)
    outputs = [o.name for o in original.graph.output]
    names = list(dict.fromkeys([*layers, *outputs]))
    reference = collect_tensors(original, names, feed_list, weights=original_weights)
    candidate = collect_tensors(quantized, names, feed_list, weights=quantized_weights)
    report = AccuracyReport(samples=len(feed_list))
    report.layers = [tensor_accuracy(n, reference[n], candidate[n], rewritten) for n, rewritten in layers.items()]
    report.outputs = [tensor_accuracy(n, reference[n], candidate[n]) for n in outputs]
    return report


def _layers(original: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, bool]:
    """Output name of each original matmul found in `quantized` -> whether it was rewritten there
    (its producer is no longer the same op on the same inputs)."""
    producers = {out: node for node in quantized.graph.node for out in node.output}
    layers = {}
    for node in original.graph.node:
        if node.op_type not in MATMUL_OPS or not node.output or node.output[0] not in producers:
            continue
        now = producers[node.output[0]]
        layers[node.output[0]] = not (now.op_type == node.op_type and list(now.input) == list(node.input))
    return layers
