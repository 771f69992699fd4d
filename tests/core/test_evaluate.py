"""Tests for `passes.core._evaluate`: each fast path against onnxruntime, the fallback, the refusals.

Tolerance: integer and bool outputs must be bit-exact; float32 outputs must agree with
onnxruntime within rtol=1e-6, atol=1e-7 (numpy and MLAS may round transcendental functions and
reductions differently by a few ulp; the inputs are small enough for that bound to hold, while
sums over thousands of elements or Sigmoid of large negative inputs would exceed it because
onnxruntime's own rounding grows). Output dtypes and shapes must always match exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from passes.core._evaluate import _FAST_PATHS, NONDETERMINISTIC_OPS, EvaluationUnsupported, evaluate_node
from tests.core.evaluate_cases import FAST_PATH_CASES, f32, ints

FLOAT_RTOL = 1e-6
FLOAT_ATOL = 1e-7


# ---------------------------------------------------------------- reference runner


def _onnx_attribute(value: Any) -> Any:
    """A graphsurgeon-style attribute value as `helper.make_node` wants it."""
    if isinstance(value, np.ndarray):
        return numpy_helper.from_array(value)
    if isinstance(value, (np.dtype, type)):
        return helper.np_dtype_to_tensor_dtype(np.dtype(value))
    return value


def _single_node_model(
    op_type: str,
    opset: int,
    inputs: Sequence[np.ndarray | None],
    attrs: Mapping[str, Any],
    num_outputs: int,
) -> onnx.ModelProto:
    names = ["" if value is None else f"x{i}" for i, value in enumerate(inputs)]
    outputs = [f"y{i}" for i in range(num_outputs)]
    node = helper.make_node(
        op_type, names, outputs, **{k: _onnx_attribute(v) for k, v in attrs.items()}
    )
    graph_inputs = [
        helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
        )
        for name, value in zip(names, inputs, strict=True)
        if value is not None
    ]
    graph_outputs = [helper.make_empty_tensor_value_info(name) for name in outputs]
    graph = helper.make_graph([node], "single", graph_inputs, graph_outputs)
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def _run_onnxruntime(
    op_type: str,
    opset: int,
    inputs: Sequence[np.ndarray | None],
    attrs: Mapping[str, Any],
    num_outputs: int,
) -> list[np.ndarray]:
    model = _single_node_model(op_type, opset, inputs, attrs, num_outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {f"x{i}": value for i, value in enumerate(inputs) if value is not None}
    return [np.asarray(output) for output in session.run(None, feeds)]


def _assert_same_outputs(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=FLOAT_RTOL, atol=FLOAT_ATOL)
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("op_type", "opset", "inputs", "attrs", "num_outputs"), FAST_PATH_CASES)
def test_fast_path_matches_onnxruntime(
    op_type: str,
    opset: int,
    inputs: list[np.ndarray | None],
    attrs: dict[str, Any],
    num_outputs: int,
) -> None:
    actual = evaluate_node(op_type, "", inputs, attrs, opset=opset, num_outputs=num_outputs)
    expected = _run_onnxruntime(op_type, opset, inputs, attrs, num_outputs)
    _assert_same_outputs(actual, expected)


def test_every_fast_path_has_a_case() -> None:
    covered = {param.values[0] for param in FAST_PATH_CASES}
    assert set(_FAST_PATHS) - covered == set()


def test_ai_onnx_domain_is_the_default_domain() -> None:
    (result,) = evaluate_node("Shape", "ai.onnx", [f32(2, 3)], {}, opset=13, num_outputs=1)
    np.testing.assert_array_equal(result, ints(2, 3))


def test_graphsurgeon_constant_tensor_attribute() -> None:
    class FakeConstant:  # onnx-graphsurgeon imports tensor attributes as Constant objects
        values = np.array([3], dtype=np.int32)

    (result,) = evaluate_node(
        "ConstantOfShape", "", [ints(2)], {"value": FakeConstant()}, opset=9, num_outputs=1
    )
    np.testing.assert_array_equal(result, np.array([3, 3], dtype=np.int32))


# ---------------------------------------------------------------- property test

_BINARY_OPS = [
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Mod",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Min",
    "Max",
]


@st.composite
def _binary_operands(draw: st.DrawFn) -> tuple[str, np.ndarray, np.ndarray]:
    op_type = draw(st.sampled_from(_BINARY_OPS))
    dtype: np.dtype = draw(st.sampled_from([np.dtype(np.float32), np.dtype(np.int64)]))
    shapes = draw(
        hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)
    )
    elements = (
        st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
        if dtype.kind == "f"
        else st.integers(-1000, 1000)
    )
    a = draw(hnp.arrays(dtype, shapes.input_shapes[0], elements=elements))
    b = draw(hnp.arrays(dtype, shapes.input_shapes[1], elements=elements))
    if op_type in ("Div", "Mod") and dtype.kind == "i":
        b = np.where(b == 0, np.ones_like(b), b)  # integer division by zero is undefined in ONNX
    return op_type, a, b


@settings()  # example count, deadline and derandomization come from the loaded profile
@given(_binary_operands())
@example(("Div", ints(-7, 7, -1), ints(2, -2, 3).reshape(3, 1)))  # C truncation, broadcast
@example(("Mod", ints(-7, 7), ints(3, -3)))  # integer Mod takes the divisor's sign
def test_binary_elementwise_matches_onnxruntime(
    operands: tuple[str, np.ndarray, np.ndarray],
) -> None:
    op_type, a, b = operands
    attrs = {"fmod": 1} if op_type == "Mod" and a.dtype.kind == "f" else {}
    actual = evaluate_node(op_type, "", [a, b], attrs, opset=14, num_outputs=1)
    _assert_same_outputs(actual, _run_onnxruntime(op_type, 14, [a, b], attrs, 1))


# ---------------------------------------------------------------- fallback and refusals


@pytest.mark.parametrize(
    ("op_type", "inputs", "attrs"),
    [
        pytest.param(
            "HardSigmoid", [f32(3, 4) * 4], {"alpha": 0.3, "beta": 0.4}, id="HardSigmoid"
        ),
        pytest.param("Det", [f32(2, 3, 3)], {}, id="Det"),
        pytest.param("ArgMax", [f32(3, 4)], {"axis": 1, "keepdims": 0}, id="ArgMax"),
        pytest.param(
            "EyeLike", [f32(3, 4)], {"dtype": np.dtype(np.int64), "k": 1}, id="EyeLike-dtype-attr"
        ),
    ],
)
def test_reference_fallback_matches_onnxruntime(
    op_type: str, inputs: list[np.ndarray], attrs: dict[str, Any]
) -> None:
    assert op_type not in _FAST_PATHS
    actual = evaluate_node(op_type, "", inputs, attrs, opset=17, num_outputs=1)
    _assert_same_outputs(actual, _run_onnxruntime(op_type, 17, inputs, attrs, 1))


def test_cast_to_string_goes_through_reference() -> None:
    (result,) = evaluate_node(
        "Cast", "", [ints(1, -2)], {"to": TensorProto.STRING}, opset=13, num_outputs=1
    )
    assert result.dtype == object
    assert list(result) == ["1", "-2"]


@pytest.mark.parametrize("op_type", sorted(NONDETERMINISTIC_OPS))
def test_random_ops_are_refused(op_type: str) -> None:
    with pytest.raises(EvaluationUnsupported, match="random"):
        evaluate_node(op_type, "", [f32(2, 2)], {"shape": [2, 2]}, opset=17, num_outputs=1)


def test_random_normal_is_refused() -> None:
    assert "RandomNormal" in NONDETERMINISTIC_OPS
    with pytest.raises(EvaluationUnsupported, match="RandomNormal"):
        evaluate_node("RandomNormal", "", [], {"shape": [2, 2]}, opset=17, num_outputs=1)


def test_dropout_in_training_mode_is_refused() -> None:
    inputs = [f32(2, 2), np.array(0.5, dtype=np.float32), np.array(True)]
    with pytest.raises(EvaluationUnsupported, match="training"):
        evaluate_node("Dropout", "", inputs, {}, opset=13, num_outputs=1)


def test_custom_domain_is_refused() -> None:
    with pytest.raises(EvaluationUnsupported, match=r"com\.example"):
        evaluate_node("Add", "com.example", [f32(2), f32(2)], {}, opset=13, num_outputs=1)


def test_subgraph_op_is_refused() -> None:
    branch = helper.make_graph([], "branch", [], [])
    with pytest.raises(EvaluationUnsupported, match="subgraph"):
        evaluate_node(
            "If",
            "",
            [np.array(True)],
            {"then_branch": branch, "else_branch": branch},
            opset=13,
            num_outputs=1,
        )


def test_unknown_op_is_refused() -> None:
    with pytest.raises(EvaluationUnsupported, match="NoSuchOp"):
        evaluate_node("NoSuchOp", "", [f32(2)], {}, opset=13, num_outputs=1)


def test_reference_failure_is_chained() -> None:
    with pytest.raises(EvaluationUnsupported) as excinfo:
        evaluate_node("Det", "", [f32(2, 3)], {}, opset=13, num_outputs=1)
    assert excinfo.value.__cause__ is not None


_REFUSALS = [  # (op, opset, inputs, attrs, outputs, the reason the error must give)
    ("Div", 13, [ints(1, 2), ints(1, 0)], {}, 1, "division by zero"),
    ("Mod", 13, [f32(2), f32(2)], {}, 1, "requires fmod=1"),
    ("Split", 13, [f32(5)], {}, 2, "equal parts"),
    ("Gather", 13, [f32(3), ints(3)], {}, 1, "out of bounds"),
    ("Reshape", 13, [f32(2, 3), ints(4, -1)], {}, 1, "cannot reshape"),
    ("Squeeze", 13, [f32(2, 3), ints(0)], {}, 1, "cannot select an axis to squeeze"),
    ("Cast", 13, [f32(2)], {"to": TensorProto.STRING}, 1, "formatting differs"),
    ("Dropout", 10, [f32(2)], {}, 2, "mask of Dropout before opset 12"),
]


@pytest.mark.parametrize(
    ("op_type", "opset", "inputs", "attrs", "num_outputs", "reason"),
    [pytest.param(*refusal, id=f"{refusal[0]}-{refusal[5]}") for refusal in _REFUSALS],
)
def test_invalid_or_unspecified_inputs_are_refused(
    op_type: str,
    opset: int,
    inputs: list[np.ndarray],
    attrs: dict[str, Any],
    num_outputs: int,
    reason: str,
) -> None:
    with pytest.raises(EvaluationUnsupported, match=f"^{op_type}: .*{reason}"):
        evaluate_node(op_type, "", inputs, attrs, opset=opset, num_outputs=num_outputs)
