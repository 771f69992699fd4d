"""The incremental checker (`passes.core._check`): after the first check, each check walks the names and
checks only the nodes whose piece changed, and still rejects what the ONNX checker rejects. Contract mode
(which backs every incremental check with the whole-model one) is off here, so the incremental path alone
has to catch each fault."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from passes.core import _check, ir


def _model(opset: int = 17) -> onnx.ModelProto:
    f = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], name="transpose"),
        helper.make_node("Add", ["t", "small"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    small = onnx.numpy_helper.from_array(np.ones((3, 2), np.float32), "small")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, 3])],
                              [helper.make_tensor_value_info("y", f, [3, 2])], [small])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def _reorder(graph: gs.Graph) -> None:
    graph.nodes = list(reversed(graph.nodes))


def _duplicate_output(graph: gs.Graph) -> None:
    relu = _node(graph, "relu")
    graph.nodes.append(gs.Node("Neg", name="neg", inputs=[relu.inputs[0]], outputs=[relu.outputs[0]]))


def _bad_attribute(graph: gs.Graph) -> None:
    _node(graph, "transpose").attrs["perm"] = "not a list of ints"


def _unknown_op(graph: gs.Graph) -> None:
    _node(graph, "add").op = "NoSuchOp"


def _too_many_inputs(graph: gs.Graph) -> None:
    relu = _node(graph, "relu")
    ir.set_inputs(relu, [relu.inputs[0], relu.inputs[0]])


def _dangling_output(graph: gs.Graph) -> None:
    graph.outputs = [gs.Variable("nowhere", dtype=np.float32, shape=[1])]


def _untyped_output(graph: gs.Graph) -> None:
    graph.outputs[0].dtype = None


def _second_tensor_named_like_a_constant(graph: gs.Graph) -> None:
    add = _node(graph, "add")
    ir.set_input(add, 1, gs.Variable("small", dtype=np.float32, shape=[3, 2]))


FAULTS: dict[str, Callable[[gs.Graph], None]] = {
    "not topological": _reorder, "not single assignment": _duplicate_output, "attribute type": _bad_attribute,
    "unknown op": _unknown_op, "input count": _too_many_inputs, "dangling graph output": _dangling_output,
    "untyped graph output": _untyped_output, "two tensors, one name": _second_tensor_named_like_a_constant,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_is_caught_after_the_first_check(fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "0")
    graph = ir.import_graph(_model())
    ir.check_graph(graph)  # the first check: from now on only changes are checked
    assert graph.__dict__[_check._CHECKED] is not None
    ir.check_graph(graph)  # nothing changed: passes
    FAULTS[fault](graph)
    with pytest.raises(onnx.checker.ValidationError):
        ir.check_graph(graph)
    # and the whole-model check agrees
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(ir.graph_skeleton(graph))


def test_a_valid_change_passes_and_an_invalid_input_is_checked_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "0")
    graph = ir.import_graph(_model())
    ir.check_graph(graph)
    _node(graph, "relu").op = "Sigmoid"
    ir.check_graph(graph)
    # an input the ONNX checker rejects is not taken as checked: the first check checks the whole graph
    broken = _model()
    broken.graph.node[0].op_type = "NoSuchOp"
    graph = ir.import_graph(broken)
    _node(graph, "relu").op = "Sigmoid"
    with pytest.raises(onnx.checker.ValidationError, match="NoSuchOp"):
        ir.check_graph(graph)


def test_an_opset_change_rechecks_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celu is an op since opset 12: valid at 17, unknown at 11; the unchanged node is checked again
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "0")
    made = _model()
    made.graph.node[2].op_type = "Celu"
    graph = ir.import_graph(made)
    ir.check_graph(graph)
    ir.set_opset_version(graph, 11)
    with pytest.raises(onnx.checker.ValidationError):
        ir.check_graph(graph)
