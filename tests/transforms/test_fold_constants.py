"""fold-constants: structure, numerics, refusal, property; Shape start/end correctness."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.testing import assert_equivalent, assert_pass_sound
from passes.testing.strategies import onnx_graphs
from passes.transforms.fold_constants import FoldConstants
from tests.helpers import init, model, ops, tensor


def test_structure_constant_chain_folds_to_one_initializer() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3))),
        helper.make_node("Transpose", ["c"], ["ct"], perm=[1, 0]),
        helper.make_node("Mul", ["ct", "two"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    original = model(nodes, [tensor("x", ["n", 3])], [tensor("y", ["n", 2])], [init("two", np.float32([2.0]))])
    result = FoldConstants()(original)
    assert ops(result.model) == ["MatMul"]
    (weight,) = [t for t in result.model.graph.initializer if t.name == "w"]
    np.testing.assert_array_equal(numpy_helper.to_array(weight), np.arange(6, dtype=np.float32).reshape(2, 3).T * 2)
    assert result.stats == {"nodes_folded": 2, "shapes_folded": 0, "constant_nodes_lifted": 1}
    assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes={"x": [4, 3]})


def test_structure_constant_nodes_become_their_own_tensor_protos_renamed_and_the_input_stays() -> None:
    # a Constant node's value (its TensorProto named "" or otherwise, bfloat16 which numpy lacks) becomes the
    # initializer as it is, renamed to the node's output; the input model's protos are not renamed in place
    bf16 = helper.make_tensor("", TensorProto.BFLOAT16, [2], [1.5, -2.0])
    nodes = [
        helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.float32([1, 2]), "stored-name")),
        helper.make_node("Constant", [], ["b"], value=bf16),
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "a"], ["s"]),
        helper.make_node("Mul", ["s", "bf"], ["y"]),
    ]
    original = model(nodes, [tensor("x", [2])], [tensor("y", [2])])
    before = original.SerializeToString()
    pipeline = FoldConstants(fold_shapes=False)  # Cast(b) folds too: then b is gone
    lifted = pipeline(original).model
    assert original.SerializeToString() == before
    assert ops(lifted) == ["Add", "Mul"]
    inits = {t.name: t for t in lifted.graph.initializer}
    assert set(inits) == {"a", "bf"}
    np.testing.assert_array_equal(numpy_helper.to_array(inits["a"]), np.float32([1, 2]))
    np.testing.assert_array_equal(numpy_helper.to_array(inits["bf"]), np.float32([1.5, -2.0]))
    assert_equivalent(original, lifted, rtol=0, atol=0)
    # kept unfolded, the bfloat16 constant stays bfloat16
    kept = model(nodes[1:2] + [helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT, name="dyn")],
                 [], [tensor("y", [2])])
    graph = gs.import_onnx(kept)
    from passes.transforms.fold_constants import _lift_constant_node

    assert _lift_constant_node(graph.nodes[0], set())
    exported = gs.export_onnx(graph, do_type_check=False)
    (b,) = exported.graph.initializer
    assert (b.name, b.data_type) == ("b", TensorProto.BFLOAT16) and kept.graph.node[0].attribute[0].t.name == ""


# Shape(x){start, end} on x: [batch, 7, 5, seq]; (start, end) -> the dims folded, or None if dynamic.
SHAPE_CASES = [
    (1, 3, [7, 5]),
    (-3, -1, [7, 5]),
    (1, -1, [7, 5]),
    (2, 100, None),  # reaches `seq`
    (-100, 1, None),  # clamps to 0: `batch`
    (1, 2, [7]),
    (3, 1, []),  # empty range is a valid, empty shape
    (-2, -2, []),
]


@pytest.mark.parametrize(("start", "end", "expected"), SHAPE_CASES)
def test_shape_with_start_end_folds_only_static_dims(start: int, end: int, expected: list[int] | None) -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=start, end=end),
        helper.make_node("Cast", ["s"], ["y"], to=TensorProto.INT64),
    ]
    original = model(nodes, [tensor("x", ["batch", 7, 5, "seq"])], [tensor("y", [None], TensorProto.INT64)], opset=18)
    result = FoldConstants()(original)
    if expected is None:
        assert not result.modified
        return
    assert ops(result.model) == ["Constant"]  # the graph output is produced by a Constant node
    value = numpy_helper.to_array(result.model.graph.node[0].attribute[0].t)
    assert value.tolist() == expected and value.dtype == np.int64
    assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes={"x": [2, 7, 5, 3]})


def test_graphsurgeon_folder_is_wrong_where_we_are_right() -> None:
    """The reason this pass exists: gs ignores Shape's start/end on static inputs."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1, end=3), helper.make_node("Cast", ["s"], ["y"], to=7)]
    original = model(nodes, [tensor("x", [2, 7, 5, 3])], [tensor("y", [2], TensorProto.INT64)], opset=18)
    ours = FoldConstants()(original).model
    assert numpy_helper.to_array(ours.graph.node[0].attribute[0].t).tolist() == [7, 5]
    theirs = gs.import_onnx(original).fold_constants().cleanup()
    folded = [t for t in theirs.tensors().values() if isinstance(t, gs.Constant) and t.values.ndim == 1]
    assert any(t.values.tolist() == [2, 7, 5, 3] for t in folded), "graphsurgeon fixed its Shape folding"


def test_refusal_size_cap_names_the_sizes() -> None:
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.float32([1.0]))),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    original = model(nodes, [tensor("x", [512, 1024])], [tensor("y", [512, 1024])], [init("shape", np.int64([512, 1024]))])
    result = FoldConstants()(original)
    assert not result.modified and ops(result.model) == ["ConstantOfShape", "Add"]
    assert [r.reason for r in result.refusals] == [
        "folding would grow 16 B of constants into 2097152 B (max_bytes=1048576)"
    ]
    assert FoldConstants(max_bytes=4 * 2**20)(original).modified


def test_refusal_random_ops_are_not_folded() -> None:
    nodes = [helper.make_node("RandomNormal", [], ["r"], shape=[3]), helper.make_node("Add", ["x", "r"], ["y"])]
    original = model(nodes, [tensor("x", [3])], [tensor("y", [3])])
    result = FoldConstants()(original)
    assert not result.modified


def test_numerics_sample_without_shapes(sample_model) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-llama", idiom="torchscript")
    result = FoldConstants()(original)
    assert result.stats["constant_nodes_lifted"] > 0 and result.stats["shapes_folded"] > 0
    for shape in ([1, 5], [2, 9]):
        assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes={"input_ids": shape})


@given(onnx_graphs())
def test_property_valid_equivalent_idempotent(original: onnx.ModelProto) -> None:
    once = assert_pass_sound(FoldConstants(), original, rtol=1e-5, atol=1e-6)
    constants = {t.name for t in once.model.graph.initializer}
    refused = {r.node for r in once.refusals}
    for node in once.model.graph.node:
        foldable = node.op_type != "Constant" and node.input and all(i in constants or not i for i in node.input)
        assert not foldable or node.name in refused, f"{node.op_type} {node.name} has constant inputs only"


@given(st.integers(-6, 6), st.integers(-6, 6), st.lists(st.one_of(st.integers(1, 4), st.just("d")), min_size=0, max_size=4))
@example(start=0, end=0, dims=[])
def test_property_shape_slice_matches_onnxruntime(start: int, end: int, dims: list[int | str]) -> None:
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=start, end=end), helper.make_node("Cast", ["s"], ["y"], to=7)]
    original = model(nodes, [tensor("x", dims)], [tensor("y", [None], TensorProto.INT64)], opset=18)
    folded = FoldConstants()(original).model
    concrete = [d if isinstance(d, int) else 3 for d in dims]
    assert_equivalent(original, folded, rtol=0, atol=0, input_shapes={"x": concrete})


def test_structure_a_later_sweep_folds_what_inference_made_static_and_keeps_earlier_refusals() -> None:
    """Abs is folded but not propagated by ONNX inference, so the Reshape's output dims are unknown until
    fold-constants re-infers: the Shape and the Gather of it fold in the second sweep, which looks only at
    the shape queries (and what reads what folds); the DequantizeLinear refused in the first sweep stays
    refused in the result."""
    nodes = [
        helper.make_node("Abs", ["negative_dims"], ["dims"]),
        helper.make_node("Reshape", ["x", "dims"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["rows"], axis=0),
        helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["r", "rows_f"], ["scaled"]),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
        helper.make_node("MatMul", ["scaled", "w"], ["y"]),
    ]
    original = model(nodes, [tensor("x", [2, 6])], [tensor("y", [3, 2])], [
        init("negative_dims", np.int64([-3, -4])), init("zero", np.int64(0)),
        init("q", np.ones((4, 2), np.int8)), init("scale", np.float32(0.5))])
    result = FoldConstants()(original)
    assert ops(result.model) == ["Reshape", "Mul", "DequantizeLinear", "MatMul"]
    assert result.stats == {"nodes_folded": 3, "shapes_folded": 1, "constant_nodes_lifted": 0}  # Abs, Gather, Cast; Shape
    assert [r.reason for r in result.refusals] == [
        "DequantizeLinear keeps its weight quantized (folding would store it as float again)"]
    assert_equivalent(original, result.model, rtol=0, atol=0)
    assert not FoldConstants()(result.model).modified
