"""Keep int8 matmuls int8 in Relax.

    matmul(i32(a) - za, i32(w) - zw) -> matmul(a, w, out_dtype=i32) - za * colsum(w) - zw * rowsum(a) + K * za * zw

`from_onnx` imports MatMulInteger by widening both operands to int32 (`astype`, then `subtract` of
the zero point when there is one), and FoldConstant would then store int8 weights as int32 constants,
four times the bytes. The rewrite hands the 8-bit operands (int8 or uint8, mixed allowed) to the matmul
itself and moves the zero points into correction terms (colsum(w) of a constant weight folds to a
constant). Every step is int32 ring arithmetic, so the result equals the widened one bit for bit,
wraparound included. Zero points of zero (symmetric quantization) add no terms. Operands of another
form (per-row activation zero points, zero points that are not constants) stay widened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from passes.lowering._matmul_rewrite import dtype_of, resolve, rewrite_matmuls

_NARROW_DTYPES = frozenset({"int8", "uint8"})


@dataclass(frozen=True)
class _Operand:
    """An 8-bit tensor and its zero point (None or a numpy int array: scalar, or per-column for `w`)."""

    value: relax.Expr
    zero_point: np.ndarray | None


def narrow_int8_matmuls(module: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Rewrite the widened 8-bit matmuls of every Relax function; returns (module, count)."""
    return rewrite_matmuls(module, lambda call, bindings, _: _narrowed(call, bindings))


def _narrowed(call: relax.Call, bindings: dict) -> relax.Expr | None:
    if str(call.attrs.out_dtype) != "int32" or len(call.args) != 2:
        return None
    lhs, rhs = (_operand(arg, bindings) for arg in call.args)
    if lhs is None or rhs is None or _rank(lhs.value) < 2 or _rank(rhs.value) < 2:
        return None
    k = int(lhs.value.ty.shape[-1])
    n = int(rhs.value.ty.shape[-1])
    if lhs.zero_point is not None and lhs.zero_point.size != 1:
        return None  # per-row activation zero points
    if rhs.zero_point is not None and rhs.zero_point.size != 1 and rhs.zero_point.shape[-1:] != (n,):
        return None  # only per-tensor or per-column weight zero points
    if rhs.zero_point is not None and rhs.zero_point.size not in (1, n):
        return None
    result = relax.op.matmul(lhs.value, rhs.value, out_dtype="int32")
    if lhs.zero_point is not None:
        column_sums = relax.op.sum(relax.op.astype(rhs.value, "int32"), axis=[-2])
        result = relax.op.subtract(result, relax.op.multiply(_int32_const(lhs.zero_point.reshape(())), column_sums))
    if rhs.zero_point is not None:
        row_sums = relax.op.sum(relax.op.astype(lhs.value, "int32"), axis=[-1], keepdims=True)
        zero_w = _int32_const(rhs.zero_point.reshape(()) if rhs.zero_point.size == 1 else rhs.zero_point.reshape(n))
        result = relax.op.subtract(result, relax.op.multiply(row_sums, zero_w))
    if lhs.zero_point is not None and rhs.zero_point is not None:
        both = k * lhs.zero_point.reshape(()).astype(np.int64) * rhs.zero_point.astype(np.int64)
        result = relax.op.add(result, _int32_const(both.reshape(()) if both.size == 1 else both.reshape(n)))
    return result


def _operand(expr: relax.Expr, bindings: dict) -> _Operand | None:
    """`astype<int32>(x8)` or `astype<int32>(x8) - zero_point` (a constant, zeros dropped), else None."""
    expr = resolve(expr, bindings)
    widened = _widened_8bit(expr, bindings)
    if widened is not None:
        return _Operand(widened, None)
    if not _is_call(expr, "relax.subtract"):
        return None
    widened = _widened_8bit(resolve(expr.args[0], bindings), bindings)
    zero_point = _constant_int(expr.args[1], bindings)
    if widened is None or zero_point is None:
        return None
    return _Operand(widened, zero_point if np.any(zero_point) else None)


def _widened_8bit(expr: relax.Expr, bindings: dict) -> relax.Expr | None:
    """x when `expr` is astype<int32>(x) with x int8/uint8."""
    if not _is_call(expr, "relax.astype") or str(expr.attrs.dtype) != "int32":
        return None
    inner = expr.args[0]
    return inner if dtype_of(inner) in _NARROW_DTYPES else None


def _constant_int(expr: relax.Expr, bindings: dict) -> np.ndarray | None:
    """The integer value (with its broadcast shape) of a constant behind astype / expand_dims calls."""
    expr = resolve(expr, bindings)
    if _is_call(expr, "relax.astype"):
        return _constant_int(expr.args[0], bindings)
    if _is_call(expr, "relax.expand_dims"):
        inner = _constant_int(expr.args[0], bindings)
        return None if inner is None else np.expand_dims(inner, tuple(int(a) for a in expr.attrs.axis))
    if isinstance(expr, tvm.ir.Constant):
        value = expr.value.numpy()
        return value.astype(np.int64) if value.dtype.kind in "iu" else None
    return None


def _is_call(expr: relax.Expr, op_name: str) -> bool:
    return isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == op_name


def _rank(expr: relax.Expr) -> int:
    shape = getattr(expr.ty, "shape", None)
    return len(shape) if shape is not None else -1


def _int32_const(value: np.ndarray) -> relax.Constant:
    return relax.const(np.asarray(value).astype(np.int32))
