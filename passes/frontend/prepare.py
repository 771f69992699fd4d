"""The model a back end lowers, from a model file: dynamic dims bound (`--shape`, then the target's
defaults), the target's pipeline run, the matmuls quantized with the target's scheme and the cost
measured. Used by `passes run` (`passes.deploy`) and `passes tune` (`passes.tuning`) alike.

Dims named like a batch get `defaults.batch`, every other symbolic dim `defaults.sequence`; the
returned `BoundDim`s say where each value came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import onnx

from passes.core.errors import PassesError
from passes.core.io import load_model_with_info
from passes.infra.manager import Instrument, PassManager
from passes.infra.pipeline import parse_pipeline
from passes.numerics.verify import random_feeds


@dataclass
class BoundDim:
    input: str
    axis: int
    dim: str
    value: int
    source: str  # "--shape" or "target defaults.batch" / "target defaults.sequence"


QuantizeChoice = Literal["auto", "none", "w8a8-dynamic", "w8a8-static", "w8a16"]
#: the scheme `auto` picks from the target's preferred quantization. W8A8 is dynamic with per-token
#: scales: its zero point is the constant 128, so every matmul stays int8 through TVM like static W8A8,
#: and on a trained LLM (SmolLM2-135M) it costs +1.7 % perplexity where static per-tensor costs +12 %
#: before mixed precision. W8A16 for GPUs with no int8 path.
AUTO_SCHEME = {"w8a8": "w8a8-dynamic", "w8a16": "w8a16"}
#: SmoothQuant strength applied before W8A8 (0 = off).
DEFAULT_SMOOTH = 0.5
#: mixed precision: W8A8 layers whose own per-token SQNR on the calibration set is below this stay W8A16.
DEFAULT_MIN_LAYER_SQNR = 28.0
#: below this output SQNR (dB) the report warns loudly that the quantized model is unlike the float one.
WARN_OUTPUT_SQNR_DB = 15.0
#: above this perplexity increase (%) the report warns loudly.
WARN_PPL_INCREASE = 3.0
#: text windows perplexity is measured on.
EVAL_WINDOWS = 8


class QualityError(PassesError):
    """A quality gate (--max-ppl-increase, --min-sqnr) failed: the quantized model is not written."""


@dataclass(frozen=True)
class QuantizeSettings:
    """How `prepare_model` quantizes and judges the result.

    calibration: an .npz of inputs, or text when `tokenizer` is set; text: English (or the model's
    language) to measure perplexity on, with `tokenizer`; max_ppl_increase (%) and min_sqnr (dB, output)
    are gates that raise `QualityError`."""

    scheme: QuantizeChoice = "auto"
    calibration: str | os.PathLike[str] | None = None
    tokenizer: str | os.PathLike[str] | None = None
    text: str | os.PathLike[str] | None = None
    smooth: float = DEFAULT_SMOOTH
    min_layer_sqnr: float = DEFAULT_MIN_LAYER_SQNR
    max_ppl_increase: float | None = None
    min_sqnr: float | None = None

    def __post_init__(self) -> None:
        if self.max_ppl_increase is not None and not (self.text and self.tokenizer):
            raise QualityError("--max-ppl-increase needs --text FILE and --tokenizer DIR to measure perplexity")
        if self.text and not self.tokenizer:
            raise QualityError("--text needs --tokenizer DIR (a tokenizer.json or the folder holding it)")
        if not 0.0 <= self.smooth <= 1.0:
            raise QualityError(f"--smooth must be in [0, 1], got {self.smooth}")
        if self.calibration:
            from passes.numerics.calibration import check_calibration_file

            try:
                check_calibration_file(self.calibration, tokenizer=self.tokenizer)
            except ValueError as err:
                raise QualityError(f"--{err}") from None


@dataclass(frozen=True)
class PreparedModel:
    """The model `passes run` and `passes tune` lower: rewritten by the pipeline, shapes bound, quantized."""

    model: onnx.ModelProto
    shapes: dict[str, tuple[int, ...]]
    bound: list[BoundDim]
    result: Any  # the pipeline's PassManager result (report of every pass)
    quantization: dict[str, Any] | None


def prepare_model(
    model_path: str | os.PathLike[str], target: Any, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
    pipeline: str | None = None, quantize: QuantizeChoice = "auto",
    calibration: str | os.PathLike[str] | None = None, settings: QuantizeSettings | None = None,
    instruments: Sequence[Instrument] = (), on_stage: Callable[[str], None] | None = None,
) -> PreparedModel:
    """Load `model_path`, bind its dynamic dims, run the target's pipeline and quantize it
    (`settings`, else the scheme `quantize` with `calibration` and the default smoothing and mixed precision).
    `instruments` observe the pipeline; `on_stage` hears the name of each stage as it starts."""
    stage = on_stage or (lambda _: None)
    settings = settings or QuantizeSettings(quantize, calibration)
    stage(f"loading {model_path}")
    loaded = load_model_with_info(model_path)
    shapes, bound = bind_dims(loaded.model, input_shapes or {}, target)
    stage("importing the graph")
    result = PassManager(pipeline or target.pipeline, input_shapes=shapes, instruments=instruments).run(loaded.model)
    if settings.scheme != "none":
        stage("quantizing (smoothing, calibration, SQNR)")
    optimized, quantization, _ = _quantize(result.model, target, settings, shapes)
    return PreparedModel(optimized, dict(shapes), bound, result, quantization)


def _quantize(model: onnx.ModelProto, target: Any, settings: QuantizeSettings, shapes: Mapping[str, Sequence[int]],
              weights: Mapping[str, Any] | None = None) -> tuple[onnx.ModelProto, dict[str, Any] | None, Any]:
    """Smooth and quantize the matmul weights (scheme from the target when `auto`), keep sensitive layers
    W8A16, and measure the cost: SQNR, and perplexity when there is text to read. Returns the quantized
    model, the summary and, when `model` is hollow with its `weights` given (`PassManager.run(hollow=True)`),
    the quantized model's weights (it is hollow too: no protobuf copy of any weight is made)."""
    if settings.scheme == "none":
        return model, None, weights
    from passes.numerics.accuracy import quantization_report
    from passes.numerics.verify import filled_model
    from passes.transforms.quantize_int8 import QuantizeInt8
    from passes.transforms.smooth_quant import SmoothQuant

    choice = settings.scheme
    scheme = AUTO_SCHEME[target.capabilities.quantization] if choice == "auto" else choice
    calibration = {"calibration": str(settings.calibration or ""), "tokenizer": str(settings.tokenizer or "")
                   if settings.calibration else ""}
    elements: list[Any] = []
    int8_activations = scheme != "w8a16"
    if int8_activations and settings.smooth > 0:
        elements.append(SmoothQuant(alpha=settings.smooth, **calibration))
    quantizer = QuantizeInt8(scheme=scheme, min_sqnr=settings.min_layer_sqnr if int8_activations else 0.0,  # type: ignore[arg-type]
                             **calibration)
    result = PassManager([*elements, quantizer, *parse_pipeline("cleanup").elements]).run(
        model, weights=weights, hollow=weights is not None)
    stats = {p.name: p.stats for p in result.report.passes}
    quantized = stats["quantize-int8"]
    feeds, accuracy_inputs = _accuracy_feeds(model, settings, shapes)
    accuracy = quantization_report(model, result.model, feeds, original_weights=weights,
                                   quantized_weights=result.weights)
    summary: dict[str, Any] = {
        "scheme": scheme,
        "activations": quantized.get("activations", "per-tensor" if scheme == "w8a8-static" else "float"),
        "chosen_by": "target capabilities.quantization" if choice == "auto" else "--quantize",
        "matmuls_quantized": quantized.get("matmuls_quantized", 0),
        "calibration": quantized.get("calibration", stats.get("smooth-quant", {}).get("calibration", "not needed")),
        "smoothing": ({"alpha": settings.smooth, "activations": stats["smooth-quant"].get("activations_smoothed", 0)}
                      if "smooth-quant" in stats else None),
        "mixed_precision": ({"min_layer_sqnr_db": settings.min_layer_sqnr,
                             "w8a8_layers": quantized.get("w8a8_layers", 0),
                             "fallback_layers": [layer for layer in quantized.get("layers", []) if layer["kept"] != "w8a8"]}
                            if "layers" in quantized else None),
        "accuracy_inputs": accuracy_inputs,
        "output_sqnr_db": accuracy.min_output_sqnr_db,
        "accuracy": accuracy.to_dict(),
        "perplexity": _perplexity(filled_model(model, weights), filled_model(result.model, result.weights), settings)
        if settings.text else None,
        "warnings": [],
    }
    _judge(summary, settings)
    return result.model, summary, result.weights


def _accuracy_feeds(model: onnx.ModelProto, settings: QuantizeSettings,
                    shapes: Mapping[str, Sequence[int]]) -> tuple[list[dict[str, Any]], str]:
    from passes.numerics.calibration import load_calibration

    if settings.text:
        return load_calibration(settings.text, model, tokenizer=settings.tokenizer, samples=2), "2 windows of --text"
    if settings.calibration:
        return load_calibration(settings.calibration, model, tokenizer=settings.tokenizer or None)[:2], \
            "the calibration data"
    return [random_feeds(model, seed, input_shapes=shapes) for seed in (100, 101)], "2 generated inputs (seeds 100, 101)"


def _perplexity(original: onnx.ModelProto, quantized: onnx.ModelProto, settings: QuantizeSettings) -> dict[str, Any]:
    from passes.numerics.perplexity import eval_windows, perplexity_change

    assert settings.text and settings.tokenizer  # QuantizeSettings checked it
    return perplexity_change(original, quantized, eval_windows(original, settings.text, settings.tokenizer, EVAL_WINDOWS))


def _judge(summary: dict[str, Any], settings: QuantizeSettings) -> None:
    """Loud warnings in the report, and the gates."""
    sqnr, ppl = summary["output_sqnr_db"], summary["perplexity"]
    if sqnr < WARN_OUTPUT_SQNR_DB:
        summary["warnings"].append(f"output SQNR {sqnr:.1f} dB is below {WARN_OUTPUT_SQNR_DB:g} dB: the quantized model's "
                                   "outputs are far from the float model's (measure perplexity with --text/--tokenizer, "
                                   "or try --quantize w8a16)")
    if ppl is not None and ppl["increase_pct"] > WARN_PPL_INCREASE:
        summary["warnings"].append(f"perplexity {ppl['float']:.3f} -> {ppl['quantized']:.3f} "
                                   f"(+{ppl['increase_pct']:.2f} %) exceeds +{WARN_PPL_INCREASE:g} %")
    if settings.min_sqnr is not None and sqnr < settings.min_sqnr:
        raise QualityError(f"output SQNR {sqnr:.1f} dB is below --min-sqnr {settings.min_sqnr:g} dB; nothing written")
    if settings.max_ppl_increase is not None and ppl is not None and ppl["increase_pct"] > settings.max_ppl_increase:
        raise QualityError(f"perplexity rose {ppl['increase_pct']:.2f} % ({ppl['float']:.3f} -> {ppl['quantized']:.3f}), "
                           f"above --max-ppl-increase {settings.max_ppl_increase:g} %; nothing written")


def bind_dims(
    model: onnx.ModelProto, given: Mapping[str, Sequence[int]], target: Any
) -> tuple[dict[str, tuple[int, ...]], list[BoundDim]]:
    """Concrete shapes for every input: --shape first, then symbols they bind, then target defaults."""
    initializers = {t.name for t in model.graph.initializer}
    symbols: dict[str, tuple[int, str]] = {}
    for value in model.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, given.get(value.name, ())):
            if dim.HasField("dim_param"):
                symbols.setdefault(dim.dim_param, (int(size), "--shape"))
    shapes: dict[str, tuple[int, ...]] = {}
    bound: list[BoundDim] = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name in given:
            shapes[value.name] = tuple(int(d) for d in given[value.name])
            continue
        dims = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
                continue
            name = dim.dim_param or f"{value.name}[{axis}]"
            if name not in symbols:
                is_batch = "batch" in name.lower() or (axis == 0 and not dim.dim_param)
                symbols[name] = (
                    (target.defaults.batch, "target defaults.batch") if is_batch
                    else (target.defaults.sequence, "target defaults.sequence")
                )
            size, source = symbols[name]
            dims.append(size)
            bound.append(BoundDim(value.name, axis, name, size, source))
        shapes[value.name] = tuple(dims)
    # a name that is no input, or dims of the wrong rank, go through too: freeze-shapes refuses them
    shapes.update((name, tuple(int(d) for d in dims)) for name, dims in given.items() if name not in shapes)
    return shapes, bound


