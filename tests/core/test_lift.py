"""Constant nodes lifted while importing (`ir.import_graph(lift_constants=True)`, `passes.core._lift`): the
graph starts where fold-constants' lifting would leave it, which the pass manager relies on for every
pipeline that folds constants. Held to fold-constants' own result, byte for byte."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from passes.core import ir
from passes.infra.manager import PassManager
from passes.samples import build_sample
from passes.transforms.fold_constants import FoldConstants

F = onnx.TensorProto.FLOAT


def _constant(name: str, value: np.ndarray, **kwargs: object) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_node", value=numpy_helper.from_array(value), **kwargs)


def _model() -> onnx.ModelProto:
    """Constants of every kind fold-constants lifts or leaves, read by an If whose branch has its own."""
    branch_const = _constant("b", np.full((2,), 5.0, np.float32))
    then = helper.make_graph([branch_const, helper.make_node("Add", ["x", "b"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, [2])])
    nodes = [
        _constant("c", np.arange(2, dtype=np.float32)),                # lifted
        _constant("big", np.ones((40, 40), np.float32)),               # lifted, past the skeleton's inline size
        helper.make_node("Constant", [], ["k"], value_float=2.0),      # value_float: fold leaves it
        _constant("out_const", np.ones((1,), np.float32)),            # a graph output: stays a node
        helper.make_node("Constant", [], ["custom"], domain="my.domain", value=numpy_helper.from_array(
            np.ones((1,), np.float32))),                               # not the default domain
        helper.make_node("Add", ["x", "c"], ["a"]),
        helper.make_node("Mul", ["a", "k"], ["m"]),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "s"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F, [2])],
        [helper.make_tensor_value_info("y", F, [2]), helper.make_tensor_value_info("m", F, [2]),
         helper.make_tensor_value_info("out_const", F, [1]), helper.make_tensor_value_info("custom", F, [1])],
        value_info=[helper.make_tensor_value_info("c", F, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])


def test_lifts_what_fold_constants_lifts_and_leaves_the_rest() -> None:
    model = _model()
    before = model.SerializeToString()
    graph = ir.import_graph(model, lift_constants=True)
    assert ir.lifted_count(graph) == 2
    assert [n.op for n in graph.nodes] == ["Constant", "Constant", "Constant", "Add", "Mul", "ReduceSum", "Greater", "If"]
    tensors = ir.tensor_map(graph)
    for name, shape in (("c", (2,)), ("big", (40, 40))):
        assert type(tensors[name]) is gs.Constant and not tensors[name].inputs
        np.testing.assert_array_equal(ir.constant_value(tensors[name]), numpy_helper.to_array(
            next(n for n in model.graph.node if n.output[0] == name).attribute[0].t))
        assert tuple(tensors[name].shape) == shape
    then = next(n for n in graph.nodes if n.op == "If").attrs["then_branch"]
    assert [n.op for n in then.nodes] == ["Constant", "Add"]  # subgraphs are imported as they are
    assert graph.nodes[4].inputs[0].shape == [2]  # inference ran over the lifted constants
    ir.check_graph(graph)  # the import's skeleton, lifted constants included, is a valid model
    assert model.SerializeToString() == before
    assert ir.lifted_count(ir.import_graph(model)) == 0  # the lifting does not outlive its import
    assert len(ir.import_graph(model).nodes) == len(model.graph.node)


def test_a_name_already_in_use_keeps_its_constant_node() -> None:
    """Nodes out of order (a reader before the Constant node): the reader holds a Variable of that name,
    so the node stays, and the pipeline treats the model as it does without lifting."""
    model = _model()
    nodes = list(model.graph.node)
    reader = nodes.pop(5)  # Add(x, c) ahead of c's Constant node
    del model.graph.node[:]
    model.graph.node.extend([reader, *nodes])
    graph = ir.import_graph(model, lift_constants=True)
    assert ir.lifted_count(graph) == 1  # big only
    assert "c" in [n.outputs[0].name for n in graph.nodes if n.op == "Constant"]


def _pipeline_outputs(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes, PassManager]:
    manager = PassManager()
    lifted = manager.run(model)
    monkeypatch.setattr(FoldConstants, "lifts_constant_nodes", False)
    folded = manager.run(model)
    monkeypatch.undo()
    assert lifted.report.constants_lifted_at_import > 0 and folded.report.constants_lifted_at_import == 0
    return lifted.model.SerializeToString(), folded.model.SerializeToString(), manager


@pytest.mark.parametrize("layers", [1, 3])
def test_the_default_pipeline_writes_the_same_model_as_with_fold_constants_lifting(
        layers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_sample("tiny-llama", layers=layers)
    lifted, folded, _ = _pipeline_outputs(model, monkeypatch)
    assert lifted == folded


def test_the_hand_made_model_too(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    before = model.SerializeToString()
    lifted, folded, _ = _pipeline_outputs(model, monkeypatch)
    assert lifted == folded
    # neither run wrote into the input (exporting the If's branch once gave its Constant's unnamed value an
    # empty name field, in the input model's own proto)
    assert model.SerializeToString() == before


def test_the_report_counts_the_input_as_it_was() -> None:
    model = build_sample("tiny-llama", layers=1)
    constants = sum(n.op_type == "Constant" for n in model.graph.node)
    report = PassManager().run(model).report
    assert report.nodes_before == len(model.graph.node)
    assert report.ops_before["Constant"] == constants
    assert 0 < report.constants_lifted_at_import <= constants
    first = report.passes[0]
    assert first.nodes_before == report.nodes_before - report.constants_lifted_at_import
    assert all(r.stats.get("constant_nodes_lifted", 0) == 0 for r in report.passes if r.name == "fold-constants")


def test_pipelines_without_fold_constants_keep_constant_nodes() -> None:
    model = build_sample("tiny-llama", layers=1)
    result = PassManager("eliminate-dead-code").run(model)
    assert result.report.constants_lifted_at_import == 0
    assert sum(n.op_type == "Constant" for n in result.model.graph.node) > 0


def test_weights_past_counts_initializers_and_lifted_constants_by_type_and_dims() -> None:
    model = _model()  # its weights: the lifted c (2 floats) and big (40 x 40 floats); no initializers
    graph = ir.import_graph(model, lift_constants=True)
    assert ir.weights_past(model, graph, 8 + 6400 - 1) and not ir.weights_past(model, graph, 8 + 6400)
    assert not ir.weights_past(model, ir.import_graph(model), 0)  # nothing lifted, no initializers
    model.graph.initializer.append(onnx.TensorProto(name="hollow", data_type=onnx.TensorProto.FLOAT, dims=[1000, 1000]))
    assert ir.weights_past(model, ir.import_graph(model, infer_shapes=False), 4_000_000 - 1)  # hollow: by its dims
