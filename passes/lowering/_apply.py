"""Put a session's best schedules into a lowered module (what `passes run --tuning DIR` builds).

For every TIR function of the module, its workload (`workload_of`: the fused function itself, or
the unscheduled compute of a dispatched INT8 kernel) is looked up in the database by structure; the best
record's trace, replayed on the workload, replaces the function, marked scheduled so the target's default
schedules leave it alone. Functions with no record keep their default schedule. This is
MetaScheduleApplyDatabase's lookup, with the workload of our own kernels known to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tvm
from tvm import tirx

from passes.lowering._schedule import SCHEDULED_ATTR
from passes.kernels import x86_int8


def apply_tuning(module: tvm.IRModule, kernels: Mapping[str, tirx.PrimFunc], families: Mapping[str, str],
                 database: Any, tvm_target: tvm.target.Target) -> tuple[tvm.IRModule, list[str]]:
    """(module with tuned kernels, names of the kernels replaced). `kernels` are the module's TIR
    functions before scheduling, `families` the family of each dispatched one; `module` itself is left
    as it was."""
    updated = tvm.IRModule(dict(module.functions_items()), attrs=module.attrs)
    applied = []
    for gvar, func in module.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        found = workload_of(kernels.get(gvar.name_hint, func), families.get(gvar.name_hint))
        if found is None:
            continue
        tuned = database.query_ir_module(found[0], tvm_target, "main")
        if tuned is None:
            continue
        replacement = tuned["main"].without_attr("global_symbol").with_attr(SCHEDULED_ATTR, True)
        if func.attrs is not None and "op_pattern" in func.attrs:
            replacement = replacement.with_attr("op_pattern", func.attrs["op_pattern"])
        updated[gvar] = replacement
        applied.append(gvar.name_hint)
    return updated, sorted(applied)


#: the design space of a task: an x86 int8 family (kernels/x86_int8.py) or "metaschedule" (its default space)
KERNEL_SPACES = tuple(isa.family for isa in x86_int8.ISAS)


def workload_of(func: tirx.PrimFunc, family: str | None) -> tuple[tvm.IRModule, str] | None:
    """(workload module, space) of one kernel of a lowered module, given its unscheduled form and the
    kernel family it was dispatched to (None: not dispatched); None for kernels nothing can tune."""
    if family in KERNEL_SPACES:
        return as_workload(func), family
    if family is not None or (func.attrs is not None and func.attrs.get(SCHEDULED_ATTR, False)):
        return None  # scheduled by hand, with no design space to search
    return as_workload(func), "metaschedule"


def as_workload(func: tirx.PrimFunc) -> tvm.IRModule:
    """{"main": func}, named `main` whatever it was called in the model (keys are structural)."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
