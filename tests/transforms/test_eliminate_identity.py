"""eliminate-identity: structure, numerics, refusal, property."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given
from onnx import TensorProto, helper

from passes.testing import assert_equivalent, assert_pass_sound
from passes.testing.strategies import onnx_graphs
from passes.transforms.eliminate_identity import EliminateIdentity
from tests.helpers import init, model, ops, tensor


def test_structure_identity_dropout_and_same_type_cast_go() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Dropout", ["a"], ["b"], name="drop"),
        helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Identity", ["d"], ["y"], name="to_output"),
    ]
    original = model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    result = EliminateIdentity()(original)
    assert ops(result.model) == ["Relu"]
    assert result.model.graph.node[0].output == ["y"]  # the output name survives
    assert result.stats == {"nodes_removed": 4}
    assert_equivalent(original, result.model, rtol=0, atol=0)


def test_numerics_on_sample(sample_model) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-bert", idiom="dynamo")
    assert_equivalent(original, EliminateIdentity()(original).model, rtol=0, atol=0)


def test_refusals_say_why() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["y1"], name="input_to_output"),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["y2"], name="shared_input"),
        helper.make_node("Neg", ["r"], ["y3"]),
        helper.make_node("Cast", ["x"], ["c"], to=TensorProto.DOUBLE, name="real_cast"),
        helper.make_node("Dropout", ["c", "ratio", "training"], ["y4"], name="training_dropout"),
    ]
    inits = [init("ratio", np.array(0.5, np.float32)), init("training", np.array(True))]
    original = model(
        nodes, [tensor("x", [2, 3])],
        [tensor("y1", [2, 3]), tensor("y2", [2, 3]), tensor("y3", [2, 3]), tensor("y4", [2, 3], TensorProto.DOUBLE)],
        inits,
    )
    result = EliminateIdentity()(original)
    assert not result.modified
    reasons = {r.node: r.reason for r in result.refusals}
    assert reasons == {
        "input_to_output": "output is a graph input or constant passed through",
        "shared_input": "input has other consumers",
    }
    assert ops(result.model) == ops(original)


@given(onnx_graphs())
def test_property_valid_equivalent_idempotent(original: onnx.ModelProto) -> None:
    once = assert_pass_sound(EliminateIdentity(), original, rtol=0, atol=0)
    kept = {r.node for r in once.refusals}
    for node in once.model.graph.node:
        assert node.op_type != "Identity" or node.name in kept, f"Identity {node.name} kept without a reason"


def test_graph_output_that_is_also_consumed_keeps_order() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["y"]),
        helper.make_node("Add", ["y", "w"], ["z"]),
    ]
    original = model(nodes, [tensor("x", [3])], [tensor("y", [3]), tensor("z", [3])], [init("w", np.ones(3, np.float32))])
    result = EliminateIdentity()(original)
    onnx.checker.check_model(result.model, full_check=True)
    assert ops(result.model) == ["Relu", "Add"]
    assert_equivalent(original, result.model, rtol=0, atol=0)
