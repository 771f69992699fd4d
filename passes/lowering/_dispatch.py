"""Dispatch the int8 matmuls of a Relax module to the x86 AVX512-VNNI GEMM (`passes.kernels.x86_vnni`).

    matmul(a_s8[.., M, K], W_s8[K, N], out_dtype=i32)
        -> reshape(call_tir(vnni_gemm, reshape(a, [M', K]), pack(W), 128 * colsum(W)), [.., M, N])
    (M' = prod(.., M))
    matmul(a_u8, W_s8) = sum_k ((a_u8 - 128) + 128) W = vnni_gemm(a_u8 - 128, pack(W), correction 0)

Runs after `_int8`'s rewrite, before legalization, for llvm targets whose CPU has AVX512-VNNI. A
matmul is dispatched when its activation is int8 or uint8 with a static shape of rank >= 2 and its
weight is a 2-D int8 constant; the weight becomes the packed constant and the shift correction
`pack_weights` makes. The kernel (compute definition + the kernel's default schedule for M') is added
once per (M', K, N), already scheduled (`tirx.is_scheduled`) and opaque to fusion (`op_pattern`), so
legalization, fusion and the default schedule leave it as it is (TVM's CPU pipeline has no schedule
pass; the GPU ones skip what is marked scheduled).

The kernel computes u8 x s8 on `a_s8 + 128` (`vpdpbusd` accumulates in int32 without saturating). A
uint8 activation (static W8A8 quantizes activations to uint8 with a zero point) goes in as
`a_u8 - 128` with a zero correction, so the kernel multiplies `a_u8` itself. Either way the result
equals `matmul(a, W)` in int32 bit for bit. Everything else (uint8 weights, weights that are not
constants, dynamic shapes) stays a Relax matmul.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx

from passes.kernels import x86_vnni
from passes.kernels._gemm import SHIFT, GemmShape, shifted_gemm
from passes.lowering._schedule import SCHEDULED_ATTR

logger = logging.getLogger(__name__)

#: PrimFunc names of dispatched kernels: vnni_gemm_m{M}_k{K}_n{N}
KERNEL_PREFIX = "vnni_gemm"
#: the op_pattern FuseOps never fuses (relay's kOpaque)
_OPAQUE = 8


def target_has_vnni(tvm_target: tvm.target.Target) -> bool:
    """Whether `tvm_target` is an x86 llvm target whose CPU has AVX512-VNNI."""
    if tvm_target.kind.name != "llvm":
        return False
    triple = str(tvm_target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if not triple.startswith(("x86_64", "i686", "i386")):
        return False
    return x86_vnni.has_vnni(tvm_target)


def dispatch_vnni_matmuls(module: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Replace each dispatchable int8 matmul of every Relax function by a VNNI kernel call;
    returns (module, count). `module` is left as it was."""
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.matmul")(wildcard(), wildcard())
    builder = relax.BlockBuilder(tvm.IRModule(dict(module.functions_items()), attrs=module.attrs))
    kernels: dict[tuple[int, int, int], tvm.ir.GlobalVar] = {}
    count = 0
    for gvar, func in module.functions_items():
        if not isinstance(func, relax.Function):
            continue
        bindings = relax.analysis.get_var2val(func)

        def dispatch(call: relax.Call, _: object, bindings: dict = bindings) -> relax.Expr:
            nonlocal count
            replacement = _dispatched(call, bindings, builder, kernels)
            if replacement is None:
                return call
            count += 1
            return replacement

        builder.update_func(gvar, rewrite_call(pattern, dispatch, func))
    updated = builder.get()
    if count:
        updated = relax.transform.DeadCodeElimination()(updated)
        logger.info("dispatched %d int8 matmuls to %d x86 VNNI kernels", count, len(kernels))
    return updated, count


def _dispatched(call: relax.Call, bindings: dict, builder: relax.BlockBuilder,
                kernels: dict[tuple[int, int, int], tvm.ir.GlobalVar]) -> relax.Expr | None:
    if call.attrs is None or str(call.attrs.out_dtype) != "int32" or len(call.args) != 2:
        return None
    activation, weight = call.args[0], _constant(call.args[1], bindings)
    shape = _static_shape(activation)
    unsigned = _dtype(activation) == "uint8"
    if weight is None or shape is None or len(shape) < 2 or _dtype(activation) not in ("int8", "uint8"):
        return None
    if weight.dtype != np.int8 or weight.ndim != 2 or weight.shape[0] != shape[-1]:
        return None
    rows, depth, cols = int(np.prod(shape[:-1])), shape[-1], weight.shape[1]
    if min(rows, depth, cols) < 1:
        return None  # empty tensors: nothing for a kernel to do
    tiles = x86_vnni.default_tiles(rows)
    packed = x86_vnni.pack_weights(weight, cols=tiles.cols)
    kernel = kernels.get((rows, depth, cols))
    if kernel is None:
        kernel = builder.add_func(_kernel(GemmShape(rows, depth, cols, tiles.rows, tiles.cols), tiles),
                                  f"{KERNEL_PREFIX}_m{rows}_k{depth}_n{cols}")
        kernels[(rows, depth, cols)] = kernel
    signed = _to_int8(activation) if unsigned else activation
    flat = signed if len(shape) == 2 else relax.op.reshape(signed, (rows, depth))
    correction = np.zeros_like(packed.correction) if unsigned else packed.correction
    result = relax.call_tir(kernel, [flat, relax.const(packed.data), relax.const(correction)],
                            relax.TensorType((rows, cols), "int32"))
    return result if len(shape) == 2 else relax.op.reshape(result, (*shape[:-1], cols))


def _to_int8(activation: relax.Expr) -> relax.Expr:
    """a_u8 - 128 as int8 (exact: the difference lies in [-128, 127])."""
    widened = relax.op.astype(activation, "int32")
    return relax.op.astype(relax.op.subtract(widened, relax.const(np.int32(SHIFT))), "int8")


def _kernel(shape: GemmShape, tiles: x86_vnni.VnniTiles) -> tirx.PrimFunc:
    """The scheduled `shifted_gemm` PrimFunc, marked scheduled and opaque to fusion."""
    func = x86_vnni.schedule_gemm(shifted_gemm(shape), tiles).mod["main"]
    func = func.without_attr("global_symbol")
    return func.with_attrs({SCHEDULED_ATTR: True, "op_pattern": _OPAQUE})


def _constant(expr: relax.Expr, bindings: dict) -> np.ndarray | None:
    while isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(dim, tirx.IntImm) for dim in shape):
        return None
    return tuple(int(dim) for dim in shape)


def _dtype(expr: relax.Expr) -> str | None:
    dtype = getattr(expr.ty, "dtype", None)
    return str(dtype) if dtype is not None else None
