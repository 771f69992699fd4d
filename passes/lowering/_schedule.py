"""Legalize, fuse and schedule a Relax module for one target.

GPU targets (OpenCL Adreno and Mali, Metal) get dlight's generic GPU rules in the order TVM's own GPU
pipeline uses: Matmul, GEMV, Reduction, GeneralReduction, Fallback. TVM's Adreno pipeline leaves Matmul
and GEMV out (it relies on texture conv kernels), so they are named here explicitly for every OpenCL
device; Metal takes the same list. CPU (llvm) targets get `_cpu_rules` (register-tiled matmuls,
parallel and vectorised loops for the rest), tiles from `schedule.float_gemm`.

Numbers come from the target description (see `_rules`): the matmul tiling from `schedule.gemm`,
shared memory from `gpu.dedicated_local_memory`, and one work-group limit, the smallest of
`schedule.max_work_group` and the TVM target's `max_num_threads` / `max_threads_per_block`, written
back into the TVM target so that every rule and the code generators see the same limit.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight as dl

from passes.lowering._cpu_rules import CpuLoops, CpuMatmul
from passes.lowering._errors import LoweringError
from passes.lowering._fast_math import legalize_map
from passes.lowering._packed_matmul import legalize_map as packed_matmuls
from passes.lowering._rules import (
    CappedGeneralReduction,
    ConfiguredMatmul,
    WithinWorkGroup,
    matmul_tiles,
)

#: the PrimFunc attribute dlight sets on what it scheduled
SCHEDULED_ATTR = "tirx.is_scheduled"
#: TVM target attributes that bound a work-group; dlight reads the first, codegen checks the second
_THREAD_LIMITS = ("max_threads_per_block", "max_num_threads")
#: work-group limit assumed when the TVM target states none
_DEFAULT_THREADS = 256


def legalize_and_fuse(module: tvm.IRModule, tvm_target: tvm.target.Target, target: Any = None, *,
                      pack_weights: bool = True) -> tvm.IRModule:
    """Relax ops -> fused TIR PrimFuncs (TVM's generic legalize passes, the same for CPU and GPU). On llvm
    targets float32 exp, sigmoid, SiLU, softmax, tanh, erf and GELU take vectorisable forms (`_fast_math`)
    and, given the target description and `pack_weights`, float matmuls read constant weights packed at
    lowering (`_packed_matmul`)."""
    fast = None
    if tvm_target.kind.name == "llvm":
        fast = {**legalize_map(), **(packed_matmuls(target) if target is not None and pack_weights else {})}
    passes = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(customize_legalize_map=fast),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ])
    with tvm_target:
        return passes(module)


def prim_funcs(module: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The module's TIR functions by name."""
    return {gvar.name_hint: func for gvar, func in module.functions_items() if isinstance(func, tirx.PrimFunc)}


def schedule(module: tvm.IRModule, target: Any, tvm_target: tvm.target.Target) -> tvm.IRModule:
    """A scheduled copy of `module` (GPU: dlight rules; CPU: `_cpu_rules`). The input is left as it was."""
    if target.device != "gpu":
        return _schedule_cpu(module, target, tvm_target)
    copy = tvm.IRModule(dict(module.functions_items()), attrs=module.attrs)  # ApplyDefaultSchedule edits in place
    with tvm_target:
        scheduled = dl.ApplyDefaultSchedule(*gpu_rules(target, tvm_target))(copy)
    unscheduled = sorted(name for name, func in prim_funcs(scheduled).items() if not _is_scheduled(func))
    if unscheduled:
        raise LoweringError(f"no dlight rule could schedule {', '.join(unscheduled)} for target {target.name!r}; "
                            f"these kernels would have no thread bindings")
    return scheduled


def _schedule_cpu(module: tvm.IRModule, target: Any, tvm_target: tvm.target.Target) -> tvm.IRModule:
    rules = cpu_rules(target)
    if not rules:
        return module
    copy = tvm.IRModule(dict(module.functions_items()), attrs=module.attrs)
    with tvm_target:
        return dl.ApplyDefaultSchedule(*rules)(copy)


def cpu_rules(target: Any) -> list[dl.ScheduleRule]:
    """The default CPU schedules (`_cpu_rules`), configured from the target's `schedule.float_gemm` (and
    `float_gemv` for single-row-tile matmuls);
    none for a description that states no float tile (its kernels stay TVM's unscheduled loops)."""
    schedule = getattr(target, "schedule", None)
    tiles = getattr(schedule, "float_gemm", None)
    if tiles is None:
        return []
    return [CpuMatmul(tiles, getattr(schedule, "float_gemv", None)), CpuLoops(tiles.vector_width)]


def gpu_rules(target: Any, tvm_target: tvm.target.Target) -> list[dl.ScheduleRule]:
    """dlight rules for a GPU target, configured from the target description."""
    limit = max_threads(tvm_target) or _DEFAULT_THREADS
    gpu = getattr(target, "gpu", None)
    use_shared = getattr(gpu, "dedicated_local_memory", None)
    return [
        WithinWorkGroup(ConfiguredMatmul(matmul_tiles(target), use_shared, limit), limit),
        WithinWorkGroup(dl.gpu.GEMV(), limit),
        WithinWorkGroup(dl.gpu.Reduction(), limit),
        WithinWorkGroup(CappedGeneralReduction(limit), limit),
        dl.gpu.Fallback(),
    ]


def max_threads(tvm_target: tvm.target.Target) -> int | None:
    """The work-group limit: the smaller of the target's max_num_threads and max_threads_per_block."""
    values = [int(tvm_target.attrs[key]) for key in _THREAD_LIMITS if tvm_target.attrs.get(key) is not None]
    return min(values) if values else None


def with_work_group_limit(tvm_target: tvm.target.Target, schedule_limit: int | None) -> tvm.target.Target:
    """`tvm_target` with max_num_threads and max_threads_per_block both set to the smallest limit
    (theirs and the description's `schedule.max_work_group`); CPU targets are returned unchanged.

    dlight reads max_threads_per_block first and TVM defaults it to 256 for OpenCL, so a target that
    only lowers max_num_threads (Mali: 64) would otherwise still get 256-thread work-groups.
    """
    if "gpu" not in tvm_target.keys:
        return tvm_target
    limits = [value for value in (max_threads(tvm_target), schedule_limit) if value is not None]
    if not limits:
        return tvm_target
    limit = min(limits)
    if all(tvm_target.attrs.get(key) is not None and int(tvm_target.attrs[key]) == limit for key in _THREAD_LIMITS):
        return tvm_target
    spec = {key: value for key, value in tvm_target.export().items() if key != "host"}
    spec.update({key: limit for key in _THREAD_LIMITS})
    host = tvm_target.host
    return tvm.target.Target(spec, host=host) if host is not None else tvm.target.Target(spec)


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get(SCHEDULED_ATTR, False))
