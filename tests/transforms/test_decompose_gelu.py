"""decompose-gelu: structure (Erf and Tanh forms, Mul / Pow cubes), numerics, refusal, property
(ranks 0-4, dynamic dims, dtypes, opsets 20 and 23, sibling and chained Gelus).

Tolerances: float32 rtol=1e-5, atol=1e-6 (onnxruntime's kernel evaluates the same formula with its
own erf / tanh and multiplies by 1/sqrt(2) where we divide by sqrt(2)). float16 rtol=atol=1e-2: every
one of our ops rounds to float16 (constants included) where the kernel computes in float32 and
rounds once; for |x| <= ~5 that is a few ulps of values up to ~5 (ulp 2^-8 there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.testing import EquivalenceError, assert_equivalent, assert_pass_sound, run_model
from passes.transforms.decompose_gelu import DecomposeGelu
from tests.helpers import model, ops, tensor

F32_TOL = {"rtol": 1e-5, "atol": 1e-6}
F16_TOL = {"rtol": 1e-2, "atol": 1e-2}
NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _gelu(
    *, dims: Sequence[int | str] = ("batch", 8), elem: int = TensorProto.FLOAT, opset: int = 20, **attrs: object
) -> onnx.ModelProto:
    node = helper.make_node("Gelu", ["X"], ["Y"], **attrs)
    return model([node], [tensor("X", dims, elem)], [tensor("Y", dims, elem)], opset=opset)


def _constants(m: onnx.ModelProto) -> list[tuple[str, float]]:
    """(label, value) of each initializer; names are `<node>/<label>_<n>`."""
    labelled = ((t.name.split("/")[-1].rsplit("_", 1)[0], float(numpy_helper.to_array(t))) for t in m.graph.initializer)
    return sorted(labelled)


ERF_OPS = ["Div", "Erf", "Add", "Mul", "Mul"]
TANH_OPS = ["Mul", "Mul", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"]


@pytest.mark.parametrize(("attrs", "powers", "expected"), [
    ({}, "mul", ERF_OPS),
    ({"approximate": "none"}, "pow", ERF_OPS),
    ({"approximate": "tanh"}, "mul", TANH_OPS),
    ({"approximate": "tanh"}, "pow", ["Pow", *TANH_OPS[2:]]),
])
def test_structure(attrs: dict[str, str], powers: str, expected: list[str]) -> None:
    original = _gelu(**attrs)
    result = DecomposeGelu(powers=powers)(original)  # type: ignore[arg-type]
    assert ops(result.model) == expected
    assert result.stats == {"gelus_decomposed": 1, "GeluToPrimitives": 1}
    assert result.model.opset_import[0].version == 20
    assert_equivalent(original, result.model, **F32_TOL, input_shapes={"X": [3, 8]})


def test_structure_constants_are_in_the_input_dtype() -> None:
    result = DecomposeGelu()(_gelu(elem=TensorProto.FLOAT16, approximate="tanh"))
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}
    expected = [("cubic", 0.044715), ("half", 0.5), ("one", 1.0), ("sqrt_2_over_pi", math.sqrt(2 / math.pi))]
    assert _constants(result.model) == [(name, float(np.float16(value))) for name, value in expected]
    erf = DecomposeGelu()(_gelu(elem=TensorProto.FLOAT16))
    assert _constants(erf.model) == [("half", 0.5), ("one", 1.0), ("sqrt_2", float(np.float16(math.sqrt(2))))]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_numerics_match_the_formula_and_catch_a_wrong_constant(approximate: str) -> None:
    original = _gelu(approximate=approximate)
    decomposed = DecomposeGelu()(original).model
    x = np.linspace(-6, 6, 24, dtype=np.float32).reshape(3, 8)
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        expected = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    else:
        expected = 0.5 * x64 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    np.testing.assert_allclose(run_model(decomposed, {"X": x})["Y"], expected, rtol=1e-5, atol=1e-6)
    comparison = assert_equivalent(original, decomposed, **F32_TOL, feeds={"X": x})
    assert np.isfinite(comparison.max_abs_error) and comparison.max_abs_error < 1e-5
    (half,) = [t for t in decomposed.graph.initializer if "half" in t.name]
    half.CopyFrom(numpy_helper.from_array(np.array(0.49, np.float32), half.name))
    with pytest.raises(EquivalenceError):
        assert_equivalent(original, decomposed, **F32_TOL, feeds={"X": x})


def test_refusal_unknown_approximation() -> None:
    original = _gelu()  # the checker does not read the string; onnxruntime rejects it at load time
    original.graph.node[0].attribute.append(helper.make_attribute("approximate", "fast"))
    result = DecomposeGelu()(original)
    assert not result.modified and ops(result.model) == ["Gelu"]
    assert [r.reason for r in result.refusals] == ["GeluToPrimitives: approximate='fast' is neither 'none' nor 'tanh'"]


def test_refusal_unknown_dtype() -> None:
    nodes = [helper.make_node("Opaque", ["X"], ["h"], domain="custom"), helper.make_node("Gelu", ["h"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [tensor("X", [2, 4])], [tensor("Y", [2, 4])])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("custom", 1)])
    result = DecomposeGelu()(original)
    assert not result.modified
    assert [r.reason for r in result.refusals] == ["GeluToPrimitives: dtype of X is unknown"]


@st.composite
def gelu_graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, list[int]], int, int]:
    """1-3 Gelus (chained, or siblings on X) over a rank 0-4 input with dynamic dims."""
    elem = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16]))
    rank = draw(st.integers(0, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
    dims: list[int | str] = [f"d{i}" if draw(st.booleans()) else size for i, size in enumerate(sizes)]
    nodes, outputs, current = [], [], "X"
    for index in range(draw(st.integers(1, 3))):
        source = current if draw(st.booleans()) else "X"
        approximate = draw(st.sampled_from([None, "none", "tanh"]))
        attrs = {} if approximate is None else {"approximate": approximate}
        nodes.append(helper.make_node("Gelu", [source], [f"Y{index}"], **attrs))
        outputs.append(tensor(f"Y{index}", dims, elem))
        current = f"Y{index}"
    built = model(nodes, [tensor("X", dims, elem)], outputs, opset=draw(st.sampled_from([20, 23])))
    return built, {"X": sizes}, elem, len(nodes)


@given(gelu_graphs())
@example((_gelu(dims=[], approximate="tanh"), {"X": []}, TensorProto.FLOAT, 1))
@example((_gelu(dims=["n"], elem=TensorProto.FLOAT16, opset=23), {"X": [5]}, TensorProto.FLOAT16, 1))
def test_property_sound_and_fully_decomposed(case: tuple[onnx.ModelProto, dict[str, list[int]], int, int]) -> None:
    original, sizes, elem, count = case
    tolerance = F32_TOL if elem == TensorProto.FLOAT else F16_TOL
    for powers in ("mul", "pow"):
        result = assert_pass_sound(DecomposeGelu(powers=powers), original, **tolerance, input_shapes=sizes)
        assert "Gelu" not in ops(result.model)
        assert result.stats["gelus_decomposed"] == count
