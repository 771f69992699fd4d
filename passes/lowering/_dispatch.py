"""Dispatch the int8 matmuls of a Relax module to the project's INT8 kernels (`passes.kernels`).

    matmul(a[.., M, K] s8|u8, W_s8[K, N] constant, out_dtype=i32)
        -> reshape(call_tir(kernel, [a'[M', K], family operands of W]) (+ 128 * colsum(W)), [.., M, N])
    a' = a (int8) or a - 128 as int8 (uint8; exact: the difference lies in [-128, 127]); M' = prod(.., M)
    matmul(a_u8, W) = matmul(a_u8 - 128, W) + 128 * colsum(W)   (int32, bit for bit)

Runs after `_int8`'s rewrite, before legalization. Which family of kernels a target gets is data: its
backend and its CPU features (`_dispatch_families.choose_family`): x86 llvm with AVX512-VNNI ->
`x86-vnni`, with AVX-VNNI -> `x86-avxvnni`, with AVX2 -> `x86-avx2` (all exact; none emits the saturating
`vpmaddubsw`); aarch64 llvm with i8mm -> `arm-smmla`, with dotprod -> `arm-sdot`; OpenCL -> `opencl-int8`
(GEMV for M' = 1, GEMM otherwise). A matmul is dispatched when its activation is int8 or uint8 with a
static shape of rank >= 2 and its weight is a 2-D int8 constant [K, N]; the weight is packed for the
kernel at lower time. Each kernel (already scheduled, marked `tirx.is_scheduled`, opaque to fusion via
`op_pattern`) is added once per (M', K, N), so legalization, fusion and dlight leave it as it is.
Everything else (uint8 or non-constant weights, dynamic shapes, empty tensors) stays a Relax matmul.

Each dispatched kernel also has a reference: the family's compute definition with the same
parameters, unscheduled, which builds for this machine's CPU (`LoweredModel.reference_kernels`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from passes.kernels._gemm import SHIFT
from passes.lowering._dispatch_families import choose_family
from passes.lowering._errors import LoweringError, last_line
from passes.lowering._plan import Int8Matmul, KernelFamily, KernelPlan
from passes.lowering._matmul_rewrite import constant, dtype_of, rewrite_matmuls, static_shape
from passes.lowering._schedule import SCHEDULED_ATTR

logger = logging.getLogger(__name__)

#: the op_pattern FuseOps never fuses (relay's kOpaque)
OPAQUE = 8


@dataclass(frozen=True)
class Dispatched:
    """What one family took: how many matmuls, and the kernels (PrimFunc names) they became."""

    matmuls: int
    kernels: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"matmuls": self.matmuls, "kernels": list(self.kernels)}


@dataclass(frozen=True)
class Dispatch:
    """The rewritten module, {family: Dispatched} (empty when nothing was dispatched) and the
    reference PrimFunc of each dispatched kernel by name."""

    module: tvm.IRModule
    dispatched: Mapping[str, Dispatched] = field(default_factory=dict)
    references: Mapping[str, tirx.PrimFunc] = field(default_factory=dict)

    @property
    def matmuls(self) -> int:
        return sum(entry.matmuls for entry in self.dispatched.values())


def kernel_families(dispatched: Mapping[str, Dispatched]) -> dict[str, str]:
    """{kernel name: its family} of what a dispatch took (`Dispatch.dispatched`, `LoweredModel.dispatched`)."""
    return {kernel: family for family, entry in dispatched.items() for kernel in entry.kernels}


def dispatch_int8_matmuls(module: tvm.IRModule, target: Any, tvm_target: tvm.target.Target) -> Dispatch:
    """Dispatch the int8 matmuls of `module` to the kernel family `target` gets (none: unchanged)."""
    family = choose_family(target, tvm_target)
    if family is None:
        return Dispatch(module)
    try:
        return dispatch_to(module, family)
    except Exception as err:  # TVM re-raises a callback's error as its own type
        raise LoweringError(f"dispatching the int8 matmuls of target {target.name!r} to {family.name} kernels "
                            f"failed: {last_line(err)}") from err


def dispatch_to(module: tvm.IRModule, family: KernelFamily) -> Dispatch:
    """Replace each dispatchable int8 matmul of every Relax function by a call of `family`'s kernel.
    `module` is left as it was."""
    kernels: dict[tuple[int, int, int], tuple[tvm.ir.GlobalVar, KernelPlan]] = {}
    updated, count = rewrite_matmuls(
        module, lambda call, bindings, builder: _dispatched(call, bindings, builder, kernels, family))
    if not count:
        return Dispatch(module)
    names = tuple(sorted(plan.name for _, plan in kernels.values()))
    logger.info("dispatched %d int8 matmuls to %d %s kernels", count, len(names), family.name)
    references = {plan.name: plan.reference for _, plan in kernels.values()}
    return Dispatch(updated, MappingProxyType({family.name: Dispatched(count, names)}), MappingProxyType(references))


def _dispatched(call: relax.Call, bindings: dict, builder: relax.BlockBuilder,
                kernels: dict[tuple[int, int, int], tuple[tvm.ir.GlobalVar, KernelPlan]],
                family: KernelFamily) -> relax.Expr | None:
    if call.attrs is None or str(call.attrs.out_dtype) != "int32" or len(call.args) != 2:
        return None
    activation, weight = call.args[0], constant(call.args[1], bindings)
    shape, dtype = static_shape(activation), dtype_of(activation)
    if weight is None or shape is None or len(shape) < 2 or dtype not in ("int8", "uint8"):
        return None
    if weight.dtype != np.int8 or weight.ndim != 2 or weight.shape[0] != shape[-1]:
        return None
    rows, depth, cols = int(np.prod(shape[:-1])), shape[-1], weight.shape[1]
    if min(rows, depth, cols) < 1:
        return None  # empty tensors: nothing for a kernel to do
    if (rows, depth, cols) not in kernels:
        plan = family.kernel(rows, depth, cols)
        kernels[(rows, depth, cols)] = (builder.add_func(marked(plan.scheduled), plan.name), plan)
    kernel = kernels[(rows, depth, cols)][0]
    flat = activation if len(shape) == 2 else relax.op.reshape(activation, (rows, depth))
    signed = _to_int8(flat) if dtype == "uint8" else flat
    inputs, correction = family.operands(Int8Matmul(signed, rows, weight, dtype == "uint8"))
    result = relax.call_tir(kernel, inputs, relax.TensorType((rows, cols), "int32"))
    if correction is not None:
        result = relax.op.add(result, relax.const(correction))
    return result if len(shape) == 2 else relax.op.reshape(result, (*shape[:-1], cols))


def _to_int8(activation: relax.Expr) -> relax.Expr:
    """a_u8 - 128 as int8 (exact: the difference lies in [-128, 127])."""
    widened = relax.op.astype(activation, "int32")
    return relax.op.astype(relax.op.subtract(widened, relax.const(np.int32(SHIFT))), "int8")


def marked(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` without its global symbol, marked scheduled and opaque to fusion."""
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attrs({SCHEDULED_ATTR: True, "op_pattern": OPAQUE})
