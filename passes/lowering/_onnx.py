"""ONNX-side preparation before TVM's importer sees a model.

    QLinearMatMul(a, sa, za, b, sb, zb, sy, zy)
        -> QuantizeLinear(Cast<float>(MatMulInteger(a, b, za, zb)) * (sa * sb / sy), 1, zy)

`tvm.relax.frontend.onnx` has no QLinearMatMul converter, so it is decomposed here, bit-exactly:
onnxruntime (MLAS) requantizes the int32 accumulator as `round_half_even(float(acc) * m) + zy`,
saturated, with `m = sa * sb / sy` computed in float32 in that order; multiplying by that same `m`
and quantizing with scale 1 rounds identically. The other checks refuse, in one clear line, what the
importer would fail on with a traceback: dynamic input dims and op types it has no converter for.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
    if not any(_is_qlinear_matmul(node) for node in model.graph.node):
        return model, 0
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    names = _Names(rewritten)
    types = _elem_types(graph)
    constants = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if not _is_qlinear_matmul(node):
            nodes.append(node)
            continue
        nodes.extend(_decompose(node, names, types, constants, graph))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread_initializers(graph, {n for node in model.graph.node if _is_qlinear_matmul(node)
                                      for n in (node.input[1], node.input[4], node.input[6])})
    return rewritten, count


def _drop_unread_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the `candidates` (scales folded into a multiplier) that nothing reads any more."""
    read = {v.name for v in (*graph.input, *graph.output)} | _names_read(graph)
    kept = [t for t in graph.initializer if t.name not in candidates or t.name in read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of `graph` or of its subgraphs reads."""
    read: set[str] = set()
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                read |= _names_read(sub)
    return read


def _is_qlinear_matmul(node: onnx.NodeProto) -> bool:
    return node.op_type == "QLinearMatMul" and node.domain in ("", "ai.onnx")


def _decompose(node: onnx.NodeProto, names: _Names, types: dict[str, int],
               constants: dict[str, TensorProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The four (or six, with scales that are not constants) nodes replacing one QLinearMatMul."""
    if len(node.input) != 8 or any(not name for name in node.input):
        raise LoweringError(f"QLinearMatMul node {node.name!r} must have all 8 inputs "
                            f"(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)")
    a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = node.input
    for scale in (a_scale, b_scale, y_scale):
        if types.get(scale, TensorProto.FLOAT) != TensorProto.FLOAT:
            dtype = helper.tensor_dtype_to_np_dtype(types[scale])
            raise LoweringError(f"QLinearMatMul node {node.name!r}: scale {scale!r} is {dtype}; "
                                f"only float32 scales can be decomposed bit-exactly")
    base = node.name or "qlinear_matmul"
    accumulator, as_float, scaled = (names.fresh(f"{base}/{part}") for part in ("acc", "acc_f32", "scaled"))
    made = [helper.make_node("MatMulInteger", [a, b, a_zero, b_zero], [accumulator], name=names.fresh(base + "/matmul")),
            helper.make_node("Cast", [accumulator], [as_float], to=TensorProto.FLOAT, name=names.fresh(base + "/cast"))]
    multiplier, multiplier_nodes = _multiplier(base, (a_scale, b_scale, y_scale), names, constants, graph)
    made.extend(multiplier_nodes)
    made.append(helper.make_node("Mul", [as_float, multiplier], [scaled], name=names.fresh(base + "/requantize")))
    one = names.fresh(base + "/unit_scale")
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
    made.append(helper.make_node("QuantizeLinear", [scaled, one, y_zero], list(node.output),
                                 name=names.fresh(base + "/quantize")))
    return made


def _multiplier(base: str, scales: tuple[str, str, str], names: _Names, constants: dict[str, TensorProto],
                graph: onnx.GraphProto) -> tuple[str, list[onnx.NodeProto]]:
    """`sa * sb / sy` in float32: an initializer when all three are constants, else Mul and Div nodes."""
    if all(s in constants for s in scales):
        a_scale, b_scale, y_scale = (numpy_helper.to_array(constants[s]).astype(np.float32) for s in scales)
        name = names.fresh(base + "/multiplier")
        graph.initializer.append(numpy_helper.from_array(np.asarray((a_scale * b_scale) / y_scale, np.float32), name))
        return name, []
    product, quotient = names.fresh(base + "/scale_product"), names.fresh(base + "/multiplier")
    return quotient, [
        helper.make_node("Mul", [scales[0], scales[1]], [product], name=names.fresh(base + "/scale_mul")),
        helper.make_node("Div", [product, scales[2]], [quotient], name=names.fresh(base + "/scale_div")),
    ]


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element types of the named values the graph declares (inputs, value_info, outputs, initializers)."""
    types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type"):
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    return types


class _Names:
    """Fresh value and node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self._used = {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
        for node in graph.node:
            self._used.update(node.input)
            self._used.update(node.output)
            self._used.add(node.name)

    def fresh(self, stem: str) -> str:
        name, suffix = stem, 0
        while name in self._used:
            suffix += 1
            name = f"{stem}_{suffix}"
        self._used.add(name)
        return name
