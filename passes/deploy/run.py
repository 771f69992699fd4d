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

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from passes.core import ir
from passes.core.errors import ModelSaveError
from passes.core.io import save_model
from passes.infra.manager import Instrument
from passes.deploy.host_check import run_host_check
from passes.deploy.roofline import estimate
from passes.deploy.summary import summarize
from passes.frontend.prepare import BoundDim, QuantizeChoice, QuantizeSettings, prepare_model

#: capability -> (op it covers, pass that removes the op when the target lacks it)
CAPABILITY_OPS: Mapping[str, tuple[str, str]] = {
    "layer_norm_op": ("LayerNormalization", "decompose-layer-norm"),
    "rms_norm_op": ("RMSNormalization", "decompose-rms-norm"),
    "gelu_op": ("Gelu", "decompose-gelu"),
    "einsum": ("Einsum", "einsum-to-matmul"),
}


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
    generator: dict[str, Any] | None = None  # a KV-cache export's phases, cache and weight files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    settings: QuantizeSettings | None = None,
    instruments: Sequence[Instrument] = (),
    on_stage: Callable[[str], None] | None = None,
    context: int | None = None,
    prefill_chunk: int | None = None,
) -> RunReport:
    """Load, rewrite, quantize, lower, build and write artifacts for one target; return the report.
    `tuning` is a `passes tune` session folder whose best schedules the build uses; `settings` (smoothing,
    mixed precision, perplexity text, quality gates) replaces `quantize` and `calibration` when given.
    `instruments` observe the pipeline and `on_stage` hears each stage's name as it starts (progress).
    A decoder export with a KV cache (past_key_values in, present out) builds a generator (`generator`):
    prefill and decode over one weight set and a cache of `context` slots, prompts taken `prefill_chunk`
    tokens at a time (both default to the target's `defaults`)."""
    from passes.targets import load_target

    target = load_target(target_spec)
    final_dir = Path(output_dir) / target.name.replace(":", "-")
    created = _check_output_dir(final_dir, Path(model_path))
    try:
        if _is_kv_export(Path(model_path)):
            return _run_generator(model_path, target, final_dir, pipeline, quantize, calibration, tuning, settings,
                                  instruments=instruments, on_stage=on_stage or (lambda _: None), context=context,
                                  prefill_chunk=prefill_chunk)
        if context is not None or prefill_chunk is not None:
            raise ModelSaveError(f"{model_path}: --context and --prefill-chunk apply to decoder exports with a KV cache "
                                 "(past_key_values inputs); this model has none")
        return _run(model_path, target, final_dir, input_shapes, pipeline, quantize, calibration, tuning, settings,
                    instruments=instruments, on_stage=on_stage or (lambda _: None))
    except BaseException:  # a failed or interrupted run leaves no folder it made behind
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only while empty
        raise


def _run(model_path: str | os.PathLike[str], target: Any, final_dir: Path,
         input_shapes: Mapping[str, Sequence[int]] | None, pipeline: str | None, quantize: QuantizeChoice,
         calibration: str | os.PathLike[str] | None, tuning: Any, settings: QuantizeSettings | None, *,
         instruments: Sequence[Instrument], on_stage: Callable[[str], None]) -> RunReport:
    if tuning is not None:
        from passes.tuning import load_session

        tuning = load_session(tuning)
    prepared = prepare_model(model_path, target, input_shapes=input_shapes, pipeline=pipeline, quantize=quantize,
                             calibration=calibration, settings=settings, instruments=instruments, on_stage=on_stage)
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
                    float_model=result.model if quantization is not None else None, on_stage=on_stage)
        _replace_dir(staging, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _is_kv_export(path: Path) -> bool:
    """Whether the model grows a KV cache (read without its external data; a file that does not load is
    left for the full load to report)."""
    from passes.deploy.generator import is_kv_export

    try:
        return is_kv_export(onnx.load_model(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 (the full load says what is wrong with the file, in one line)
        return False


def _run_generator(model_path: str | os.PathLike[str], target: Any, final_dir: Path, pipeline: str | None,
                   quantize: QuantizeChoice, calibration: Any, tuning: Any, settings: QuantizeSettings | None, *,
                   instruments: Sequence[Instrument], on_stage: Callable[[str], None], context: int | None,
                   prefill_chunk: int | None) -> RunReport:
    from passes.core.io import load_model_with_info
    from passes.deploy.generator import build_generator, generator_roofline, prepare_generator

    if tuning is not None:
        from passes.tuning import load_session

        tuning = load_session(tuning)
    on_stage(f"loading {model_path}")
    prepared = prepare_generator(lambda: load_model_with_info(model_path).model, target, context=context,
                                 prefill_chunk=prefill_chunk, pipeline=pipeline,
                                 settings=settings or QuantizeSettings(quantize, calibration),
                                 check_here=_runs_here(target), instruments=tuple(instruments), on_stage=on_stage)
    result = prepared["report"]
    summary = summarize(prepared["model"])
    report = RunReport(
        target=target.name, model=str(model_path), output_dir=str(final_dir), bound_dims=prepared["bound"],
        pipeline_spec=pipeline or target.pipeline, pipeline=result.to_dict(), ops_before=result.ops_before,
        ops_after=dict(ir.op_histogram(prepared["phases"]["decode"])), weight_bytes=summary.weight_bytes, parameters=summary.parameters,
        roofline=generator_roofline(prepared, target), missing_ops=missing_ops(result.ops_before,
                                                                               result.ops_after, target),
        build_seconds=0.0, artifacts={}, quantization=prepared["quantization"],
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        build_generator(prepared, target, staging, report, tuning, on_stage=on_stage)
        manifest = _manifest(prepared["model"], target, {name: staging / rel for name, rel in report.artifacts.items()})
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        report.artifacts |= {"manifest.json": "manifest.json", "report.json": "report.json"}
        (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
        _replace_dir(staging, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _runs_here(target: Any) -> bool:
    """Whether the target is this machine's CPU (its build is run and checked here)."""
    from passes.lowering._build import runs_here
    from passes.lowering._lower import _tvm_target

    return runs_here(target.backend, _tvm_target(target))


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
                float_model: onnx.ModelProto | None = None, on_stage: Callable[[str], None] = lambda _: None) -> None:
    from passes.lowering import build, lower, run_host, write_artifacts
    from passes.lowering._build import host_threads

    started = time.perf_counter()
    on_stage(f"lowering through TVM for {target.name}")
    lowered = lower(optimized, target, tuning=tuning.memory if tuning is not None else None)
    on_stage(f"building {len(lowered.reference_kernels)} kernels")
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
    on_stage("writing artifacts")
    save_model(optimized, staging / "model.onnx")
    written = {name: path.relative_to(staging) for name, path in write_artifacts(built, staging).items()}
    written["model.onnx"] = Path("model.onnx")
    for data in staging.glob("model.onnx.*.data"):  # a model past 2 GiB keeps its weights beside it
        written[data.name] = Path(data.name)
    if built.runs_here:
        on_stage("running the host build against the exact reference")
        report.host_check = run_host_check(built, optimized, shapes, run_host, float_model)
        report.host_check["threads"] = host_threads()
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


def _check_output_dir(final_dir: Path, model_path: Path) -> list[Path]:
    """Check the output folder's place and create its parent; return the folders created, outermost first."""
    parent = final_dir.parent
    try:
        if model_path.resolve().parent == final_dir.resolve() or final_dir.resolve() in model_path.resolve().parents:
            raise ModelSaveError(f"{final_dir}: the output folder holds the input model; choose another -o")
        missing = [folder for folder in (parent, *parent.parents) if not folder.exists()][::-1]
        for folder in (parent, *parent.parents):
            if folder.exists() and not folder.is_dir():
                raise ModelSaveError(f"{folder}: exists and is not a folder")
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ModelSaveError(f"{parent}: the output folder is not writable")
    except OSError as err:
        raise ModelSaveError(f"{parent}: cannot create the output folder ({err.strerror or err})") from err
    return missing


def _replace_dir(staging: Path, final_dir: Path) -> None:
    """Swap the new artifact folder in; the previous one is removed only after the new one is in place."""
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it 0700; the folder gets the mode mkdir would give
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
