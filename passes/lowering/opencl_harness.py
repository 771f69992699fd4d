"""Run a target's GPU kernels on this CPU through PoCL and compare them with the host build.

For each scheduled PrimFunc of a lowered model, every device kernel it launches is compiled from
OpenCL C and enqueued on PoCL (the portable OpenCL CPU runtime) through `pyopencl`, with the NDRange
taken from the lowered TIR's thread bindings (global = blockIdx extent * threadIdx extent, local =
threadIdx extent). The same PrimFunc before scheduling, built for the llvm host, runs on the same
random buffers. Integer and bool buffers must match bit for bit; float buffers within `rtol`/`atol`
(schedules reorder float sums), NaN where the host has NaN.

What is compiled: for an OpenCL `BuiltModel`, the artifact's own device source (with `functions`, only
the sections of those kernels; each section compiles on its own); for a `LoweredModel`
(or a Metal target, whose MSL cannot run here) the OpenCL C that TVM generates from the same scheduled
TIR, so a Metal schedule's numerics are checked through the OpenCL code generator.

Set-up (Debian): `apt-get install pocl-opencl-icd ocl-icd-libopencl1` and `pip install pyopencl`.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tvm

from passes.kernels._opencl_dot import install_postproc
from passes.lowering._build import BuiltModel
from passes.lowering._errors import LoweringError, last_line
from passes.lowering._lower import LoweredModel
from passes.lowering._schedule import max_threads
from passes.lowering._sources import split_kernel_sources
from passes.lowering._tir import KernelLaunch, LoweredKernels, codegen, lower_kernels

#: default float tolerance: schedules split and reorder sums (K-tiling, tree reductions)
FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-4
#: a kernel's forward declaration in TVM's OpenCL source
_DECLARATION = re.compile(r"^__kernel void \w+\(.*\);$")
#: integer inputs wider than 8 bits are mostly gather indices: kept small so reads stay in bounds
_SMALL_INT_BOUND = 16


@dataclass(frozen=True)
class KernelCheck:
    """The outcome for one PrimFunc: its launches, the worst float difference, and the problem if any."""

    function: str
    launches: tuple[KernelLaunch, ...]
    max_abs_error: float
    exact: bool
    problem: str | None

    @property
    def passed(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class HarnessReport:
    """All kernel checks of one model on one OpenCL device; `source` says what was compiled: the
    artifact's device source, OpenCL C generated from the scheduled TIR, or a given source."""

    target: str
    device: str
    source: Literal["artifact", "generated", "given"]
    rtol: float
    atol: float
    checks: tuple[KernelCheck, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[KernelCheck]:
        return [check for check in self.checks if not check.passed]


def unavailable_reason() -> str | None:
    """Why the harness cannot run here (no pyopencl, no OpenCL platform), or None when it can."""
    try:
        import pyopencl as cl
    except ImportError:
        return "pyopencl is not installed (pip install pyopencl)"
    try:
        platforms = cl.get_platforms()
    except cl.Error as err:
        return f"no OpenCL platform (install pocl-opencl-icd): {err}"
    if not any(platform.get_devices() for platform in platforms):
        return "no OpenCL device (install pocl-opencl-icd)"
    return None


def check_kernels(model: BuiltModel | LoweredModel, *, seed: int = 0, rtol: float = FLOAT_RTOL,
                  atol: float = FLOAT_ATOL, functions: list[str] | None = None,
                  source: str | None = None) -> HarnessReport:
    """Run every (or the named) kernel of a GPU model on PoCL; see the module docstring.

    `source` replaces the OpenCL C to compile (a hand-written or edited kernel): its kernels must keep
    the names and parameters of the lowered TIR's, whose launch sizes are used.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise LoweringError(f"the OpenCL harness cannot run: {reason}")
    lowered = model.lowered if isinstance(model, BuiltModel) else model
    if lowered.device != "gpu":
        raise LoweringError(f"target {lowered.target_name!r} has no GPU kernels to check")
    funcs = lowered.kernels
    chosen = sorted(funcs) if functions is None else list(functions)
    unknown = sorted(set(chosen) - set(funcs))
    if unknown:
        raise LoweringError(f"no kernels named {unknown}; the model has {sorted(funcs)}")
    kernels, generated, references = _prepare(lowered, chosen)
    if source is not None:
        origin, program = "given", source
    elif isinstance(model, BuiltModel) and lowered.backend == "opencl":
        origin, program = "artifact", _artifact_program(model, kernels, chosen, whole=functions is None)
    else:
        origin, program = "generated", generated
    drift = _source_drift(program, generated) if origin == "artifact" else {}
    try:
        runner = _PoclRunner(program)
    except Exception as err:  # pyopencl's build errors carry the compiler log
        raise LoweringError(f"PoCL cannot compile the OpenCL C of {lowered.target_name!r}: {err}") from err
    checks = tuple(
        _check_function(name, funcs[name], kernels, references, runner, rtol, atol, seed, drift, lowered)
        for name in chosen)
    return HarnessReport(lowered.target_name, runner.device_name, origin, rtol, atol, checks)  # type: ignore[arg-type]


def _prepare(lowered: LoweredModel, names: list[str]) -> tuple[LoweredKernels, str, Any]:
    """The kernels' launches and generated OpenCL C, and the host build of their unscheduled forms."""
    cl_target = lowered.tvm_target if lowered.backend == "opencl" else _generic_opencl(lowered.tvm_target)
    install_postproc()  # generated like the artifact: kernels calling passes_dot4_acc carry its definition
    try:
        kernels = lower_kernels({name: lowered.kernels[name] for name in names}, cl_target)
        return kernels, codegen(kernels.device_module, cl_target), _reference_library(lowered, names)
    except LoweringError:
        raise
    except Exception as err:  # TVM raises its own error types from C++
        raise LoweringError(f"preparing the kernels of {lowered.target_name!r} for the harness failed: "
                            f"{last_line(err)}") from err


def _generic_opencl(target: tvm.target.Target) -> tvm.target.Target:
    """An OpenCL target with `target`'s work-group limits, for schedules made for Metal (no warp size:
    TVM's OpenCL code generator has no warp shuffles, so reductions go through local memory)."""
    limits = {key: int(target.attrs[key]) for key in ("max_num_threads", "max_threads_per_block",
                                                       "max_shared_memory_per_block") if key in target.attrs}
    return tvm.target.Target({"kind": "opencl", **limits}, host={"kind": "llvm"})


def _reference_library(lowered: LoweredModel, names: list[str]) -> Any:
    """The unscheduled PrimFuncs, built together for the llvm host (one compile)."""
    module = tvm.IRModule({name: lowered.reference_kernels[name].with_attr("global_symbol", name) for name in names})
    return tvm.compile(module, tvm.target.Target({"kind": "llvm"}))


def _artifact_program(built: BuiltModel, kernels: LoweredKernels, names: list[str], whole: bool) -> str:
    """The built model's device source, or only the sections of the kernels `names` launch (each
    section compiles on its own; a missing one shows up as drift)."""
    if whole:
        return built.device_source()
    sections = built.kernel_sources()
    launched = [launch.kernel for name in names for launch in kernels.launches.get(name, ())]
    return "".join(sections[kernel] for kernel in dict.fromkeys(launched) if kernel in sections)


def _source_drift(artifact: str, generated: str) -> dict[str, str]:
    """Kernels whose artifact source differs from what the lowered TIR generates (should be none).

    Each section first declares every kernel of its module, in the module's function order; the harness's
    module holds other kernels in another order, so those declarations are left out of the comparison."""
    ours, theirs = split_kernel_sources(generated), split_kernel_sources(artifact)
    return {kernel: "the artifact's source differs from the one generated from the lowered TIR"
            for kernel in ours if _canonical(theirs.get(kernel, "")) != _canonical(ours[kernel])}


def _canonical(section: str) -> list[str]:
    """A section's lines without its kernel declarations."""
    return [line for line in section.splitlines() if not _DECLARATION.match(line)]


def _check_function(name: str, func: Any, kernels: LoweredKernels, references: Any, runner: _PoclRunner,
                    rtol: float, atol: float, seed: int, drift: dict[str, str], lowered: LoweredModel) -> KernelCheck:
    launches = kernels.launches.get(name, ())
    problem = _launch_problem(launches, drift, lowered)
    if problem is not None:
        return KernelCheck(name, launches, float("nan"), False, problem)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    arrays = [_random(rng, tuple(int(d) for d in param.shape), str(param.dtype)) for param in func.params]
    expected = _run_reference(references, name, arrays)
    try:
        got = runner.run(launches, arrays)
    except Exception as err:  # noqa: BLE001 (pyopencl's launch errors become this kernel's problem)
        return KernelCheck(name, launches, float("nan"), False, f"PoCL failed: {err}")
    labels = [f"{param.name} (parameter {index})" for index, param in enumerate(func.params)]
    return _compare(name, launches, labels, expected, got, rtol, atol)


def _launch_problem(launches: tuple[KernelLaunch, ...], drift: dict[str, str], lowered: LoweredModel) -> str | None:
    if not launches:
        return "no device kernel launch found in the lowered TIR"
    limit = max_threads(lowered.tvm_target)
    for launch in launches:
        if launch.kernel in drift:
            return f"{launch.kernel}: {drift[launch.kernel]}"
        if None in launch.arguments:
            return f"{launch.kernel} takes a buffer that is not a parameter (host workspaces are not supported)"
        if limit and launch.threads_per_group > limit:
            return f"{launch.kernel}: work-group of {launch.threads_per_group} threads exceeds the target's {limit}"
    return None


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Normal floats; int8/uint8 over their whole range; wider ints in [0, 16); bools."""
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(np.bool_)
    kind = np.dtype(dtype)
    if kind.kind == "f":
        return rng.standard_normal(shape).astype(kind)
    if kind.itemsize == 1:
        info = np.iinfo(kind)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(kind)
    return rng.integers(0, _SMALL_INT_BOUND, shape).astype(kind)


def _run_reference(references: Any, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    tensors = [tvm.runtime.tensor(array.copy()) for array in arrays]
    references[name](*tensors)
    return [tensor.numpy() for tensor in tensors]


def _compare(name: str, launches: tuple[KernelLaunch, ...], labels: list[str], expected: list[np.ndarray],
             got: list[np.ndarray], rtol: float, atol: float) -> KernelCheck:
    worst, exact, problems = 0.0, True, []
    for buffer, want, have in zip(labels, expected, got):
        if np.array_equal(have, want, equal_nan=want.dtype.kind == "f"):
            continue
        exact = False
        if want.dtype.kind != "f":
            problems.append(f"{buffer}: {int(np.count_nonzero(have != want))} of {want.size} values differ")
            continue
        error, bad = _float_error(have, want, rtol, atol)
        worst = max(worst, error)
        if bad:
            problems.append(f"{buffer}: {bad} of {want.size} values beyond rtol={rtol}, atol={atol} "
                            f"(max abs error {error:.3g})")
    return KernelCheck(name, launches, worst, exact, "; ".join(problems) or None)


def _float_error(have: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> tuple[float, int]:
    """(max abs error over finite values, count of values out of tolerance or with mismatched NaN/inf)."""
    have64, want64 = have.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(want64) & np.isfinite(have64)
    special_mismatch = (~finite) & ~((np.isnan(want64) & np.isnan(have64)) | (have64 == want64))
    difference = np.abs(have64 - want64)
    out_of_tolerance = finite & (difference > atol + rtol * np.abs(want64))
    error = float(difference[finite].max()) if finite.any() else 0.0
    return error, int(np.count_nonzero(out_of_tolerance | special_mismatch))


class _PoclRunner:
    """One OpenCL program on the first PoCL (else any) device; runs kernel launches on host arrays."""

    def __init__(self, source: str) -> None:
        import pyopencl as cl

        self._cl = cl
        device = _pick_device(cl)
        self.device_name = f"{device.platform.name}: {device.name}"
        self._context = cl.Context([device])
        self._queue = cl.CommandQueue(self._context)
        self._program = cl.Program(self._context, source).build()

    def run(self, launches: tuple[KernelLaunch, ...], arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Copy `arrays` (the PrimFunc's parameters) in, run the launches in order, copy them all back."""
        cl = self._cl
        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
        buffers = [cl.Buffer(self._context, flags, hostbuf=np.ascontiguousarray(array) if array.size
                             else np.zeros(1, array.dtype)) for array in arrays]
        for launch in launches:
            kernel = getattr(self._program, launch.kernel)
            kernel(self._queue, launch.global_size, launch.local_size, *(buffers[arg] for arg in launch.arguments))
        results = []
        for array, buffer in zip(arrays, buffers):
            out = np.empty_like(array)
            if array.size:
                cl.enqueue_copy(self._queue, out, buffer)
            results.append(out)
        self._queue.finish()
        return results


def _pick_device(cl: Any) -> Any:
    platforms = sorted(cl.get_platforms(), key=lambda p: "Portable Computing Language" not in p.name)
    for platform in platforms:
        devices = platform.get_devices()
        if devices:
            return devices[0]
    raise LoweringError("no OpenCL device (install pocl-opencl-icd)")


def run_int8_kernel(kernel: Any, a: np.ndarray, b: np.ndarray,
                scales: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """Launch an `opencl_int8.OpenclKernel` through this harness on A_s8[M, K], B_s8[K, N] (packed here) and,
    with an epilogue, (a_scale f32[1], w_scale f32[N], bias f32[N]); returns C[M, N]."""
    from passes.kernels.opencl_int8 import pack_activations, pack_weights

    out_dtype = np.int32 if kernel.epilogue is None else np.float32
    arrays = [pack_activations(a, kernel.tiles), pack_weights(b, kernel.tiles),
              *(np.ascontiguousarray(x, np.float32) for x in scales),
              np.zeros((kernel.m, kernel.n), out_dtype)]
    return _PoclRunner(kernel.source).run((kernel.launch,), arrays)[-1]
