"""eliminate-common-subexpressions: structure, numerics, refusal, property."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given
from onnx import helper, numpy_helper

import passes

from passes.testing import assert_equivalent, assert_pass_sound
from passes.testing.strategies import onnx_graphs
from passes.transforms.eliminate_common_subexpressions import EliminateCommonSubexpressions
from tests.helpers import init, model, ops, tensor


def test_structure_duplicate_chains_collapse_in_one_run() -> None:
    nodes = [
        helper.make_node("Mul", ["x", "w1"], ["a1"]),
        helper.make_node("Mul", ["x", "w2"], ["a2"]),  # w2 has the same bytes as w1
        helper.make_node("Softmax", ["a1"], ["s1"], axis=-1),
        helper.make_node("Softmax", ["a2"], ["s2"], axis=-1),
        helper.make_node("Softmax", ["a2"], ["s3"], axis=0),  # different attribute: stays
        helper.make_node("Add", ["s1", "s2"], ["b"]),
        helper.make_node("Add", ["b", "s3"], ["y"]),
    ]
    weights = [init("w1", np.full(3, 2.0, np.float32)), init("w2", np.full(3, 2.0, np.float32))]
    original = model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], weights)
    result = EliminateCommonSubexpressions()(original)
    assert ops(result.model) == ["Mul", "Softmax", "Softmax", "Add", "Add"]
    assert result.stats == {"nodes_removed": 2, "constants_merged": 1}
    assert_equivalent(original, result.model, rtol=0, atol=0)


def test_structure_unloaded_and_loaded_constants_of_equal_bytes_merge() -> None:
    # `c` stays an unloaded TensorProto (a lifted Constant node), `s` is computed by folding (an array),
    # `t` is a typed-field TensorProto (no raw_data); all three are int64 [1, 2]
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("", onnx.TensorProto.INT64, [2], [1, 2])),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Reshape", ["x", "c"], ["y1"]),
        helper.make_node("Reshape", ["x", "s"], ["y2"]),
        helper.make_node("Reshape", ["x", "t"], ["y3"]),
        helper.make_node("Reshape", ["x", "r"], ["y4"]),
    ]
    raw = numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "r")
    original = model(nodes, [tensor("x", [2])], [tensor(f"y{i}", [1, 2]) for i in range(1, 5)],
                     [init("a", np.int64([0, 1])), init("b", np.int64([1, 1])),
                      helper.make_tensor("t", onnx.TensorProto.INT64, [2], [1, 2]), raw])
    result = passes.optimize(original, "fold-constants,eliminate-common-subexpressions")
    shapes = {n.input[1] for n in result.graph.node if n.op_type == "Reshape"}
    assert len(shapes) == 1, shapes
    assert_equivalent(original, result, rtol=0, atol=0)


def test_numerics_on_sample(sample_model) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-llama", idiom="torchscript")
    result = EliminateCommonSubexpressions()(original)
    assert result.modified
    assert_equivalent(original, result.model, rtol=0, atol=0)


def test_refusal_random_ops_outputs_and_signed_zero_stay_apart() -> None:
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["r1"], seed=1.0),
        helper.make_node("RandomUniformLike", ["x"], ["r2"], seed=1.0),
        helper.make_node("Relu", ["x"], ["y1"]),
        helper.make_node("Relu", ["x"], ["y2"]),
        helper.make_node("Div", ["x", "zero"], ["d1"]),
        helper.make_node("Div", ["x", "negzero"], ["d2"]),
        helper.make_node("Sum", ["r1", "r2", "d1", "d2"], ["y3"]),
    ]
    zeros = [init("zero", np.zeros(3, np.float32)), init("negzero", -np.zeros(3, np.float32))]
    original = model(nodes, [tensor("x", [2, 3])], [tensor("y1", [2, 3]), tensor("y2", [2, 3]), tensor("y3", [2, 3])], zeros)
    result = EliminateCommonSubexpressions()(original)
    assert not result.modified
    assert ops(result.model) == ops(original)


@given(onnx_graphs())
def test_property_valid_equivalent_idempotent(original: onnx.ModelProto) -> None:
    once = assert_pass_sound(EliminateCommonSubexpressions(), original, rtol=0, atol=0)
    graph_outputs = {o.name for o in once.model.graph.output}
    groups: dict[tuple[object, ...], list[onnx.NodeProto]] = {}
    for node in once.model.graph.node:
        groups.setdefault((node.op_type, tuple(node.input), str(node.attribute)), []).append(node)
    for twins in groups.values():  # twins survive only when each names a graph output of its own
        assert len(twins) == 1 or all(set(n.output) & graph_outputs for n in twins), "a duplicate survived"


def test_structure_a_later_run_keys_unloaded_weights_without_loading_them(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Keying a large weight loads it (a copy of its bytes); its key is kept for the next run while the
    constant holds the same unloaded TensorProto. A constant whose values a pass replaced is keyed afresh."""
    import onnx_graphsurgeon as gs

    from passes.core import ir

    nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"]) for i in range(1, 4)]
    big = np.arange(1000, dtype=np.float32)
    original = model(nodes, [tensor("x", [1000])], [tensor(f"y{i}", [1000]) for i in range(1, 4)],
                     [init("w1", big), init("w2", big.copy()), init("w3", big + 1)])
    graph = ir.import_graph(original)
    loads: list[str] = []  # the constants whose bytes were read (a copy of each)
    from passes.transforms import eliminate_common_subexpressions as ecs_module

    stock = ecs_module._peek
    monkeypatch.setattr(ecs_module, "_peek", lambda tensor: loads.append(tensor.name) or stock(tensor))
    ecs = EliminateCommonSubexpressions()
    first, _ = ecs.run_checked(graph)
    assert first.stats["constants_merged"] == 1 and sorted(set(loads)) == ["w1", "w2", "w3"]
    loads.clear()
    second, _ = ecs.run_checked(graph)
    assert not second.modified and loads == []
    w3 = next(t for t in ir.tensor_map(graph).values() if t.name == "w3")
    assert type(w3) is gs.Constant
    w3.values = big.copy()  # a pass rewrote it: equal to w1 now
    third, _ = ecs.run_checked(graph)
    assert third.stats["constants_merged"] == 1
