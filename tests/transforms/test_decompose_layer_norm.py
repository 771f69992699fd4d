"""decompose-layer-norm: structure (Div / Reciprocal forms at opsets 17 and 18), numerics, refusal,
property (ranks, axes, epsilons, bias, stash types, dtypes, dynamic dims, opsets, optional outputs).

Tolerances: float32 rtol=atol=1e-5 (the statistics are reassociated against onnxruntime's kernel,
which computes Var = E[x^2] - E[x]^2 in one pass). float16 rtol=atol=1e-2: our Y is rounded to
float16 three times (Cast, Mul by Scale, Add of B) where the kernel rounds once, a few ulps of values
up to ~10 (ulp 2^-7 there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.core import ir
from passes.testing import EquivalenceError, assert_equivalent, assert_pass_sound, run_model
from passes.transforms.decompose_layer_norm import DecomposeLayerNorm
from tests.helpers import init, model, ops, tensor

F32_TOL = {"rtol": 1e-5, "atol": 1e-5}
F16_TOL = {"rtol": 1e-2, "atol": 1e-2}
NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _layer_norm(
    *,
    opset: int = 17,
    dims: Sequence[int | str] = ("batch", 3, 4),
    axis: int = -1,
    elem: int = TensorProto.FLOAT,
    bias: bool = True,
    outputs: Sequence[str] = ("Y",),
    seed: int = 0,
    **attrs: object,
) -> onnx.ModelProto:
    """X -> LayerNormalization(X, S, B) with S and B over the normalised dims; Mean / InvStdDev are
    graph outputs when named in `outputs`."""
    rng = np.random.default_rng(seed)
    start = axis % len(dims)
    norm_shape = [d if isinstance(d, int) else 1 for d in dims[start:]]
    initializers = [init("S", rng.standard_normal(norm_shape).astype(NP_TYPES[elem]))]
    if bias:
        initializers.append(init("B", rng.standard_normal(norm_shape).astype(NP_TYPES[elem])))
    names = {"Y": "Y", "Mean": "", "InvStdDev": ""} | {o: o for o in outputs}
    node = helper.make_node(
        "LayerNormalization", ["X", "S", "B" if bias else ""], [names["Y"], names["Mean"], names["InvStdDev"]],
        axis=axis, **attrs,
    )
    stash = int(attrs.get("stash_type", TensorProto.FLOAT))  # type: ignore[call-overload]
    reduced = [*dims[:start], *[1] * (len(dims) - start)]
    declared = [tensor(o, dims, elem) if o == "Y" else tensor(o, reduced, stash) for o in outputs]
    return model([node], [tensor("X", dims, elem)], declared, initializers, opset=opset)


def _reduce_mean_axes(m: onnx.ModelProto) -> list[tuple[str, list[int]]]:
    """Per ReduceMean: ("attr", axes) or ("input", axes)."""
    constants = {t.name: numpy_helper.to_array(t).tolist() for t in m.graph.initializer}
    found = []
    for node in m.graph.node:
        if node.op_type == "ReduceMean":
            attr = [list(a.ints) for a in node.attribute if a.name == "axes"]
            found.append(("attr", attr[0]) if attr else ("input", constants[node.input[1]]))
    return found


DIV_OPS = ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add"]
RECIPROCAL_OPS = ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul", "Add"]


@pytest.mark.parametrize(("form", "expected"), [("div", DIV_OPS), ("reciprocal", RECIPROCAL_OPS)])
@pytest.mark.parametrize(("opset", "axes_as"), [(17, "attr"), (18, "input")])
def test_structure_forms_and_reduce_axes_spelling(form: str, expected: list[str], opset: int, axes_as: str) -> None:
    original = _layer_norm(opset=opset, axis=-2)
    result = DecomposeLayerNorm(form=form)(original)  # type: ignore[arg-type]
    assert ops(result.model) == expected
    assert _reduce_mean_axes(result.model) == [(axes_as, [1, 2])] * 2
    assert result.model.opset_import[0].version == opset
    assert result.stats == {"layer_norms_decomposed": 1, "LayerNormToPrimitives": 1}
    assert_equivalent(original, result.model, **F32_TOL, input_shapes={"X": [2, 3, 4]})


def test_structure_pow_without_bias_positive_axis() -> None:
    result = DecomposeLayerNorm(powers="pow")(_layer_norm(opset=18, axis=1, bias=False))
    assert ops(result.model) == ["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    assert _reduce_mean_axes(result.model) == [("input", [1, 2])] * 2


def test_structure_float16_stash_float32_casts_around_the_statistics() -> None:
    result = DecomposeLayerNorm()(_layer_norm(elem=TensorProto.FLOAT16))
    assert ops(result.model) == ["Cast", *DIV_OPS[:7], "Cast", "Mul", "Add"]
    casts = [n.attribute[0].i for n in result.model.graph.node if n.op_type == "Cast"]
    assert casts == [TensorProto.FLOAT, TensorProto.FLOAT16]
    epsilon = [t for t in result.model.graph.initializer if t.data_type == TensorProto.FLOAT and not t.dims]
    assert [numpy_helper.to_array(t).item() for t in epsilon] == [np.float32(1e-5)]


def _bfloat16_layer_norm() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.BFLOAT16, [2, 4])
    scale = helper.make_tensor("S", TensorProto.BFLOAT16, [4], vals=[1.0] * 4)
    node = helper.make_node("LayerNormalization", ["X", "S"], ["Y"], stash_type=TensorProto.BFLOAT16)
    return model([node], [x], [tensor("Y", [2, 4], TensorProto.BFLOAT16)], [scale])


def test_structure_stash_equal_to_input_type_needs_no_cast() -> None:
    """The checker allows float32 and bfloat16 stash types (the type of Mean / InvStdDev)."""
    graph = ir.import_graph(_bfloat16_layer_norm())
    assert DecomposeLayerNorm()(graph).modified
    decomposed = ir.export_model(graph)
    assert ops(decomposed) == DIV_OPS[:-1]
    onnx.checker.check_model(decomposed, full_check=True)


def test_bfloat16_models_import() -> None:
    """graphsurgeon stores bfloat16 as the ONNX enum 16, not a numpy type: import must cope."""
    assert DecomposeLayerNorm()(_bfloat16_layer_norm()).modified


def test_structure_float32_input_with_bfloat16_stash_casts_both_ways() -> None:
    result = DecomposeLayerNorm()(_layer_norm(stash_type=TensorProto.BFLOAT16))
    assert ops(result.model) == ["Cast", *DIV_OPS[:7], "Cast", "Mul", "Add"]
    casts = [n.attribute[0].i for n in result.model.graph.node if n.op_type == "Cast"]
    assert casts == [TensorProto.BFLOAT16, TensorProto.FLOAT]
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize(("form", "expected"), [
    ("div", ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul", "Add"]),
    ("reciprocal", RECIPROCAL_OPS),
])
def test_structure_mean_and_inv_std_dev_outputs_are_produced(form: str, expected: list[str]) -> None:
    original = _layer_norm(opset=18, elem=TensorProto.FLOAT16, outputs=("Y", "Mean", "InvStdDev"), epsilon=1e-3)
    result = DecomposeLayerNorm(form=form)(original)  # type: ignore[arg-type]
    assert ops(result.model) == ["Cast", *expected[:-2], "Cast", "Mul", "Add"]
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers["Mean"] == "ReduceMean" and producers["InvStdDev"] == "Reciprocal"
    comparison = assert_equivalent(original, result.model, **F32_TOL, input_shapes={"X": [2, 3, 4]})
    # Mean and InvStdDev are float32 (the stash type) and match the kernel at float32 precision
    assert {o.name: o.dtype for o in comparison.outputs} == {"Y": "float16", "Mean": "float32", "InvStdDev": "float32"}


def test_unread_optional_outputs_are_dropped() -> None:
    original = _layer_norm()
    original.graph.node[0].output[1] = "unused_mean"
    result = DecomposeLayerNorm()(original)
    assert ops(result.model) == DIV_OPS
    assert "unused_mean" not in {o for n in result.model.graph.node for o in n.output}


def test_mean_read_only_inside_a_subgraph_is_produced() -> None:
    branch = [helper.make_graph([helper.make_node(op, ["M"], [f"o{op}"])], op, [], [tensor(f"o{op}", ["b", 1])])
              for op in ("Neg", "Identity")]
    nodes = [
        helper.make_node("LayerNormalization", ["X", "S"], ["Y", "M"]),
        helper.make_node("If", ["c"], ["Z"], then_branch=branch[0], else_branch=branch[1]),
    ]
    inputs = [tensor("X", ["b", 4]), tensor("c", [1], TensorProto.BOOL)]
    original = model(nodes, inputs, [tensor("Y", ["b", 4]), tensor("Z", ["b", 1])], [init("S", np.ones(4, np.float32))])
    result = assert_pass_sound(DecomposeLayerNorm(), original, **F32_TOL)
    assert ops(result.model) == [*DIV_OPS[:-1], "If"]
    assert result.model.graph.node[0].output == ["M"]


def test_numerics_match_the_spec_formula() -> None:
    """Independent of onnxruntime: numpy's two-pass LayerNorm over axes [1, 3), with Mean and InvStdDev."""
    original = _layer_norm(opset=18, outputs=("Y", "Mean", "InvStdDev"), axis=1, epsilon=1e-2)
    decomposed = DecomposeLayerNorm(form="reciprocal")(original).model
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    got = run_model(decomposed, {"X": x})
    scale, bias = (numpy_helper.to_array(t) for t in original.graph.initializer)
    mean = x.mean(axis=(1, 2), keepdims=True)
    inv = 1 / np.sqrt(((x - mean) ** 2).mean(axis=(1, 2), keepdims=True) + np.float32(1e-2))
    np.testing.assert_allclose(got["Mean"], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["InvStdDev"], inv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["Y"], (x - mean) * inv * scale + bias, rtol=1e-5, atol=1e-5)


def test_numerics_a_wrong_decomposition_is_caught() -> None:
    original = _layer_norm(epsilon=1e-5)
    decomposed = DecomposeLayerNorm()(original).model
    comparison = assert_equivalent(original, decomposed, **F32_TOL, input_shapes={"X": [2, 3, 4]})
    assert 0 <= comparison.max_abs_error < 1e-5
    for tensor_proto in decomposed.graph.initializer:  # epsilon 1e-5 -> 1.0
        if tensor_proto.data_type == TensorProto.FLOAT and not tensor_proto.dims:
            tensor_proto.CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32), tensor_proto.name))
    with pytest.raises(EquivalenceError):
        assert_equivalent(original, decomposed, **F32_TOL, input_shapes={"X": [2, 3, 4]})


def test_refusal_unknown_rank() -> None:
    nodes = [  # a Reshape to a runtime shape of runtime length: the rank is unknown
        helper.make_node("Reshape", ["X", "shape"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "S"], ["Y"]),
    ]
    inputs = [tensor("X", [2, 4]), tensor("shape", ["r"], TensorProto.INT64)]
    original = model(nodes, inputs, [tensor("Y", [2, 4])], [init("S", np.ones(4, np.float32))])
    result = DecomposeLayerNorm()(original)
    assert not result.modified and ops(result.model) == ["Reshape", "LayerNormalization"]
    assert [r.reason for r in result.refusals] == ["LayerNormToPrimitives: rank of X is unknown"]


def test_refusal_unknown_dtype() -> None:
    nodes = [
        helper.make_node("Opaque", ["X"], ["h"], domain="custom"),
        helper.make_node("LayerNormalization", ["h", "S"], ["Y"]),
    ]
    scale = init("S", np.ones(4, np.float32))
    graph = helper.make_graph(nodes, "g", [tensor("X", [2, 4])], [tensor("Y", [2, 4])], [scale])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    result = DecomposeLayerNorm()(original)
    assert not result.modified
    assert [r.reason for r in result.refusals] == ["LayerNormToPrimitives: dtype of X is unknown"]


def test_refusal_axis_out_of_range() -> None:
    original = _layer_norm(axis=-1)  # the checker rejects axis=3 on a rank-3 X: set it after the check
    original.graph.node[0].attribute[0].CopyFrom(helper.make_attribute("axis", 3))
    result = DecomposeLayerNorm()(original)
    assert not result.modified
    assert [r.reason for r in result.refusals] == ["LayerNormToPrimitives: axis=3 is out of range for X of rank 3"]


def test_refusal_stash_type_that_is_not_a_float() -> None:
    original = _layer_norm()  # the checker rejects this stash type: set it after the check
    original.graph.node[0].attribute.append(helper.make_attribute("stash_type", TensorProto.INT64))
    result = DecomposeLayerNorm()(original)
    assert not result.modified
    assert [r.reason for r in result.refusals] == ["LayerNormToPrimitives: stash_type=7 is not a floating-point type"]


@st.composite
def layer_norm_graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, list[int]], int, int]:
    """1-2 chained LayerNormalizations over a rank 1-4 input with dynamic dims; returns the model, the
    concrete input sizes, the element type and how many norms it holds."""
    opset = draw(st.sampled_from([17, 18, 20, 23]))
    elem = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16]))
    rank = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
    dims: list[int | str] = [f"d{i}" if draw(st.booleans()) else size for i, size in enumerate(sizes)]
    axis = draw(st.integers(-rank, rank - 1))
    # the checker allows stash types float32 and bfloat16 only, and ORT computes in float32 whatever the
    # stash type says: float32 it is (the bfloat16 spelling is covered by a structure test)
    stash = TensorProto.FLOAT
    epsilon = 10.0 ** draw(st.floats(-12, -2))
    count = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    start = axis % rank
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    current = "X"
    for index in range(count):
        scale_shape = [size if draw(st.booleans()) else 1 for size in sizes[start:]]
        scale_shape = scale_shape[draw(st.integers(0, len(scale_shape) - 1)):]  # fewer leading dims broadcast too
        names = [f"S{index}"] + ([f"B{index}"] if draw(st.booleans()) else [])
        initializers += [init(n, rng.standard_normal(scale_shape).astype(NP_TYPES[elem])) for n in names]
        node_outputs, readers = [f"Y{index}"], []
        for label in ("mean", "inv_std_dev"):
            use = draw(st.sampled_from(["unused", "output", "read"]))
            name = f"{label}{index}" if use != "unused" else ""
            node_outputs.append(name)
            if use == "read":
                readers.append(helper.make_node("Neg", [name], [f"neg_{name}"]))
                name = f"neg_{name}"
            if use != "unused":
                outputs.append(tensor(name, [*dims[:start], *[1] * (rank - start)], stash))
        attrs = {"axis": axis, "epsilon": epsilon, "stash_type": stash}
        nodes += [helper.make_node("LayerNormalization", [current, *names], node_outputs, **attrs), *readers]
        current = f"Y{index}"
    outputs.append(tensor(current, dims, elem))
    built = model(nodes, [tensor("X", dims, elem)], outputs, initializers, opset=opset)
    return built, {"X": sizes}, elem, count


@given(layer_norm_graphs())
@example((_layer_norm(dims=[1], axis=-1, epsilon=1e-12), {"X": [1]}, TensorProto.FLOAT, 1))
@example((_layer_norm(dims=["n", 2, 3, 1], axis=0, elem=TensorProto.FLOAT16), {"X": [3, 2, 3, 1]}, 10, 1))
def test_property_sound_and_fully_decomposed(case: tuple[onnx.ModelProto, dict[str, list[int]], int, int]) -> None:
    original, sizes, elem, count = case
    tolerance = F32_TOL if elem == TensorProto.FLOAT else F16_TOL
    for form, powers in (("div", "mul"), ("reciprocal", "pow")):
        decompose = DecomposeLayerNorm(form=form, powers=powers)  # type: ignore[arg-type]
        result = assert_pass_sound(decompose, original, **tolerance, input_shapes=sizes)
        assert "LayerNormalization" not in ops(result.model)
        assert result.stats["layer_norms_decomposed"] == count
        spelling = "attr" if original.opset_import[0].version < 18 else "input"
        assert {how for how, _ in _reduce_mean_axes(result.model)} == {spelling}
