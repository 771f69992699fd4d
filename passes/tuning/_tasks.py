"""The tuning tasks of a lowered model: one per distinct kernel structure, weighted by FLOPs x calls.

    weight(task) = flops(one call) x calls in the model      share = weight / sum of weights

Kernels that `passes.lowering` dispatched to a hand-written INT8 kernel are tuned over that kernel's own
design space in `passes.kernels` (x86: `x86_int8.design_space` of the kernel's ISA), keyed by the kernel's unscheduled
compute (its reference in `LoweredModel.reference_kernels`); dispatched kernels of families with no
design space yet are left as they are; every other kernel is tuned over MetaSchedule's default space for the target, keyed by the
fused TIR function itself. Keys are structural, so a database tuned on one model serves every model with
the same kernel shapes. Tasks come INT8 kernels first, then by weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx

from passes.kernels import x86_int8
from passes.lowering._apply import KERNEL_SPACES, workload_of
from passes.lowering._tir import call_counts



@dataclass(frozen=True)
class TuningTask:
    """One kernel structure of the model: its workload (the database key), design space and weight."""

    name: str
    workload: tvm.IRModule
    space: str
    calls: int
    flops: float

    @property
    def weight(self) -> float:
        return self.flops * self.calls

    @property
    def int8(self) -> bool:
        return self.space in KERNEL_SPACES


def default_schedule(task: TuningTask, target: Any = None, tvm_target: tvm.target.Target | None = None) -> Any:
    """The schedule the build uses for `task` without records, as a Schedule of its workload (so it can
    be stored as a record and a tuned record is applied only when it beats it): the INT8 kernel's default
    tiles; else the default CPU schedule of `target` (`passes.lowering._cpu_rules`); else the fused
    function as TVM's CPU pipeline leaves it (no schedule; its root block is annotated `passes.untuned`,
    because MetaSchedule's databases ignore records with an empty trace)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    func = task.workload["main"]
    if task.space in KERNEL_SPACES:
        isa = x86_int8.isa_named(task.space)
        rows = int(ms.arg_info.ArgInfo.from_prim_func(func)[0].shape[0])  # A[M, K]
        return x86_int8.schedule_gemm(isa, func, x86_int8.default_tiles(isa, rows))
    if target is not None and tvm_target is not None:
        from passes.lowering._schedule import cpu_rules

        with tvm_target:
            for rule in cpu_rules(target):
                scheduled = rule.apply(func, tvm_target, False)
                if scheduled is not None:
                    return scheduled
    sch = s_tir.Schedule(task.workload)
    sch.annotate(sch.get_sblock("root"), "passes.untuned", 1)
    return sch


def extract_tasks(module: tvm.IRModule, kernels: Mapping[str, tirx.PrimFunc],
                  families: Mapping[str, str]) -> list[TuningTask]:
    """The tasks of `module` (a lowered Relax module); `kernels` are its unscheduled TIR functions by
    name (`LoweredModel.reference_kernels`), `families` the family of each dispatched kernel."""
    calls = call_counts(module)
    tasks: dict[int, TuningTask] = {}
    for name in sorted(kernels):
        found = workload_of(kernels[name], families.get(name))
        if found is None or not calls.get(name):
            continue
        workload, space = found
        key = int(tvm_ffi.structural_hash(workload))
        if key in tasks:
            known = tasks[key]
            tasks[key] = TuningTask(known.name, known.workload, known.space, known.calls + calls[name], known.flops)
            continue
        tasks[key] = TuningTask(name, workload, space, calls[name], _flops(workload))
    return sorted(tasks.values(), key=lambda task: (not task.int8, -task.weight, task.name))


def _flops(workload: tvm.IRModule) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return max(float(estimate_tir_flops(workload)), 1.0)
    except Exception:  # TVM cannot count some loop nests (e.g. data-dependent extents): weigh them as 1
        return 1.0
