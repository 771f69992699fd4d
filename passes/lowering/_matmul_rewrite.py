"""The driver the lowering's matmul rewrites share (`_int8`, `_dispatch`, `_w8a16`), and the small
Relax lookups they match with.

    module' = module with replace(call, bindings, builder) substituted for every relax.matmul call it
              answers (None: the call stays); dead bindings removed when anything changed

`replace` may add TIR functions with `builder.add_func` (a dispatched kernel); `bindings` maps each
Relax variable of the function being rewritten to its value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, tirx

Replace = Callable[[relax.Call, dict, relax.BlockBuilder], "relax.Expr | None"]


def rewrite_matmuls(module: tvm.IRModule, replace: Replace) -> tuple[tvm.IRModule, int]:
    """(rewritten module, number of matmuls replaced); `module` is left as it was."""
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.matmul")(wildcard(), wildcard())
    builder = relax.BlockBuilder(tvm.IRModule(dict(module.functions_items()), attrs=module.attrs))
    count = 0
    for gvar, func in module.functions_items():
        if not isinstance(func, relax.Function):
            continue
        bindings = relax.analysis.get_var2val(func)

        def rewrite(call: relax.Call, _: object, bindings: dict = bindings) -> relax.Expr:
            nonlocal count
            replacement = replace(call, bindings, builder)
            if replacement is None:
                return call
            count += 1
            return replacement

        builder.update_func(gvar, rewrite_call(pattern, rewrite, func))
    if not count:
        return module, 0
    return relax.transform.DeadCodeElimination()(builder.get()), count


def resolve(expr: relax.Expr, bindings: dict) -> relax.Expr:
    """The value behind a chain of variable bindings."""
    while isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    return expr


def constant(expr: relax.Expr, bindings: dict) -> np.ndarray | None:
    """The value of a Relax constant (behind bindings), else None."""
    expr = resolve(expr, bindings)
    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The shape of a tensor whose dims are all known, else None."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None or not all(isinstance(dim, tirx.IntImm) for dim in shape):
        return None
    return tuple(int(dim) for dim in shape)


def dtype_of(expr: relax.Expr) -> str | None:
    dtype = getattr(expr.ty, "dtype", None)
    return str(dtype) if dtype is not None else None
