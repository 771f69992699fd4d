"""`lower`: a shape-frozen ONNX model -> a Relax IRModule scheduled for one target."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import onnx
import tvm
from tvm import tirx

from passes.core import ir
from passes.lowering._dispatch import Dispatched, dispatch_int8_matmuls, kernel_families
from passes.lowering._quiet import native_stderr_to_log
from passes.lowering._errors import LoweringError, last_line
from passes.lowering._kv_inplace import write_caches_in_place
from passes.lowering._params import lift_weights
from passes.lowering._relax import TensorSpec, import_onnx
from passes.lowering._schedule import (
    legalize_and_fuse,
    prim_funcs,
    schedule,
    with_work_group_limit,
)
from passes.lowering._w8a16 import dispatch_w8a16_matmuls, wants_w8a16

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoweredModel:
    """A model lowered for one target: the scheduled module plus what a check or a build needs.

    `reference_kernels` are the same PrimFuncs before scheduling (legalized and fused only); they
    compile for the host CPU, so a GPU kernel can be compared with them on this machine (a dispatched
    INT8 kernel's reference is its family's unscheduled compute definition). `dispatched` says which
    int8 matmuls went to which kernel family (`_dispatch`): {family: Dispatched(matmuls, kernels)}.
    """

    module: tvm.IRModule
    reference_kernels: Mapping[str, tirx.PrimFunc]
    target_name: str
    backend: str
    device: str
    tvm_target: tvm.target.Target
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    qlinear_matmuls_decomposed: int = 0
    int8_matmuls: int = 0
    seconds: Mapping[str, float] = field(default_factory=dict)
    dispatched: Mapping[str, Dispatched] = field(default_factory=dict)
    tuned_kernels: tuple[str, ...] = ()
    #: a generator's entry points: {function name: (inputs, outputs)}; empty for one-function models
    entries: Mapping[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = field(default_factory=dict)
    #: weights lifted out of the code (`_params.lift_weights`): every function takes them after its inputs
    weights: Mapping[str, Any] = field(default_factory=dict)
    #: KV-cache writes done in place (`_kv_inplace`)
    cache_writes_in_place: int = 0

    @property
    def kernels(self) -> dict[str, tirx.PrimFunc]:
        """The scheduled TIR functions by name (one or more device kernels each on a GPU)."""
        return prim_funcs(self.module)


def lower(model: onnx.ModelProto, target: Any, tuning: Any = None) -> LoweredModel:
    """Import `model` (all input shapes static) into Relax, keep int8 matmuls int8, legalize, fuse and
    schedule for `target` (a `passes.targets.TargetDescription`). Kernels with a record in `tuning` (a
    MetaSchedule database, e.g. a `passes tune` session's) take its best schedule. Raises `LoweringError`."""
    with native_stderr_to_log():
        return _lower(model, target, tuning)


def _packed_for_decode(model: onnx.ModelProto, target: Any, any_rows: bool = False) -> onnx.ModelProto:
    """CPU targets with a decode tile: one-row float matmuls get their weights packed into contiguous
    panels of `schedule.float_gemv.tile_n` columns (`pack-matmul-weights`), which the default matmul
    schedule then streams whole. `any_rows` packs every such matmul (a generator's prefill reads the
    weights its decode reads: one layout, stored once)."""
    gemv = getattr(getattr(target, "schedule", None), "float_gemv", None)
    if target.backend != "llvm" or gemv is None:
        return model
    from passes.transforms.pack_matmul_weights import PackMatmulWeights

    graph = ir.import_graph(model)
    result, _ = PackMatmulWeights(panel=gemv.tile_n, any_rows=any_rows).run_checked(graph)
    return ir.export_model(graph) if result.modified else model  # unchanged: no export, no weight copy


def lower_generator(phases: Mapping[str, onnx.ModelProto], target: Any, tuning: Any = None, *,
                    release: bool = False) -> LoweredModel:
    """Lower the shape-frozen graphs of a generator's phases (e.g. {"prefill": .., "decode": ..}, made by
    `static-kv-cache` and shape freezing) into one module with one Relax function per phase; KV-cache
    writes on cache parameters happen in place, and the weights are lifted out of the code (one set,
    shared by every phase: `LoweredModel.weights`). With `release`, `phases` (a dict) is emptied as each
    phase is imported, so a graph's weights go as soon as TVM holds its own. Raises `LoweringError`."""
    if not phases:
        raise LoweringError("a generator needs at least one phase")
    if release and not isinstance(phases, dict):
        raise TypeError("lower_generator(release=True) empties the phases: pass a dict")
    with native_stderr_to_log():
        return _lower(phases if release else dict(phases), target, tuning)


def _import_phases(phases: dict[str, onnx.ModelProto], target: Any) -> tuple[tvm.IRModule, dict, Any]:
    """Import each phase and gather their functions into one module, named after the phases; `phases` is
    emptied on the way (each graph is dropped once imported)."""
    functions: dict[str, Any] = {}
    entries = {}
    imported = None
    for name in list(phases):
        imported = import_onnx(_packed_for_decode(phases.pop(name), target, any_rows=True))
        functions[name] = imported.module["main"].with_attr("global_symbol", name)
        entries[name] = (imported.inputs, imported.outputs)
    assert imported is not None
    return tvm.IRModule(functions), entries, imported


def _lower(model: onnx.ModelProto | dict[str, onnx.ModelProto], target: Any, tuning: Any) -> LoweredModel:
    """One model, or a generator's phases (a dict: one function each, weights lifted out of the code)."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    entries: dict = {}
    generator = isinstance(model, dict)
    if generator:
        module, entries, imported = _import_phases(model, target)
    else:
        imported = import_onnx(_packed_for_decode(model, target))
        module = imported.module
    seconds["import"] = time.perf_counter() - started
    tvm_target = _tvm_target(target)
    counts = (imported.inputs, imported.outputs, imported.qlinear_matmuls_decomposed, imported.int8_matmuls)
    del imported  # each module holds its own copy of the weights: none is kept past its last use
    dispatch = dispatch_int8_matmuls(module, target, tvm_target)
    if wants_w8a16(target):
        dispatch = dispatch_w8a16_matmuls(dispatch, target)
    del module
    module, in_place = write_caches_in_place(dispatch.module, gpu=target.device == "gpu")
    dispatched, dispatch_references = dispatch.dispatched, dispatch.references
    del dispatch
    started = time.perf_counter()
    try:
        # a generator's phases share one weight set, laid out for both by `pack-matmul-weights` at import: a
        # prefill-only copy of a weight the graph pass left alone would store it twice
        fused = legalize_and_fuse(module, tvm_target, target, pack_weights=not generator)
    except Exception as err:  # TVM raises its own error types from C++
        raise LoweringError(f"legalizing the model for target {target.name!r} failed: {last_line(err)}") from err
    del module
    seconds["legalize"] = time.perf_counter() - started
    references = MappingProxyType({name: dispatch_references.get(name, func) for name, func in prim_funcs(fused).items()})
    tuned: list[str] = []
    if tuning is not None:
        from passes.lowering._apply import apply_tuning

        fused, tuned = apply_tuning(fused, references, kernel_families(dispatched), tuning, tvm_target)
    started = time.perf_counter()
    try:
        scheduled = schedule(fused, target, tvm_target)
    except LoweringError:
        raise
    except Exception as err:
        raise LoweringError(f"scheduling for target {target.name!r} failed: {last_line(err)}") from err
    seconds["schedule"] = time.perf_counter() - started
    del fused
    weights: dict[str, Any] = {}
    if entries:
        scheduled, weights = lift_weights(scheduled)
    logger.info("lowered for %s: %d kernels, %d int8 matmuls", target.name, len(references), counts[3])
    return LoweredModel(scheduled, references, target.name, target.backend, target.device, tvm_target,
                        *counts, MappingProxyType(seconds), dispatched, tuple(tuned),
                        MappingProxyType(entries), MappingProxyType(weights), in_place)


def _tvm_target(target: Any) -> tvm.target.Target:
    made = target.tvm_target()
    if not isinstance(made, tvm.target.Target):
        raise LoweringError(f"target {target.name!r}: tvm_target() returned {type(made).__name__}, not a tvm Target")
    return with_work_group_limit(made, getattr(getattr(target, "schedule", None), "max_work_group", None))

