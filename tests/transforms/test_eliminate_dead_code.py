"""eliminate-dead-code: structure, numerics, refusal, property."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given
from onnx import TensorProto, helper

from passes.testing import assert_equivalent, assert_pass_sound
from passes.testing.strategies import onnx_graphs
from passes.transforms.eliminate_dead_code import EliminateDeadCode
from tests.helpers import init, model, ops, tensor


def _with_dead_branch() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="live"),
        helper.make_node("Exp", ["x"], ["dead1"], name="dead1"),
        helper.make_node("Mul", ["dead1", "w_dead"], ["dead2"], name="dead2"),
        helper.make_node("Neg", ["r"], ["y"], name="out"),
    ]
    return model(
        nodes, [tensor("x", [2, 3]), tensor("unused", [1])], [tensor("y", [2, 3])], [init("w_dead", np.ones(3, np.float32))]
    )


def test_structure_dead_chain_and_its_weight_are_removed() -> None:
    result = EliminateDeadCode()(_with_dead_branch())
    assert ops(result.model) == ["Relu", "Neg"]
    assert [t.name for t in result.model.graph.initializer] == []
    assert result.stats == {"nodes_removed": 2}


def test_numerics_unchanged() -> None:
    original = _with_dead_branch()
    assert_equivalent(original, EliminateDeadCode()(original).model, rtol=0, atol=0)


def test_refusal_graph_inputs_and_subgraph_captures_are_kept() -> None:
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["captured"], ["t_out"])], "then", [], [tensor("t_out", [2, 3])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"])], "else", [], [tensor("e_out", [2, 3])]
    )
    nodes = [
        helper.make_node("Exp", ["x"], ["captured"], name="only_used_in_then"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph),
    ]
    original = model(nodes, [tensor("x", [2, 3]), tensor("cond", [], TensorProto.BOOL), tensor("unused", [1])],
                     [tensor("y", [2, 3])])
    result = EliminateDeadCode()(original)
    assert not result.modified and ops(result.model) == ["Exp", "If"]
    assert [i.name for i in result.model.graph.input] == ["x", "cond", "unused"]


@given(onnx_graphs())
def test_property_valid_equivalent_idempotent(original: onnx.ModelProto) -> None:
    once = assert_pass_sound(EliminateDeadCode(), original, rtol=0, atol=0)
    graph = once.model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        assert any(out in used for out in node.output), f"dead node {node.name} survived"
