"""The model a back end lowers, from a model file: dynamic dims bound (`--shape`, then the target's
defaults), the target's pipeline run, the matmuls quantized with the target's scheme and the cost
measured. Used by `passes run` (`passes.deploy`) and `passes tune` (`passes.tuning`) alike.

Dims named like a batch get `defaults.batch`, every other symbolic dim `defaults.sequence`; the
returned `BoundDim`s say where each value came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import onnx

from passes.core.io import load_model_with_info
from passes.infra.manager import PassManager
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
#: the scheme `auto` picks from the target's preferred quantization: static W8A8 keeps every matmul
#: int8 through TVM (a run-time zero point would widen it back to int32); W8A16 for GPUs with no int8 path
AUTO_SCHEME = {"w8a8": "w8a8-static", "w8a16": "w8a16"}


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
    calibration: str | os.PathLike[str] | None = None,
) -> PreparedModel:
    """Load `model_path`, bind its dynamic dims, run the target's pipeline and quantize it."""
    loaded = load_model_with_info(model_path)
    shapes, bound = bind_dims(loaded.model, input_shapes or {}, target)
    result = PassManager(pipeline or target.pipeline, input_shapes=shapes).run(loaded.model)
    optimized, quantization = _quantize(result.model, target, quantize, calibration, shapes)
    return PreparedModel(optimized, dict(shapes), bound, result, quantization)


def _quantize(
    model: onnx.ModelProto, target: Any, choice: str, calibration: str | os.PathLike[str] | None,
    shapes: Mapping[str, Sequence[int]],
) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """Quantize the matmul weights (scheme from the target when `auto`) and measure the cost in SQNR
    on inputs the calibration did not see."""
    if choice == "none":
        return model, None
    from passes.numerics.accuracy import quantization_report
    from passes.numerics.calibration import load_calibration
    from passes.transforms.quantize_int8 import QuantizeInt8

    scheme = AUTO_SCHEME[target.capabilities.quantization] if choice == "auto" else choice
    quantizer = QuantizeInt8(scheme=scheme, calibration=str(calibration or ""))  # type: ignore[arg-type]
    result = PassManager([quantizer, *parse_pipeline("cleanup").elements]).run(model)
    feeds = (load_calibration(calibration, model) if calibration
             else [random_feeds(model, seed, input_shapes=shapes) for seed in (100, 101)])
    accuracy = quantization_report(model, result.model, feeds)
    stats = result.report.passes[0].stats
    return result.model, {
        "scheme": scheme,
        "chosen_by": "target capabilities.quantization" if choice == "auto" else "--quantize",
        "matmuls_quantized": stats.get("matmuls_quantized", 0),
        "calibration": stats.get("calibration", "not needed" if scheme != "w8a8-static" else "generated"),
        "accuracy_inputs": "the calibration file" if calibration else "2 generated inputs (seeds 100, 101)",
        "output_sqnr_db": accuracy.min_output_sqnr_db,
        "accuracy": accuracy.to_dict(),
    }


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
    return shapes, bound


