"""`passes run`: rewrite a model with the target's pipeline, quantize its matmul weights to INT8 (the
scheme the target prefers: W8A8 where it has int8 dot products, W8A16 on Apple GPUs), lower it through
TVM, build, and write the artifacts and a report into `OUT/<target>/`.

    result = run_for_target("graph.onnx", "sd8gen2", "out")   # -> RunReport (also out/sd8gen2/report.json)

Dynamic input dims not bound by `input_shapes` are bound from the target's defaults (dims named like
a batch get `defaults.batch`, every other symbolic dim `defaults.sequence`), and the report says which.
The artifact folder is assembled in a temporary folder beside it and renamed into place, so a failed
run never leaves half an output; the input model is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from passes import ir
from passes.errors import ModelSaveError, VerificationError
from passes.io import load_model_with_info, save_model
from passes.manager import PassManager
from passes.pipeline import parse_pipeline
from passes.roofline import estimate
from passes.summary import summarize
from passes.verify import compare_outputs, random_feeds, run_model

#: capability -> (op it covers, pass that removes the op when the target lacks it)
CAPABILITY_OPS: Mapping[str, tuple[str, str]] = {
    "layer_norm_op": ("LayerNormalization", "decompose-layer-norm"),
    "rms_norm_op": ("RMSNormalization", "decompose-rms-norm"),
    "gelu_op": ("Gelu", "decompose-gelu"),
    "einsum": ("Einsum", "einsum-to-matmul"),
}
HOST_RTOL, HOST_ATOL = 1e-4, 1e-4  # float32: TVM's fused kernels reassociate reductions (atol x max |output|)
#: A model that quantizes activations can flip an int8 code where the build's float rounding upstream
#: differs from the reference's by an ulp (a value on a rounding boundary, or a run-time scale one ulp
#: apart); the flip moves that output by a quantization step, and later layers can amplify it (the
#: sample at hidden 1024, W8A8 dynamic: one flipped code in the first layer, 4 % of the logits' range
#: at the end). Both are then equally good samples of the quantized model, so such a build is judged by
#: what users get: its SQNR against fp32 may fall at most this far below the reference's. A saturating
#: or wrong int8 kernel lands far below (the README sample: 22.7 dB against 37 dB on a Zen 3).
QUANTIZED_MARGIN_DB = 1.0
#: ops that quantize activations (so codes can flip on an ulp of upstream rounding)
ACTIVATION_QUANTIZERS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear"})


@dataclass
class BoundDim:
    input: str
    axis: int
    dim: str
    value: int
    source: str  # "--shape" or "target defaults.batch" / "target defaults.sequence"


@dataclass
class RunReport:
    """Everything `passes run` did; `report.json` is `to_dict()`."""

    target: str
    model: str
    output_dir: str
    bound_dims: list[BoundDim]
    pipeline_spec: str  # as given (--pipeline or the target's), before expansion
    pipeline: dict[str, Any]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    weight_bytes: dict[str, int]
    parameters: int
    roofline: dict[str, Any]
    missing_ops: list[dict[str, str]]
    build_seconds: float
    artifacts: dict[str, str]  # name -> path relative to output_dir
    host_check: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None
    dispatched: dict[str, Any] = field(default_factory=dict)  # kernel family -> int8 matmuls and kernels
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QuantizeChoice = Literal["auto", "none", "w8a8-dynamic", "w8a8-static", "w8a16"]
#: the scheme `auto` picks from the target's preferred quantization: static W8A8 keeps every matmul
#: int8 through TVM (a run-time zero point would widen it back to int32); W8A16 for GPUs with no int8 path
AUTO_SCHEME = {"w8a8": "w8a8-static", "w8a16": "w8a16"}


def run_for_target(
    model_path: str | os.PathLike[str],
    target_spec: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    pipeline: str | None = None,
    quantize: QuantizeChoice = "auto",
    calibration: str | os.PathLike[str] | None = None,
    tuning: str | os.PathLike[str] | None = None,
) -> RunReport:
    """Load, rewrite, quantize, lower, build and write artifacts for one target; return the report.
    `tuning` is a `passes tune` session folder whose best schedules the build uses."""
    from passes.targets import load_target

    target = load_target(target_spec)
    final_dir = Path(output_dir) / target.name.replace(":", "-")
    _check_output_dir(final_dir, Path(model_path))
    if tuning is not None:
        from passes.tuning import load_session

        tuning = load_session(tuning)
    prepared = prepare_model(model_path, target, input_shapes=input_shapes, pipeline=pipeline, quantize=quantize,
                             calibration=calibration)
    shapes, bound, result = prepared.shapes, prepared.bound, prepared.result
    optimized, quantization = prepared.model, prepared.quantization
    tokens = int(np.prod(next(iter(shapes.values()), (1,))))  # batch x sequence of the first input
    roofline = estimate(optimized, target, tokens=tokens)
    summary = summarize(optimized)
    report = RunReport(
        target=target.name, model=str(model_path), output_dir=str(final_dir), bound_dims=bound,
        pipeline_spec=pipeline or target.pipeline, pipeline=result.report.to_dict(), ops_before=result.report.ops_before, ops_after=result.report.ops_after,
        weight_bytes=summary.weight_bytes, parameters=summary.parameters, roofline=roofline.to_dict(),
        missing_ops=missing_ops(result.report.ops_before, result.report.ops_after, target),
        build_seconds=0.0, artifacts={}, quantization=quantization,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        _build_into(staging, optimized, target, report, shapes, tuning,
                    float_model=result.model if quantization is not None else None)
        _replace_dir(staging, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


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
    from passes.accuracy import quantization_report
    from passes.calibration import load_calibration
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


def missing_ops(before: Mapping[str, int], after: Mapping[str, int], target: Any) -> list[dict[str, str]]:
    """Ops the model had that the target lacks, and what became of them."""
    rows = []
    for capability, (op, handler) in CAPABILITY_OPS.items():
        if before.get(op) and not target.has(capability):
            left = after.get(op, 0)
            status = f"removed by {handler}" if not left else f"{left} left: add {handler} to the pipeline"
            rows.append({"op": op, "capability": capability, "status": status})
    return rows


def _build_into(staging: Path, optimized: onnx.ModelProto, target: Any, report: RunReport,
                shapes: Mapping[str, Sequence[int]], tuning: Any = None,
                float_model: onnx.ModelProto | None = None) -> None:
    from passes.lowering import build, lower, run_host, write_artifacts

    started = time.perf_counter()
    lowered = lower(optimized, target, tuning=tuning.memory if tuning is not None else None)
    built = build(lowered, target)
    report.build_seconds = time.perf_counter() - started
    report.dispatched = {family: d.to_dict() for family, d in lowered.dispatched.items()}
    if tuning is not None:
        report.tuning = {"session": str(tuning.folder), "records": len(tuning),
                         "kernels_tuned": len(lowered.tuned_kernels), "kernels": len(lowered.reference_kernels),
                         "tuned": list(lowered.tuned_kernels)}
        if not lowered.tuned_kernels:
            report.notes.append(f"the tuning session {tuning.folder} has no records for this model's kernels "
                                f"on {target.name}: the build uses the default schedules")
    save_model(optimized, staging / "model.onnx")
    written = {name: path.relative_to(staging) for name, path in write_artifacts(built, staging).items()}
    written["model.onnx"] = Path("model.onnx")
    if built.runs_here:
        report.host_check = _host_check(built, optimized, shapes, run_host, float_model)
    else:
        report.notes.append(
            f"{target.name} is not this machine: the build is not run here"
            + (" (its kernels are checked on PoCL by the test suite)" if target.backend == "opencl" else "")
        )
        report.notes.append("linking a loadable library needs the target's toolchain (Android NDK / Xcode): "
                            "model.tar holds the objects")
    manifest = _manifest(optimized, target, {name: staging / rel for name, rel in written.items()})
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    written["manifest.json"] = Path("manifest.json")
    written["report.json"] = Path("report.json")
    report.artifacts = {name: str(rel) for name, rel in sorted(written.items())}
    (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))


def _host_check(built: Any, optimized: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], run_host: Any,
                float_model: onnx.ModelProto | None) -> dict[str, Any]:
    """Run the host build on seeded inputs and compare it with the exact reference (`run_model`): integer
    outputs bit for bit; float outputs to float rounding (`HOST_RTOL`, `HOST_ATOL` x the output's
    magnitude), or, where activations are quantized and codes may flip, by SQNR against `float_model`
    (the model before quantization; see `QUANTIZED_MARGIN_DB`). `VerificationError` when it fails."""
    feeds = random_feeds(optimized, 0, input_shapes=shapes)
    expected, got = run_model(optimized, feeds), run_host(built, feeds)
    comparison = compare_outputs(expected, got, rtol=HOST_RTOL, atol=HOST_ATOL, scale_atol=True)
    result: dict[str, Any] = {**comparison.to_dict(), "reference": "onnxruntime, integer ops exact (passes.exact)",
                              "criterion": "allclose"}
    if comparison.ok:
        return result
    if float_model is not None and any(node.op_type in ACTIVATION_QUANTIZERS for node in optimized.graph.node):
        return _quantized_check(result, comparison, expected, got, run_model(float_model, feeds))
    worst = max(comparison.outputs, key=lambda o: o.max_abs_error)
    raise VerificationError(
        f"the host build differs from the reference (onnxruntime, integer ops exact): output '{worst.name}' "
        f"max abs error {worst.max_abs_error:.3g} (rtol={HOST_RTOL:g}, atol={HOST_ATOL:g} x max |output|)")


def _quantized_check(result: dict[str, Any], comparison: Any, expected: Mapping[str, np.ndarray],
                     got: Mapping[str, np.ndarray], fp32: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from passes.accuracy import sqnr_db

    floats = [o.name for o in comparison.outputs if o.dtype.startswith("float")]
    ints_exact = all(o.ok for o in comparison.outputs if not o.dtype.startswith("float"))
    versus_fp32 = {name: {"reference_db": sqnr_db(fp32[name], expected[name]), "build_db": sqnr_db(fp32[name], got[name]),
                          "build_vs_reference_db": sqnr_db(expected[name], got[name])} for name in floats}
    result.update(criterion="sqnr against fp32", margin_db=QUANTIZED_MARGIN_DB, sqnr=versus_fp32)
    short = [name for name, v in versus_fp32.items() if v["build_db"] < v["reference_db"] - QUANTIZED_MARGIN_DB]
    if ints_exact and not short:
        result["ok"] = True
        return result
    if not ints_exact:
        wrong = next(o for o in comparison.outputs if not o.ok and not o.dtype.startswith("float"))
        raise VerificationError(f"the host build differs from the reference (onnxruntime, integer ops exact): "
                                f"integer output '{wrong.name}' is not bit-exact")
    name = short[0]
    raise VerificationError(
        f"the host build is less accurate than the quantized model: output '{name}' SQNR against fp32 "
        f"{versus_fp32[name]['build_db']:.1f} dB, the reference's {versus_fp32[name]['reference_db']:.1f} dB "
        f"(at most {QUANTIZED_MARGIN_DB:g} dB below is allowed)")


def _manifest(model: onnx.ModelProto, target: Any, files: Mapping[str, Path]) -> dict[str, Any]:
    graph = ir.import_graph(model, infer_shapes=False)
    return {
        "target": target.name,
        "inputs": [{"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.inputs],
        "outputs": [{"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.outputs],
        "versions": {name: _version(name) for name in ("passes", "onnx", "onnx-graphsurgeon", "apache-tvm",
                                                       "apache-tvm-ffi", "onnxruntime", "numpy")}
        | {"python": platform.python_version()},
        "sha256": {name: _sha256(path) for name, path in sorted(files.items()) if path.is_file()},
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_output_dir(final_dir: Path, model_path: Path) -> None:
    parent = final_dir.parent
    if parent.exists() and not parent.is_dir():
        raise ModelSaveError(f"{parent}: exists and is not a folder")
    parent.mkdir(parents=True, exist_ok=True)
    if model_path.resolve().parent == final_dir.resolve() or final_dir.resolve() in model_path.resolve().parents:
        raise ModelSaveError(f"{final_dir}: the output folder holds the input model; choose another -o")


def _replace_dir(staging: Path, final_dir: Path) -> None:
    """Swap the new artifact folder in; the previous one is removed only after the new one is in place."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
