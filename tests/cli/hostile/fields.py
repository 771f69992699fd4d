"""Invalid contents of a well-formed file: families `bad-dtype`, `bad-dims`, `bad-data`, `bad-elem-type`,
`bad-graph`, `bad-opset`, `bad-cast` and `sparse`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._base import MUST_REFUSE, OK_OR_ERROR, Case, _bytes_case, _proto_case, small_model

def _set_dtype(dtype: int) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].data_type = dtype

    return mutate


def _set_dims(dims: Sequence[int]) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        w = model.graph.initializer[0]
        del w.dims[:]
        w.dims.extend(dims)

    return mutate


def _float_data_w(count: int) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        w = model.graph.initializer[0]
        w.ClearField("raw_data")
        w.float_data.extend(float(i) / 16 for i in range(count))

    return mutate


def _raw_len(size: int) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].raw_data = bytes(range(size))

    return mutate


def _invalid_tensors() -> Iterator[Case]:
    for dtype in (99, -1, 0, 2**31 - 1):
        yield from _proto_case("bad-dtype", f"initializer-{dtype}", _set_dtype(dtype), MUST_REFUSE)
    yield from _proto_case("bad-dtype", "initializer-string", _set_dtype(TensorProto.STRING), MUST_REFUSE)
    for dims in ((-4, -4), (4, -4), (-1,), (2**40, 4), (2**62, 2**62), (4, 4, 0)):
        yield from _proto_case("bad-dims", "x".join(map(str, dims)), _set_dims(dims), MUST_REFUSE)
    yield from _proto_case("bad-data", "raw-68-for-64", _raw_len(68), MUST_REFUSE)
    yield from _proto_case("bad-data", "raw-60-for-64", _raw_len(60), MUST_REFUSE)
    yield from _proto_case("bad-data", "raw-0-for-64", _raw_len(0), MUST_REFUSE)
    yield from _proto_case("bad-data", "float-17-for-16", _float_data_w(17), MUST_REFUSE)
    yield from _proto_case("bad-data", "float-15-for-16", _float_data_w(15), MUST_REFUSE)

    def both(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].float_data.extend([1.0] * 16)  # raw_data and float_data at once

    yield from _proto_case("bad-data", "raw-and-float", both, MUST_REFUSE)

    def int64_in_float(model: onnx.ModelProto) -> None:
        w = model.graph.initializer[0]
        w.ClearField("raw_data")
        w.int64_data.extend(range(16))

    yield from _proto_case("bad-data", "int64-data-for-float", int64_in_float, MUST_REFUSE)
    for where in ("input", "output"):
        for elem in (0, 99, -7):
            def mutate(model: onnx.ModelProto, where: str = where, elem: int = elem) -> None:
                info = model.graph.input[0] if where == "input" else model.graph.output[0]
                info.type.tensor_type.elem_type = elem

            # an output without an element type is against the IR spec, but a tool may infer it
            exits = OK_OR_ERROR if (where, elem) == ("output", 0) else MUST_REFUSE
            yield from _proto_case("bad-elem-type", f"{where}-{elem}", mutate, exits)


def _graph_defects() -> Iterator[Case]:
    def cycle(model: onnx.ModelProto) -> None:
        model.graph.node[0].input[0] = "Y"  # MatMul reads Relu's output: mm -> add -> relu -> mm

    def self_loop(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Relu", ["loop"], ["loop"], name="self"))
        model.graph.node[2].input[0] = "loop"

    def ghost(model: onnx.ModelProto) -> None:
        model.graph.node[1].input[1] = "ghost"

    def ghost_output(model: onnx.ModelProto) -> None:
        model.graph.output[0].name = "nowhere"

    def twice(model: onnx.ModelProto) -> None:
        model.graph.output.append(model.graph.output[0])

    def no_outputs(model: onnx.ModelProto) -> None:
        del model.graph.output[:]

    def no_nodes(model: onnx.ModelProto) -> None:
        del model.graph.node[:]

    def produced_twice(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Relu", ["X"], ["a"], name="dup"))

    def duplicate_initializer(model: onnx.ModelProto) -> None:
        model.graph.initializer.append(model.graph.initializer[1])

    def initializer_shadows_input(model: onnx.ModelProto) -> None:
        model.graph.input.append(helper.make_tensor_value_info("B", TensorProto.FLOAT, [4]))

    def subgraph_ghost(model: onnx.ModelProto) -> None:
        branch = helper.make_graph([helper.make_node("Relu", ["phantom"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        model.graph.initializer.append(cond)
        model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
        model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))

    def wrong_attribute_type(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Softmax", ["Y"], ["s"], axis=1.5))
        model.graph.output[0].name = "s"

    def ir_version_zero(model: onnx.ModelProto) -> None:
        model.ir_version = 0

    refused = {"cycle": cycle, "self-loop": self_loop, "undefined-input": ghost, "undefined-output": ghost_output,
               "produced-twice": produced_twice, "duplicate-initializer": duplicate_initializer,
               "subgraph-undefined": subgraph_ghost, "attribute-type": wrong_attribute_type,
               "ir-version-0": ir_version_zero}
    for name, mutate in refused.items():
        yield from _proto_case("bad-graph", name, mutate, MUST_REFUSE)
    unusual = {"output-twice": twice, "no-outputs": no_outputs, "no-nodes": no_nodes,
               "initializer-shadows-input": initializer_shadows_input}
    for name, mutate in unusual.items():
        yield from _proto_case("bad-graph", name, mutate, OK_OR_ERROR)
    # 3 protobuf levels per If: 20 parses, 200 is past protobuf's nesting limit (100)
    yield from _bytes_case("bad-graph", "if-nested-20", lambda: _nested_ifs(20), OK_OR_ERROR)
    yield from _bytes_case("bad-graph", "if-nested-200", lambda: _nested_ifs(200), MUST_REFUSE)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _nested_ifs(depth: int) -> bytes:
    """The small model plus an If whose then_branch nests `depth` Ifs deep, serialised by hand (the
    protobuf API refuses to build messages past its own nesting limit)."""
    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4])

    leaf = helper.make_graph([helper.make_node("Identity", ["X"], ["e"])], "leaf", [], [value("e")])
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["t0"])], "g0", [], [value("t0")])
    branch = graph.SerializeToString()
    node = b""
    for level in range(1, depth + 1):
        then = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
        node = helper.make_node("If", ["cond"], [f"t{level}"], else_branch=leaf).SerializeToString()
        node += _field(5, then + _field(6, branch))  # NodeProto.attribute = 5, AttributeProto.g = 6
        shell = onnx.GraphProto(name=f"g{level}", output=[value(f"t{level}")])
        branch = _field(1, node) + shell.SerializeToString()  # GraphProto.node = 1
    model = small_model()
    model.graph.initializer.append(helper.make_tensor("cond", TensorProto.BOOL, [], [True]))
    model.graph.output.append(value(f"t{depth}"))
    graph_bytes = model.graph.SerializeToString() + _field(1, node)
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph_bytes)  # ModelProto.graph = 7


def _opsets() -> Iterator[Case]:
    def opset(version: int) -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            model.opset_import[0].version = version

        return mutate

    def custom_op(imported: bool, version: int = 1) -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            model.graph.node.append(helper.make_node("Frob", ["Y"], ["f"], domain="com.hostile"))
            model.graph.output[0].name = "f"
            if imported:
                model.opset_import.append(helper.make_opsetid("com.hostile", version))

        return mutate

    def unknown_default_op(model: onnx.ModelProto) -> None:
        model.graph.node[2].op_type = "Frobnicate"

    def ir_future(model: onnx.ModelProto) -> None:
        model.ir_version = 99

    yield from _proto_case("bad-opset", "onnx-99", opset(99), OK_OR_ERROR)
    yield from _proto_case("bad-opset", "onnx-0", opset(0), MUST_REFUSE)
    yield from _proto_case("bad-opset", "onnx-negative", opset(-3), MUST_REFUSE)
    yield from _proto_case("bad-opset", "ir-version-99", ir_future, OK_OR_ERROR)
    yield from _proto_case("bad-opset", "unknown-domain", custom_op(True), OK_OR_ERROR)
    yield from _proto_case("bad-opset", "unknown-domain-v99", custom_op(True, 99), OK_OR_ERROR)
    yield from _proto_case("bad-opset", "domain-not-imported", custom_op(False), MUST_REFUSE)
    yield from _proto_case("bad-opset", "unknown-onnx-op", unknown_default_op, MUST_REFUSE)


def _casts() -> Iterator[Case]:
    for to in (99, -1, 0):
        def mutate(model: onnx.ModelProto, to: int = to) -> None:
            model.graph.node.append(helper.make_node("Cast", ["Y"], ["c"], to=to))
            model.graph.output[0].name = "c"

        yield from _proto_case("bad-cast", f"to-{to}", mutate, MUST_REFUSE)


def _sparse() -> Iterator[Case]:
    def sparse(values: Sequence[float], indices: Sequence[int] | Sequence[Sequence[int]], dims: Sequence[int],
               dtype: int = TensorProto.FLOAT) -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            del model.graph.initializer[0]
            vals = helper.make_tensor("W", dtype, [len(values)], list(values))
            flat = np.asarray(indices, dtype=np.int64)
            idx = helper.make_tensor("W_indices", TensorProto.INT64, list(flat.shape), flat.ravel().tolist())
            model.graph.sparse_initializer.append(helper.make_sparse_tensor(vals, idx, list(dims)))

        return mutate

    valid = {
        "linear": sparse([1.0, 2.0, 3.0], [0, 5, 15], [4, 4]),
        "coordinates": sparse([1.0, -2.0], [[0, 1], [3, 3]], [4, 4]),
        "no-values": sparse([], [], [4, 4]),
        "dense-as-sparse": sparse([1.0] * 16, list(range(16)), [4, 4]),
    }
    for name, mutate in valid.items():
        yield from _proto_case("sparse", name, mutate, OK_OR_ERROR)
    invalid = {
        "index-out-of-range": sparse([1.0], [16], [4, 4]),
        "negative-index": sparse([1.0], [-1], [4, 4]),
        "unsorted": sparse([1.0, 2.0], [9, 3], [4, 4]),
        "repeated-index": sparse([1.0, 2.0], [3, 3], [4, 4]),
        "values-indices-differ": sparse([1.0, 2.0, 3.0], [0, 1], [4, 4]),
        "wrong-dims": sparse([1.0], [0], [5, 5]),
    }
    for name, mutate in invalid.items():
        yield from _proto_case("sparse", name, mutate, MUST_REFUSE)
