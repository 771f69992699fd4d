"""`build`, `write_artifacts` and `run_host`: compile a lowered model, write what a target needs, run
it here when the target is this machine's CPU."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from passes.kernels._opencl_dot import install_postproc
from passes.lowering._quiet import native_stderr_to_log
from passes.lowering._errors import LoweringError, last_line
from passes.lowering._lower import LoweredModel
from passes.lowering._sources import (
    KERNEL_SUFFIX,
    device_modules,
    kernel_file_stem,
    split_kernel_sources,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltModel:
    """A compiled model: the Relax VM executable (host code plus any device module) for one target."""

    lowered: LoweredModel
    executable: Any  # tvm.relax.VMExecutable
    seconds: float = 0.0
    #: the Relax VM `run_host` made for this build, kept for the next call (making one per call cost
    #: more than a small decode-shaped kernel)
    _machines: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def target_name(self) -> str:
        return self.lowered.target_name

    @property
    def runs_here(self) -> bool:
        """True when the target is this machine's CPU (an llvm target for this architecture and OS)."""
        return runs_here(self.lowered.backend, self.lowered.tvm_target)

    def device_source(self) -> str:
        """The whole source of the GPU device module ('' for CPU targets)."""
        return "".join(module.inspect_source() for module in device_modules(self.executable.mod))

    def kernel_sources(self) -> dict[str, str]:
        """{kernel name: its OpenCL C or MSL source}; empty for CPU targets."""
        sources: dict[str, str] = {}
        for module in device_modules(self.executable.mod):
            sources.update(split_kernel_sources(module.inspect_source()))
        return sources

    @property
    def kernel_suffix(self) -> str | None:
        """'cl' or 'metal' for GPU targets, None for CPU targets."""
        kinds = [module.kind for module in device_modules(self.executable.mod)]
        return KERNEL_SUFFIX[kinds[0]] if kinds else None


def build(lowered: LoweredModel, target: Any) -> BuiltModel:
    """Compile `lowered` with `tvm.compile` for `target` (the one it was lowered for)."""
    if target.name != lowered.target_name:
        raise LoweringError(f"the model was lowered for target {lowered.target_name!r}, not {target.name!r}; "
                            f"lower it again for {target.name!r}")
    tvm_target = lowered.tvm_target
    pipeline = _relax_pipeline(tvm_target)
    if tvm_target.kind.name == "opencl":
        install_postproc()  # dispatched INT8 kernels call passes_dot4_acc: their sources get its definition
    started = time.perf_counter()
    try:
        with native_stderr_to_log():
            executable = tvm.compile(lowered.module, tvm_target, relax_pipeline=pipeline)
    except Exception as err:  # TVM raises its own error types from C++
        raise LoweringError(f"building for target {target.name!r} failed: {last_line(err)}") from err
    seconds = time.perf_counter() - started
    logger.info("built %s in %.2f s", target.name, seconds)
    return BuiltModel(lowered, executable, seconds)


def _relax_pipeline(tvm_target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's per-backend dataflow-lowering and finalizing passes (legalizing and scheduling are done).

    `relax.pipeline.dataflow_lower_passes` cannot be used for llvm in 0.27: it calls
    `relax.backend.cpu_generic.dataflow_lower_passes`, which that package does not export.
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
    from tvm.relax.backend.gpu_generic import pipeline as gpu_pipeline

    chosen = cpu_pipeline if tvm_target.kind.name == "llvm" else gpu_pipeline
    return tvm.transform.Sequential(chosen.dataflow_lower_passes(tvm_target) + chosen.finalize_passes(tvm_target))


def write_artifacts(built: BuiltModel, folder: Path) -> dict[str, Path]:
    """Write `model.tar` (objects), `model.so` when the target is this machine, one source file per GPU
    kernel under `kernels/`, and `params/` (a TVM tensor cache) when the weights were lifted out of the
    code; returns {relative path: path}. Earlier kernel files are replaced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"model.tar": _export(built, folder / "model.tar")}
    if built.lowered.weights:
        from passes.lowering._params import write_params

        for path in write_params(built.lowered.weights, folder / "params"):
            written[str(path.relative_to(folder))] = path
    if built.runs_here:
        written["model.so"] = _export(built, folder / "model.so")
    suffix = built.kernel_suffix
    if suffix is not None:
        kernel_dir = folder / "kernels"
        kernel_dir.mkdir(exist_ok=True)
        for stale in [*kernel_dir.glob("*.cl"), *kernel_dir.glob("*.metal")]:
            stale.unlink()
        for kernel, source in sorted(built.kernel_sources().items()):
            relative = f"kernels/{kernel_file_stem(kernel)}.{suffix}"
            _write_text(folder / relative, source)
            written[relative] = folder / relative
    return written


def run_host(built: BuiltModel, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a host build on this CPU with the Relax VM; {output name: array}."""
    if not built.runs_here:
        raise LoweringError(f"target {built.target_name!r} is not this machine's CPU; only host (llvm) builds run here")
    arguments = [tvm.runtime.tensor(_feed(spec, feeds)) for spec in built.lowered.inputs]
    unknown = sorted(set(feeds) - {spec.name for spec in built.lowered.inputs})
    if unknown:
        raise LoweringError(f"feeds name unknown inputs {unknown}; the model's inputs are "
                            f"{[spec.name for spec in built.lowered.inputs]}")
    machine = built._machines.get("host")
    if machine is None:
        host_threads()
        machine = built._machines["host"] = relax.VirtualMachine(built.executable, tvm.cpu())
    try:
        result = machine["main"](*arguments)
    except Exception as err:
        raise LoweringError(f"running the host build failed: {last_line(err)}") from err
    values = list(result) if isinstance(result, (tvm_ffi.Array, list, tuple)) else [result]
    return {spec.name: value.numpy() for spec, value in zip(built.lowered.outputs, values)}


def host_threads() -> int:
    """The threads TVM's runtime runs host kernels on: all of this machine's cores unless the user set
    `TVM_NUM_THREADS` (TVM's own default is one). The pool reads the variable once, when it first starts,
    so this is called before any host kernel runs; returns the count the pool has."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(os.cpu_count() or 1)
    return int(tvm.get_global_func("runtime.NumThreads")())


def _feed(spec: Any, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    if spec.name not in feeds:
        raise LoweringError(f"no feed for input {spec.name!r} ({spec.dtype}{list(spec.shape)})")
    value = np.asarray(feeds[spec.name])
    value = value if value.flags.c_contiguous else value.copy(order="C")  # ascontiguousarray makes 0-d 1-d
    if value.dtype != np.dtype(spec.dtype) or tuple(value.shape) != spec.shape:
        raise LoweringError(f"feed {spec.name!r} is {value.dtype}{list(value.shape)}; "
                            f"the model takes {spec.dtype}{list(spec.shape)}")
    return value


def runs_here(backend: str, tvm_target: tvm.target.Target) -> bool:
    """Whether a build for this back end and TVM target runs on this machine's CPU."""
    return backend == "llvm" and is_this_machine(tvm_target)


def is_this_machine(tvm_target: tvm.target.Target) -> bool:
    system = tvm.target.codegen.llvm_get_system_triple()
    triple = str(tvm_target.attrs.get("mtriple", "") or system)
    return triple.split("-")[0] == system.split("-")[0] and ("linux" in triple) == ("linux" in system)


def _export(built: BuiltModel, path: Path) -> Path:
    """`export_library` to a temporary name beside `path`, then rename (no half-written artifacts)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        partial = Path(scratch) / path.name
        try:
            built.executable.export_library(str(partial))
        except Exception as err:
            raise LoweringError(f"exporting {path.name} for target {built.target_name!r} failed: "
                                f"{last_line(err)}") from err
        os.replace(partial, path)
    return path


def _write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".partial-", delete=False) as handle:
        handle.write(text)
    shutil.move(handle.name, path)
