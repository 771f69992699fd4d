"""Dispatch the W8A16 matmuls of a Relax module to the GPU kernel (`passes.kernels.metal_w8a16`: family
`metal-w8a16` on Metal, `opencl-w8a16` on OpenCL, where TVM's OpenCL code generator emits the same TIR) or,
on CPU (llvm) targets, to `passes.kernels.cpu_w8a16` (family `cpu-w8a16`, float32 activations).

    matmul(x[.., M, K], dequantize(W_s8[K, N], scale[N], 0, axis=1))
        -> reshape(call_tir(metal_w8a16, reshape(x, [M', K]), pack(W), scale), [.., M, N])
    (M' = prod(.., M))

TVM 0.27's ONNX importer keeps `DequantizeLinear(constant)` as `dequantize` of the int8 constant;
FoldConstant, during legalization, would fold it to a float32 weight, so this runs before that, for
targets that dequantize weights in registers (`wants_w8a16`: CPU and OpenCL targets, Metal targets that
prefer W8A16).
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

from passes.kernels import cpu_w8a16, metal_w8a16
from passes.lowering._dispatch import Dispatch, Dispatched, marked
from passes.lowering._matmul_rewrite import constant, dtype_of, resolve, rewrite_matmuls, static_shape

logger = logging.getLogger(__name__)

#: PrimFunc names of dispatched kernels: metal_w8a16_{gemv|gemm}_m{M}_k{K}_n{N}_{dtype}
KERNEL_PREFIX = "metal_w8a16"
#: the family name in `Dispatch.dispatched` / `LoweredModel.dispatched`
FAMILY = "metal-w8a16"
#: the CPU (llvm) kernel's names, cpu_w8a16_m{M}_k{K}_n{N}, and family
CPU_KERNEL_PREFIX = "cpu_w8a16"
CPU_FAMILY = "cpu-w8a16"
#: the GPU kernel on OpenCL targets (Adreno, Mali): opencl_w8a16_{gemv|gemm}_m{M}_k{K}_n{N}_{dtype}
OPENCL_KERNEL_PREFIX = "opencl_w8a16"
OPENCL_FAMILY = "opencl-w8a16"
#: back end -> (kernel prefix, family)
_NAMES = {"llvm": (CPU_KERNEL_PREFIX, CPU_FAMILY), "metal": (KERNEL_PREFIX, FAMILY),
          "opencl": (OPENCL_KERNEL_PREFIX, OPENCL_FAMILY)}

_Kernels = dict[tuple[int, int, int, str], tuple[tvm.ir.GlobalVar, str, tirx.PrimFunc]]


def wants_w8a16(target: Any) -> bool:
    """Whether `target` takes W8A16 matmuls as a dequantize-in-registers kernel: the GPU one on Apple GPUs
    that prefer W8A16 and on every OpenCL target (a model quantized W8A16 there, or the layers a W8A8
    model keeps W8A16), `passes.kernels.cpu_w8a16` on every CPU (llvm) target."""
    capabilities = getattr(target, "capabilities", None)
    return target.backend in ("llvm", "opencl") or (target.backend == "metal"
                                                     and getattr(capabilities, "quantization", None) == "w8a16")


def dispatch_w8a16_matmuls(previous: Dispatch, target: Any) -> Dispatch:
    """Replace each dispatchable W8A16 matmul of every Relax function of `previous.module` by a kernel
    call; returns `previous` with the new module and this family's entry and references added."""
    kernels: _Kernels = {}
    updated, count = rewrite_matmuls(
        previous.module, lambda call, bindings, builder: _dispatched(call, bindings, builder, kernels, target))
    if not count:
        return previous
    names = tuple(sorted(name for _, name, _ in kernels.values()))
    family = _NAMES[target.backend][1]
    logger.info("dispatched %d W8A16 matmuls to %d %s kernels", count, len(names), family)
    references = {**previous.references, **{name: reference for _, name, reference in kernels.values()}}
    dispatched = {**previous.dispatched, family: Dispatched(count, names)}
    return Dispatch(updated, MappingProxyType(dispatched), MappingProxyType(references))


def count_w8a16_calls(module: tvm.IRModule) -> int:
    """How many `call_tir`s of the Relax functions of `module` call a W8A16 kernel."""
    from passes.lowering._tir import call_counts

    return sum(count for name, count in call_counts(module).items()
               if name.startswith(tuple(prefix for prefix, _ in _NAMES.values())))


def _dispatched(call: relax.Call, bindings: dict, builder: relax.BlockBuilder, kernels: _Kernels,
                target: Any) -> relax.Expr | None:
    if len(call.args) != 2:
        return None
    activation, dequantized = call.args[0], resolve(call.args[1], bindings)
    shape, dtype = static_shape(activation), dtype_of(activation)
    operands = _dequantized_weight(dequantized, bindings)
    if operands is None or shape is None or len(shape) < 2 or dtype not in metal_w8a16.ACTIVATION_DTYPES:
        return None
    weight, scale = operands
    if weight.shape[0] != shape[-1] or dtype_of(call) != dtype:
        return None
    rows, depth, cols = int(np.prod(shape[:-1])), shape[-1], weight.shape[1]
    if min(rows, depth, cols) < 1:
        return None
    chosen = _cpu_kernel if target.backend == "llvm" else _gpu_kernel
    found = chosen(rows, depth, cols, dtype, weight, target, builder, kernels)
    if found is None:
        return None
    kernel, packed = found
    flat = activation if len(shape) == 2 else relax.op.reshape(activation, (rows, depth))
    result = relax.call_tir(kernel, [flat, relax.const(packed), relax.const(scale)],
                            relax.TensorType((rows, cols), dtype))
    return result if len(shape) == 2 else relax.op.reshape(result, (*shape[:-1], cols))


def _gpu_kernel(rows: int, depth: int, cols: int, dtype: str, weight: np.ndarray, target: Any,
                builder: relax.BlockBuilder, kernels: _Kernels) -> tuple[tvm.ir.GlobalVar, np.ndarray]:
    """The GPU kernel (the target's GEMV tiles for one row, GEMM tiles otherwise) and its packed weight."""
    tiles = metal_w8a16.tiles_from_target(target, rows)
    key = (rows, depth, cols, dtype)
    if key not in kernels:
        kind = "gemv" if isinstance(tiles, metal_w8a16.GemvTiles) else "gemm"
        name = f"{_NAMES[target.backend][0]}_{kind}_m{rows}_k{depth}_n{cols}_{dtype}"
        gvar = builder.add_func(marked(metal_w8a16.w8a16_matmul(rows, depth, cols, tiles, dtype)), name)
        kernels[key] = (gvar, gvar.name_hint, metal_w8a16.w8a16_compute(rows, depth, cols, tiles, dtype))
    return kernels[key][0], metal_w8a16.pack_weights(weight, tiles)


def _cpu_kernel(rows: int, depth: int, cols: int, dtype: str, weight: np.ndarray, target: Any,
                builder: relax.BlockBuilder, kernels: _Kernels) -> tuple[tvm.ir.GlobalVar, np.ndarray] | None:
    """The CPU kernel and its packed weight: float32 activations only, columns a multiple of a panel; rows
    accumulated together from the target's float register tile (`schedule.float_gemm`)."""
    panel = cpu_w8a16.panel_for(cols)
    if panel is None or dtype != "float32":
        return None
    key = (rows, depth, cols, "cpu")
    if key not in kernels:
        name = f"{CPU_KERNEL_PREFIX}_m{rows}_k{depth}_n{cols}"
        tiles = getattr(getattr(target, "schedule", None), "float_gemm", None)
        tile = cpu_w8a16.row_tile(rows, panel, tiles.tile_m, tiles.tile_n) if tiles is not None else 1
        gvar = builder.add_func(marked(cpu_w8a16.w8a16_matmul(rows, depth, cols, panel, tile)), name)
        kernels[key] = (gvar, gvar.name_hint, cpu_w8a16.w8a16_compute(rows, depth, cols, panel))
    return kernels[key][0], cpu_w8a16.pack_weights(weight, panel)


def _dequantized_weight(expr: relax.Expr, bindings: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(W_s8[K, N], scale_f32[N]) of `dequantize(W, scale, 0, axis=1)` with constant operands, else None."""
    if not isinstance(expr, relax.Call) or getattr(expr.op, "name", "") != "relax.dequantize":
        return None
    weight, scale, zero = (constant(arg, bindings) for arg in expr.args)
    if weight is None or scale is None or zero is None or np.any(zero):
        return None
    if weight.dtype != np.int8 or weight.ndim != 2 or scale.dtype != np.float32:
        return None
    if int(expr.attrs.axis) not in (1, -1) or scale.shape != (weight.shape[1],):
        return None
    if str(expr.attrs.out_dtype) != "float32":
        return None
    return weight, scale
