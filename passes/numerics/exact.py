"""The exact reference for quantized graphs: integer ops evaluated without saturation, on every CPU.

Why onnxruntime alone is not trusted for them: on x86 CPUs without VNNI (AMD Zen 3, Intel before Ice
Lake), onnxruntime's MLAS computes u8 x s8 MatMulInteger, QLinearMatMul and ConvInteger with
`vpmaddubsw`, which sums pairs of products into *saturating* int16 (255 * -128 * 2 < -32768). The
result, and every SQNR or perplexity measured on it, then depends on the machine. So before
onnxruntime runs a model, every integer matmul is rewritten into a form it computes exactly:

    MatMulInteger(a, b, za, zb) -> Cast<int32>(MatMul(Cast<double>(a) - za, Cast<double>(b) - zb))
    QLinearMatMul(a, sa, za, b, sb, zb, sy, zy)
        -> QuantizeLinear(Cast<float>(MatMulInteger(a, b, za, zb)) * (sa * sb / sy), 1, zy)   (then as above)

Each product is below 2^16 in magnitude, so float64 sums of them are exact integers for any K < 2^37,
whatever order the kernel adds them in. The QLinearMatMul form requantizes as MLAS does (float32
multiplier `sa * sb / sy`, round half to even, saturate), so it matches onnxruntime bit for bit where
onnxruntime's int32 accumulator is right. ConvInteger and QLinearConv have no such rewrite (onnxruntime
has no float64 Conv): a model holding one runs under `onnx.reference`, which convolves in int32.
DynamicQuantizeLinear is left to onnxruntime: it sums nothing, and its min/max, IEEE division and
round-half-to-even conversion give the same bits on every CPU (tested against the spec).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.core.errors import PassesError

#: op types whose only exact evaluator here is onnx.reference
REFERENCE_ONLY_OPS = frozenset({"ConvInteger", "QLinearConv"})


class IntegerOpError(PassesError):
    """An integer op that cannot be rewritten exactly (missing inputs, scales that are not float32)."""


def exact_integer_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every QLinearMatMul decomposed and every MatMulInteger widened to float64 (see the
    module docstring); `model` itself is returned when it holds neither."""
    decomposed, count = decompose_qlinear_matmul(model)
    if not _holds(decomposed.graph, {"MatMulInteger"}):
        return decomposed
    widened = decomposed  # already a copy of its own when a QLinearMatMul was decomposed
    if not count:
        widened = onnx.ModelProto()
        widened.CopyFrom(model)
    names = FreshNames(widened)
    _widen_graph(widened.graph, names, _ranks(widened.graph))
    return widened


def needs_reference_evaluator(model: onnx.ModelProto) -> bool:
    """Whether `model` holds an integer op onnxruntime cannot be trusted with and no rewrite covers."""
    return _holds(model.graph, REFERENCE_ONLY_OPS)


def _holds(graph: onnx.GraphProto, op_types: set[str] | frozenset[str]) -> bool:
    for node in graph.node:
        if node.op_type in op_types and node.domain in ("", "ai.onnx"):
            return True
        if any(_holds(sub, op_types) for sub in _subgraphs(node)):
            return True
    return False


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for attribute in node.attribute for g in ([attribute.g] if attribute.HasField("g") else [])
            + list(attribute.graphs)]


def _widen_graph(graph: onnx.GraphProto, names: FreshNames, ranks: dict[str, int]) -> None:
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for sub in _subgraphs(node):
            _widen_graph(sub, names, {**ranks, **_ranks(sub)})
        if node.op_type == "MatMulInteger" and node.domain in ("", "ai.onnx"):
            nodes.extend(_widened_matmul(node, names, ranks, graph))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _widened_matmul(node: onnx.NodeProto, names: FreshNames, ranks: dict[str, int],
                    graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """MatMulInteger(a, b, za?, zb?) -> Cast<int32>(MatMul(a - za, b - zb) in float64)."""
    base = node.name or "matmul_integer"
    inputs = list(node.input) + [""] * (4 - len(node.input))
    made: list[onnx.NodeProto] = []
    operands = []
    for which, (value, zero) in enumerate(((inputs[0], inputs[2]), (inputs[1], inputs[3]))):
        wide = names.fresh(f"{base}/{'ab'[which]}_f64")
        made.append(helper.make_node("Cast", [value], [wide], to=TensorProto.DOUBLE, name=names.fresh(base + "/cast")))
        if zero:
            zero_wide = names.fresh(f"{base}/{'ab'[which]}_zero_f64")
            made.append(helper.make_node("Cast", [zero], [zero_wide], to=TensorProto.DOUBLE,
                                         name=names.fresh(base + "/cast")))
            if which == 0 and ranks.get(zero, 0) == 1 and _length(zero, graph) != 1:
                zero_wide = _as_column(zero_wide, base, names, graph, made)  # a per-row zero point of A
            centred = names.fresh(f"{base}/{'ab'[which]}_centred")
            made.append(helper.make_node("Sub", [wide, zero_wide], [centred], name=names.fresh(base + "/sub")))
            wide = centred
        operands.append(wide)
    product = names.fresh(base + "/product_f64")
    made.append(helper.make_node("MatMul", operands, [product], name=names.fresh(base + "/matmul_f64")))
    made.append(helper.make_node("Cast", [product], list(node.output), to=TensorProto.INT32,
                                 name=names.fresh(base + "/to_int32")))
    return made


def _as_column(value: str, base: str, names: FreshNames, graph: onnx.GraphProto,
               made: list[onnx.NodeProto]) -> str:
    shape = names.fresh(base + "/column_shape")
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], np.int64), shape))
    column = names.fresh(base + "/a_zero_column")
    made.append(helper.make_node("Reshape", [value, shape], [column], name=names.fresh(base + "/reshape")))
    return column


def _length(name: str, graph: onnx.GraphProto) -> int | None:
    """The element count of a 1-D initializer or declared value (None: not known)."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return int(np.prod(tensor.dims))
    for value in (*graph.input, *graph.value_info):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            return dims[0].dim_value if len(dims) == 1 and dims[0].HasField("dim_value") else None
    return None


def _ranks(graph: onnx.GraphProto) -> dict[str, int]:
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.HasField("shape"):
            ranks.setdefault(value.name, len(value.type.tensor_type.shape.dim))
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                ranks[node.output[0]] = len(value.dims)
    return ranks


def decompose_qlinear_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Decompose every top-level QLinearMatMul (see the module docstring); returns (new model, count).
    `IntegerOpError` when one lacks an input or has a scale that is not float32."""
    if not any(_is_qlinear_matmul(node) for node in model.graph.node):
        return model, 0
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    names = FreshNames(rewritten)
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
        for sub in _subgraphs(node):
            read |= _names_read(sub)
    return read


def _is_qlinear_matmul(node: onnx.NodeProto) -> bool:
    return node.op_type == "QLinearMatMul" and node.domain in ("", "ai.onnx")


def _decompose(node: onnx.NodeProto, names: FreshNames, types: dict[str, int],
               constants: dict[str, TensorProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The four (or six, with scales that are not constants) nodes replacing one QLinearMatMul."""
    if len(node.input) != 8 or any(not name for name in node.input):
        raise IntegerOpError(f"QLinearMatMul node {node.name!r} must have all 8 inputs "
                             f"(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)")
    a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = node.input
    for scale in (a_scale, b_scale, y_scale):
        if types.get(scale, TensorProto.FLOAT) != TensorProto.FLOAT:
            dtype = helper.tensor_dtype_to_np_dtype(types[scale])
            raise IntegerOpError(f"QLinearMatMul node {node.name!r}: scale {scale!r} is {dtype}; "
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


def _multiplier(base: str, scales: tuple[str, str, str], names: FreshNames, constants: dict[str, TensorProto],
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


class FreshNames:
    """Fresh value and node names that collide with nothing in the model (subgraphs included)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._used: set[str] = set()
        self._collect(model.graph)

    def _collect(self, graph: onnx.GraphProto) -> None:
        self._used |= {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
        for node in graph.node:
            self._used.update(node.input)
            self._used.update(node.output)
            self._used.add(node.name)
            for sub in _subgraphs(node):
                self._collect(sub)

    def fresh(self, stem: str) -> str:
        name, suffix = stem, 0
        while name in self._used:
            suffix += 1
            name = f"{stem}_{suffix}"
        self._used.add(name)
        return name
