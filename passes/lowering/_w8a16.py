"""Dispatch the W8A16 matmuls of a Relax module to the Metal kernel (`passes.kernels.metal_w8a16`).

    matmul(x[.., M, K], dequantize(W_s8[K, N], scale[N], 0, axis=1))
        -> reshape(call_tir(metal_w8a16, reshape(x, [M', K]), pack(W), scale), [.., M, N])
    (M' = prod(.., M))

TVM 0.27's ONNX importer keeps `DequantizeLinear(constant)` as `dequantize` of the int8 constant;
FoldConstant, during legalization, would fold it to a float32 weight, so this runs before that, for
targets that dequantize weights in registers (`wants_w8a16`: Metal back end, W8A16 quantization).
A matmul is dispatched when x is float16/float32 with a static shape of rank >= 2, the
weight a 2-D int8 constant dequantized per column (axis 1) by constant float32 scales with a zero
zero point, and the result has x's dtype. The kernel (the target's GEMV tiles for M' = 1, GEMM tiles
otherwise) is added once per (M', K, N, dtype), already scheduled (`tirx.is_scheduled`) and opaque to
fusion; its reference is the unscheduled compute on the same packed layout, which builds for this
machine's CPU. The result joins `_dispatch`'s `Dispatch` as the family `metal-w8a16`. Everything else
keeps its `dequantize`, which FoldConstant folds to a float32 weight as before.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from passes.kernels import metal_w8a16
from passes.lowering._dispatch import OPAQUE, Dispatch, Dispatched
from passes.lowering._schedule import SCHEDULED_ATTR

logger = logging.getLogger(__name__)

#: PrimFunc names of dispatched kernels: metal_w8a16_{gemv|gemm}_m{M}_k{K}_n{N}_{dtype}
KERNEL_PREFIX = "metal_w8a16"
#: the family name in `Dispatch.dispatched` / `LoweredModel.dispatched`
FAMILY = "metal-w8a16"

_Kernels = dict[tuple[int, int, int, str], tuple[tvm.ir.GlobalVar, str, tirx.PrimFunc]]


def wants_w8a16(target: Any) -> bool:
    """Whether `target` takes W8A16 matmuls as the Metal dequantize-in-registers kernel."""
    capabilities = getattr(target, "capabilities", None)
    return target.backend == "metal" and getattr(capabilities, "quantization", None) == "w8a16"


def dispatch_w8a16_matmuls(previous: Dispatch, target: Any) -> Dispatch:
    """Replace each dispatchable W8A16 matmul of every Relax function of `previous.module` by a kernel
    call; returns `previous` with the new module and this family's entry and references added."""
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    module = previous.module
    pattern = is_op("relax.matmul")(wildcard(), wildcard())
    builder = relax.BlockBuilder(tvm.IRModule(dict(module.functions_items()), attrs=module.attrs))
    kernels: _Kernels = {}
    count = 0
    for gvar, func in module.functions_items():
        if not isinstance(func, relax.Function):
            continue
        bindings = relax.analysis.get_var2val(func)

        def dispatch(call: relax.Call, _: object, bindings: dict = bindings) -> relax.Expr:
            nonlocal count
            replacement = _dispatched(call, bindings, builder, kernels, target)
            if replacement is None:
                return call
            count += 1
            return replacement

        builder.update_func(gvar, rewrite_call(pattern, dispatch, func))
    if not count:
        return previous
    updated = relax.transform.DeadCodeElimination()(builder.get())
    names = tuple(sorted(name for _, name, _ in kernels.values()))
    logger.info("dispatched %d W8A16 matmuls to %d Metal kernels", count, len(names))
    references = {**previous.references, **{name: reference for _, name, reference in kernels.values()}}
    dispatched = {**previous.dispatched, FAMILY: Dispatched(count, names)}
    return Dispatch(updated, MappingProxyType(dispatched), MappingProxyType(references))


def count_w8a16_calls(module: tvm.IRModule) -> int:
    """How many `call_tir`s of the Relax functions of `module` call a W8A16 kernel."""
    from passes.lowering._tir import walk

    count = 0
    for func in module.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for node in walk(func.body):
            if (isinstance(node, relax.Call) and getattr(node.op, "name", "") == "relax.call_tir"
                    and node.args[0].name_hint.startswith(KERNEL_PREFIX)):
                count += 1
    return count


def _dispatched(call: relax.Call, bindings: dict, builder: relax.BlockBuilder, kernels: _Kernels,
                target: Any) -> relax.Expr | None:
    if len(call.args) != 2:
        return None
    activation, dequantized = call.args[0], _resolve(call.args[1], bindings)
    shape, dtype = _static_shape(activation), _dtype(activation)
    operands = _dequantized_weight(dequantized, bindings)
    if operands is None or shape is None or len(shape) < 2 or dtype not in metal_w8a16.ACTIVATION_DTYPES:
        return None
    weight, scale = operands
    if weight.shape[0] != shape[-1] or _dtype(call) != dtype:
        return None
    rows, depth, cols = int(np.prod(shape[:-1])), shape[-1], weight.shape[1]
    if min(rows, depth, cols) < 1:
        return None
    tiles = metal_w8a16.tiles_from_target(target, rows)
    key = (rows, depth, cols, dtype)
    if key not in kernels:
        kind = "gemv" if isinstance(tiles, metal_w8a16.GemvTiles) else "gemm"
        name = f"{KERNEL_PREFIX}_{kind}_m{rows}_k{depth}_n{cols}_{dtype}"
        scheduled = metal_w8a16.w8a16_matmul(rows, depth, cols, tiles, dtype).without_attr("global_symbol")
        gvar = builder.add_func(scheduled.with_attrs({SCHEDULED_ATTR: True, "op_pattern": OPAQUE}), name)
        kernels[key] = (gvar, gvar.name_hint, metal_w8a16.w8a16_compute(rows, depth, cols, tiles, dtype))
    kernel = kernels[key][0]
    flat = activation if len(shape) == 2 else relax.op.reshape(activation, (rows, depth))
    packed = metal_w8a16.pack_weights(weight, tiles)
    result = relax.call_tir(kernel, [flat, relax.const(packed), relax.const(scale)],
                            relax.TensorType((rows, cols), dtype))
    return result if len(shape) == 2 else relax.op.reshape(result, (*shape[:-1], cols))


def _dequantized_weight(expr: relax.Expr, bindings: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(W_s8[K, N], scale_f32[N]) of `dequantize(W, scale, 0, axis=1)` with constant operands, else None."""
    if not isinstance(expr, relax.Call) or getattr(expr.op, "name", "") != "relax.dequantize":
        return None
    weight, scale, zero = (_constant(arg, bindings) for arg in expr.args)
    if weight is None or scale is None or zero is None or np.any(zero):
        return None
    if weight.dtype != np.int8 or weight.ndim != 2 or scale.dtype != np.float32:
        return None
    if int(expr.attrs.axis) not in (1, -1) or scale.shape != (weight.shape[1],):
        return None
    if str(expr.attrs.out_dtype) != "float32":
        return None
    return weight, scale


def _resolve(expr: relax.Expr, bindings: dict) -> relax.Expr:
    while isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    return expr


def _constant(expr: relax.Expr, bindings: dict) -> np.ndarray | None:
    expr = _resolve(expr, bindings)
    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(dim, tirx.IntImm) for dim in shape):
        return None
    return tuple(int(dim) for dim in shape)


def _dtype(expr: relax.Expr) -> str | None:
    dtype = getattr(expr.ty, "dtype", None)
    return str(dtype) if dtype is not None else None
