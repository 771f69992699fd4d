"""The skeleton cache (`passes.core._skeleton`): exports, the checker and re-inference reuse a node's
serialized piece only while the node is unchanged, and a skeleton holds small constants inline and large
ones as typed inputs."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from passes.core import ir


def _model() -> onnx.ModelProto:
    f = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], name="transpose"),
        helper.make_node("Add", ["t", "small"], ["a"], name="add"),
        helper.make_node("MatMul", ["a", "large"], ["y"], name="matmul"),
    ]
    small = onnx.numpy_helper.from_array(np.ones((3, 2), np.float32), "small")
    large = onnx.numpy_helper.from_array(np.ones((2, 2048), np.float32), "large")  # 16 KiB
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, 3])],
                              [helper.make_tensor_value_info("y", f, [3, 2048])], [small, large])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def test_an_export_after_a_change_shows_the_change() -> None:
    graph = ir.import_graph(_model())
    ir.export_model(graph)  # the cache now holds every node
    _node(graph, "transpose").attrs["perm"] = [0, 1]
    _node(graph, "add").outputs[0].name = "renamed"
    _node(graph, "matmul").op = "Mul"
    exported = {n.name: n for n in ir.export_model(graph).graph.node}
    assert list(exported["transpose"].attribute[0].ints) == [0, 1]
    assert exported["add"].output[0] == "renamed" and exported["matmul"].input[0] == "renamed"
    assert exported["matmul"].op_type == "Mul"


def test_an_attribute_replaced_twice_between_exports_is_seen() -> None:
    # the cache keys attribute values by id: an id freed by the first replacement must not be reused
    # by the second and pass for the cached value
    graph = ir.import_graph(_model())
    ir.export_model(graph)
    node = _node(graph, "transpose")
    for _ in range(50):
        node.attrs["perm"] = [1, 0]
        node.attrs["perm"] = [0, 1]
        gc.collect()
        assert list(ir.export_model(graph).graph.node[0].attribute[0].ints) == [0, 1]
        node.attrs["perm"] = [1, 0]
        assert list(ir.export_model(graph).graph.node[0].attribute[0].ints) == [1, 0]


def _exported(graph: gs.Graph) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in ir.export_model(graph).graph.node}


_MUTATIONS = {
    "setitem": lambda g: _node(g, "add").inputs.__setitem__(1, _node(g, "add").inputs[0]),
    "append on the tensor side": lambda g: _node(g, "transpose").outputs[0].outputs.append(_node(g, "matmul")),
    "clear on the tensor side": lambda g: _node(g, "add").outputs[0].outputs.clear(),
    "inputs reassigned": lambda g: setattr(_node(g, "matmul"), "inputs", [_node(g, "matmul").inputs[1]]),
    "ir.set_input": lambda g: ir.set_input(_node(g, "add"), 0, _node(g, "add").inputs[1]),
    "ir.detach_node": lambda g: ir.detach_node(_node(g, "add")),
    "tensor renamed": lambda g: setattr(_node(g, "transpose").outputs[0], "name", "t2"),
    "attribute deleted": lambda g: _node(g, "transpose").attrs.pop("perm"),
    "attribute renamed": lambda g: _node(g, "transpose").attrs.__setitem__("axes", _node(g, "transpose").attrs.pop("perm")),
    "attrs reassigned": lambda g: setattr(_node(g, "transpose"), "attrs", {"perm": [0, 1]}),
    "name": lambda g: setattr(_node(g, "matmul"), "name", "renamed"),
    "domain": lambda g: setattr(_node(g, "matmul"), "domain", "com.example"),
}


@pytest.mark.parametrize("mutation", sorted(_MUTATIONS))
def test_the_fast_walk_sees_every_mutation_path(mutation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # without contract checks a walk trusts the cached pieces of nodes no hook touched: each graphsurgeon
    # or ir mutation must show in the next export exactly as in a fresh export of the same graph
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "0")
    graph = ir.import_graph(_model())
    ir.export_model(graph)  # every node's piece is cached
    _MUTATIONS[mutation](graph)
    cached = ir.export_model(graph).graph.node
    fresh = [gs.exporters.onnx_exporter.OnnxExporter.export_node(n) for n in graph.nodes]
    assert [n.SerializeToString() for n in cached] == [n.SerializeToString() for n in fresh]
    assert [n.SerializeToString() for n in cached] != [n.SerializeToString() for n in _model().graph.node]


def test_a_variable_turned_constant_in_place_reaches_the_skeleton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "0")
    graph = ir.import_graph(_model())
    ir.check_graph(graph)
    _node(graph, "transpose").outputs[0].to_constant(np.zeros((3, 2), np.float32))
    graph.nodes.remove(_node(graph, "transpose"))
    skeleton = onnx.ModelProto.FromString(ir.graph_skeleton(graph))
    assert "t" in {i.name for i in skeleton.graph.initializer}


def test_contract_checks_catch_a_change_that_bypasses_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "1")
    graph = ir.import_graph(_model())
    ir.export_model(graph)
    add = _node(graph, "add")
    list.__setitem__(add.inputs, 1, add.inputs[0])  # raw list surgery, no touch
    with pytest.raises(AssertionError, match="changed without `_skeleton.touch`"):
        ir.export_model(graph)


def test_the_checker_sees_a_node_broken_after_the_cache_is_warm() -> None:
    graph = ir.import_graph(_model())
    ir.check_graph(graph)
    _node(graph, "add").op = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError, match="NoSuchOp"):
        ir.check_graph(graph)


def test_a_skeleton_inlines_small_constants_and_types_large_ones() -> None:
    skeleton = onnx.ModelProto.FromString(ir.graph_skeleton(ir.import_graph(_model())))
    assert [t.name for t in skeleton.graph.initializer] == ["small"]
    assert [i.name for i in skeleton.graph.input] == ["x", "large"]
    assert [d.dim_value for d in skeleton.graph.input[1].type.tensor_type.shape.dim] == [2, 2048]
    onnx.checker.check_model(skeleton)


def test_value_info_follows_a_tensor_s_type_and_shape() -> None:
    graph = ir.import_graph(_model())
    tensor = _node(graph, "transpose").outputs[0]

    def exported() -> onnx.ValueInfoProto:
        return next(v for v in ir.export_model(graph).graph.value_info if v.name == tensor.name)

    assert [d.dim_value for d in exported().type.tensor_type.shape.dim] == [3, 2]
    tensor.shape[0] = 5  # in place: the cache keeps a copy, so it sees this
    assert [d.dim_value for d in exported().type.tensor_type.shape.dim] == [5, 2]
    tensor.shape = ["n", 2]
    tensor.dtype = np.float16
    info = exported()
    assert info.type.tensor_type.shape.dim[0].dim_param == "n"
    assert info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_value_info_bytes_are_graphsurgeons_own() -> None:
    """The cached encoding of plain tensor types writes what graphsurgeon's exporter writes, for every
    tensor of an optimized sample and for the odd ones (no shape, scalar, unknown and symbolic dims, a
    numpy int dim, no dtype, an ONNX enum dtype, a sequence type), twice over (cache cold, then warm)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    from passes.core._skeleton import value_info_bytes
    from passes.samples import build_sample

    graph = ir.import_graph(build_sample("tiny-llama", layers=1))
    odd = [gs.Variable("none", dtype=np.float32), gs.Variable("scalar", dtype=np.int64, shape=[]),
           gs.Variable("dims", dtype=np.float16, shape=[None, "batch", 3, 0]), gs.Variable("untyped"),
           gs.Variable("", dtype=np.float32, shape=[1]), gs.Variable("npdim", dtype=np.float32, shape=[np.int64(2)]),
           gs.Variable("bf16", dtype=onnx.TensorProto.BFLOAT16, shape=[4]),
           gs.Variable("seq", dtype=np.float32, shape=[2])]
    odd[-1].type = "sequence_type"
    for tensor in [*ir.tensor_map(graph).values(), *odd] * 2:
        if type(tensor) is gs.Constant:
            continue
        try:
            expected = OnnxExporter.export_value_info_proto(tensor, False).SerializeToString()
        except (ValueError, TypeError) as err:
            with pytest.raises(type(err)):
                value_info_bytes(tensor)
            continue
        assert value_info_bytes(tensor) == expected, tensor
