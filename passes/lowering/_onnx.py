"""ONNX-side preparation before TVM's importer sees a model.

    QLinearMatMul(a, sa, za, b, sb, zb, sy, zy)
        -> QuantizeLinear(Cast<float>(MatMulInteger(a, b, za, zb)) * (sa * sb / sy), 1, zy)

`tvm.relax.frontend.onnx` has no QLinearMatMul converter, so it is decomposed here, bit-exactly, by the
exact reference's own decomposition (`passes.numerics.exact.decompose_qlinear_matmul`): onnxruntime (MLAS)
requantizes the int32 accumulator as `round_half_even(float(acc) * m) + zy`, saturated, with
`m = sa * sb / sy` computed in float32 in that order; multiplying by that same `m` and quantizing with
scale 1 rounds identically. The other checks refuse, in one clear line, what the
importer would fail on with a traceback: dynamic input dims and op types it has no converter for.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from passes.numerics.exact import IntegerOpError, decompose_qlinear_matmul
from passes.lowering._errors import LoweringError

#: ops `from_onnx` handles outside its converter map
_IMPORTER_BUILTINS = frozenset({"Constant", "If"})
#: at most this many node names are listed per unsupported op type
_NAMES_SHOWN = 3


def check_static_inputs(model: onnx.ModelProto) -> None:
    """Raise `LoweringError` naming every graph input whose shape is not fully static."""
    initializers = {t.name for t in model.graph.initializer}
    problems = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            problems.append(f"input {value.name!r} has unknown rank")
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in tensor_type.shape.dim]
        if any(isinstance(d, str) for d in dims):
            shown = "[" + ", ".join(str(d) for d in dims) + "]"
            problems.append(f"input {value.name!r} has dynamic shape {shown}")
    if problems:
        raise LoweringError(
            "lowering needs static input shapes: " + "; ".join(problems)
            + "; bind them first (passes.optimize(model, input_shapes={...}) or `passes run --shape`)")


def check_importable(model: onnx.ModelProto) -> None:
    """Raise `LoweringError` naming the op types (and their nodes) TVM's ONNX importer cannot convert."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    convert_map = _get_convert_map()
    missing: dict[str, list[str]] = defaultdict(list)
    for index, node in enumerate(model.graph.node):
        if node.op_type not in convert_map and node.op_type not in _IMPORTER_BUILTINS:
            label = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            missing[label].append(node.name or f"#{index}")
    if missing:
        listed = []
        for op, nodes in sorted(missing.items()):
            more = f" and {len(nodes) - _NAMES_SHOWN} more" if len(nodes) > _NAMES_SHOWN else ""
            listed.append(f"{op} (node {', '.join(repr(n) for n in nodes[:_NAMES_SHOWN])}{more})")
        raise LoweringError(
            "TVM's ONNX importer has no converter for " + "; ".join(listed)
            + "; decompose or replace these ops before lowering")


def rewrite_qlinear_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Decompose every QLinearMatMul (see the module docstring); returns (new model, count)."""
    try:
        return decompose_qlinear_matmul(model)
    except IntegerOpError as err:
        raise LoweringError(str(err)) from err
