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

FLOAT_RTOL = 1e-6
FLOAT_ATOL = 1e-7
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min

_rng = np.random.default_rng(20240607)


def _f32(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def _i64(*shape: int, low: int = -10, high: int = 10) -> np.ndarray:
    return _rng.integers(low, high, shape, dtype=np.int64)


def _bools(*shape: int) -> np.ndarray:
    return _rng.integers(0, 2, shape).astype(np.bool_)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


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


def _case(
    op: str,
    opset: int,
    inputs: list[Any],
    attrs: Mapping[str, Any] | None = None,
    *,
    outputs: int = 1,
    id: str,
) -> Any:
    return pytest.param(op, opset, inputs, dict(attrs or {}), outputs, id=f"{op}-{opset}-{id}")


# ---------------------------------------------------------------- fast-path cases

_CAST_SOURCE = np.array([-2.7, -1.5, -0.5, -0.0, 0.0, 0.5, 1.5, 2.7, 300.25], dtype=np.float32)

_SHAPE_CASES = [
    _case("Identity", 13, [_f32(2, 3)], id="float"),
    _case("Shape", 13, [_f32(2, 3, 4)], id="plain"),
    _case("Shape", 15, [_f32(2, 3, 4)], {"start": 1}, id="start"),
    _case("Shape", 15, [_f32(2, 3, 4)], {"start": -2}, id="start-negative"),
    _case("Shape", 15, [_f32(2, 3, 4)], {"end": -1}, id="end-negative"),
    _case("Shape", 15, [_f32(2, 3, 4)], {"start": -100, "end": 100}, id="out-of-range"),
    _case("Shape", 15, [_f32(2, 3, 4)], {"start": 5}, id="start-past-end"),
    _case("Shape", 15, [_f32(2, 3, 4)], {"start": 2, "end": 1}, id="start-after-end"),
    _case("Size", 13, [_f32(2, 3, 4)], id="3d"),
    _case("Size", 13, [np.array(1.5, dtype=np.float32)], id="scalar"),
    _case("Cast", 13, [_CAST_SOURCE], {"to": np.dtype(np.int64)}, id="float-to-int64"),
    _case("Cast", 13, [_CAST_SOURCE], {"to": TensorProto.INT32}, id="float-to-int32-enum"),
    _case("Cast", 13, [_CAST_SOURCE], {"to": np.bool_}, id="float-to-bool"),
    _case("Cast", 13, [_CAST_SOURCE], {"to": np.float16}, id="float-to-half"),
    _case("Cast", 19, [_i64(5, low=-300, high=300)], {"to": TensorProto.INT8}, id="int64-to-int8"),
    _case("Cast", 13, [_i64(5)], {"to": np.float32}, id="int64-to-float"),
    _case("Cast", 13, [_bools(5)], {"to": np.float32}, id="bool-to-float"),
    _case("Gather", 13, [_f32(5, 3), _ints(-1, 0, -5, 2)], id="axis0-negative"),
    _case(
        "Gather",
        13,
        [_f32(2, 4, 3), _ints(-2, 1).reshape(2, 1)],
        {"axis": 1},
        id="axis1-2d-indices",
    ),
    _case(
        "Gather", 13, [_i64(2, 3, 4), np.array(-1, dtype=np.int64)], {"axis": -1}, id="scalar-index"
    ),
    _case("Gather", 11, [_ints(4, 5, 6), np.array([0, -1], dtype=np.int32)], id="int32-indices"),
    _case("Unsqueeze", 11, [_f32(2, 3)], {"axes": [0, -1]}, id="attr-negative"),
    _case("Unsqueeze", 13, [_f32(2, 3), _ints(-1, 1)], id="input-negative"),
    _case("Unsqueeze", 13, [np.array(3, dtype=np.int64), _ints(0)], id="scalar"),
    _case("Squeeze", 11, [_f32(1, 3, 1)], {"axes": [-1]}, id="attr"),
    _case("Squeeze", 13, [_f32(1, 3, 1, 2)], id="no-axes"),
    _case("Squeeze", 13, [_f32(1, 3, 1), _ints(0, -1)], id="input-negative"),
    _case("Concat", 13, [_f32(2, 3), _f32(1, 3)], {"axis": 0}, id="axis0"),
    _case(
        "Concat", 13, [_i64(2, 1), _i64(2, 2), _i64(2, 0)], {"axis": -1}, id="int64-negative-axis"
    ),
    _case("Reshape", 13, [_f32(2, 3, 4), _ints(0, -1)], id="zero-and-minus-one"),
    _case("Reshape", 13, [_f32(2, 3, 4), _ints(-1)], id="flatten"),
    _case("Reshape", 13, [_f32(2, 3, 4), _ints(2, 0, 2, -1)], id="copy-middle"),
    _case("Reshape", 14, [_f32(0, 3), _ints(0, 3)], {"allowzero": 1}, id="allowzero"),
    _case("Reshape", 14, [_f32(2, 3), _ints(0, 3)], {"allowzero": 0}, id="zero-copies"),
    _case("Transpose", 13, [_f32(2, 3, 4)], id="default-perm"),
    _case("Transpose", 13, [_i64(2, 3, 4)], {"perm": [1, 0, 2]}, id="perm"),
    _case("Flatten", 13, [_f32(2, 3, 4)], id="default"),
    _case("Flatten", 13, [_f32(2, 3, 4)], {"axis": 0}, id="axis0"),
    _case("Flatten", 13, [_f32(2, 3, 4)], {"axis": -1}, id="axis-negative"),
    _case("Flatten", 13, [_f32(2, 3, 4)], {"axis": 3}, id="axis-rank"),
]

_SLICE_CASES = [
    _case("Slice", 13, [_f32(5, 6), _ints(1), _ints(INT64_MAX), _ints(1)], id="int64-max-end"),
    _case(
        "Slice",
        13,
        [_f32(5, 6), _ints(-1), _ints(-INT64_MAX), _ints(0), _ints(-1)],
        id="reverse-all",
    ),
    # onnxruntime reads an INT32_MAX/INT64_MAX end as "to the end" even when stepping backwards.
    _case(
        "Slice",
        13,
        [_f32(5, 6), _ints(-10, 3), _ints(INT64_MAX, INT64_MAX), _ints(0, 1), _ints(-1, -2)],
        id="negative-step-int64-max-end",
    ),
    _case(
        "Slice",
        13,
        [_f32(5, 6), _ints(3), _ints(np.iinfo(np.int32).max), _ints(0), _ints(-1)],
        id="negative-step-int32-max-end",
    ),
    _case(
        "Slice",
        13,
        [_f32(5, 6), _ints(INT64_MAX), _ints(INT64_MIN), _ints(-1), _ints(-2)],
        id="reverse-step2",
    ),
    _case("Slice", 13, [_f32(5, 6), _ints(-100, 1), _ints(100, -1)], id="clamped-no-axes"),
    _case(
        "Slice",
        13,
        [_f32(5, 6), _ints(4), _ints(1), _ints(0), _ints(-1)],
        id="negative-step-partial",
    ),
    _case(
        "Slice", 13, [_f32(5, 6), _ints(1), _ints(4), _ints(0), _ints(-1)], id="negative-step-empty"
    ),
    _case(
        "Slice",
        13,
        [_i64(4, 5, 6), _ints(0, 1), _ints(6, 5), _ints(-1, 1), _ints(2, 3)],
        id="steps",
    ),
    _case("Slice", 13, [_f32(5, 6), _ints(-3), _ints(-1), None, _ints(1)], id="omitted-axes"),
    _case(
        "Slice",
        9,
        [_f32(5, 6)],
        {"starts": [1, -4], "ends": [INT64_MAX, -1], "axes": [0, 1]},
        id="attrs",
    ),
]

_ELEMENTWISE_CASES = [
    _case("Add", 14, [_f32(2, 3), _f32(3)], id="float-broadcast"),
    _case("Add", 14, [_i64(2, 1), _i64(1, 4)], id="int64"),
    _case("Sub", 14, [_f32(2, 3), _f32(2, 3)], id="float"),
    _case("Mul", 14, [_i64(3, 1), _i64(4)], id="int64"),
    _case("Mul", 14, [_f32(3), np.array(2.5, dtype=np.float32)], id="float-scalar"),
    _case(
        "Div", 14, [_ints(-7, 7, -7, 7, -1, 0, 9), _ints(2, -2, -2, 2, 3, 5, 3)], id="int64-signs"
    ),
    _case(
        "Div",
        14,
        [np.array([-7, 5, -9], dtype=np.int32), np.array([2, -3, 4], dtype=np.int32)],
        id="int32",
    ),
    _case("Div", 14, [_f32(2, 3), _f32(3)], id="float"),
    _case("Mod", 13, [_ints(-7, 7, -7, 7, 0), _ints(3, -3, -3, 3, 2)], id="int64-python-sign"),
    _case(
        "Mod", 13, [_ints(-7, 7, -7, 7, 0), _ints(3, -3, -3, 3, 2)], {"fmod": 1}, id="int64-fmod"
    ),
    _case("Mod", 13, [_f32(6) * 5, np.abs(_f32(6)) + 0.5], {"fmod": 1}, id="float-fmod"),
    _case("Pow", 15, [np.abs(_f32(4)) + 0.1, _f32(4)], id="float"),
    _case("Pow", 15, [_f32(4), _ints(0, 1, 2, 3)], id="float-int-exponent"),
    _case("Pow", 15, [_i64(5), _ints(0, 1, 2, 3, 4)], id="int64"),
    _case(
        "Pow",
        15,
        [np.array([2, 3, 9], dtype=np.int32), np.array([0.5, 2.0, 0.5], dtype=np.float32)],
        id="int-float",
    ),
    _case("Neg", 13, [_i64(5)], id="int64"),
    _case("Abs", 13, [_f32(5)], id="float"),
    _case("Sqrt", 13, [np.abs(_f32(5))], id="float"),
    _case("Reciprocal", 13, [_f32(5)], id="float"),
    _case("Exp", 13, [_f32(5)], id="float"),
    _case("Log", 13, [np.abs(_f32(5)) + 0.1], id="float"),
    _case("Erf", 13, [_f32(20) * 2], id="float"),
    _case("Tanh", 13, [_f32(20) * 3], id="float"),
    _case("Sigmoid", 13, [_f32(20) * 5], id="float"),
    _case("Floor", 13, [_f32(6) * 3], id="float"),
    _case("Ceil", 13, [_f32(6) * 3], id="float"),
    _case("Sign", 13, [np.array([-2.5, 0.0, 3.0], dtype=np.float32)], id="float"),
    _case("Sign", 13, [_ints(-3, 0, 4)], id="int64"),
    _case("Relu", 14, [_f32(2, 3)], id="float"),
    _case("Relu", 14, [np.array([-3, 0, 5], dtype=np.int32)], id="int32"),
    _case("Equal", 13, [_i64(3, 4, low=0, high=3), _i64(4, low=0, high=3)], id="int64"),
    _case("Less", 13, [_f32(3, 4), _f32(4)], id="float"),
    _case("Greater", 13, [_i64(3, 1), _i64(1, 4)], id="int64"),
    _case("LessOrEqual", 16, [_i64(5, low=0, high=3), _i64(5, low=0, high=3)], id="int64"),
    _case("GreaterOrEqual", 16, [_f32(5), _f32(1)], id="float"),
    _case("Not", 1, [_bools(2, 3)], id="bool"),
    _case("And", 7, [_bools(2, 3), _bools(3)], id="bool"),
    _case("Or", 7, [_bools(2, 3), _bools(2, 1)], id="bool"),
    _case("Xor", 7, [_bools(4), _bools(4)], id="bool"),
    _case("Where", 16, [_bools(2, 3), _f32(3), _f32(2, 1)], id="float"),
    _case("Where", 16, [_bools(3), _i64(3), np.array(0, dtype=np.int64)], id="int64"),
    _case("Min", 13, [_f32(2, 3), _f32(3), _f32(1)], id="float-variadic"),
    _case("Max", 13, [_i64(2, 3), _i64(2, 1)], id="int64"),
    _case("Max", 13, [_f32(4)], id="single"),
    _case("Clip", 6, [_f32(6) * 3], {"min": -1.0, "max": 1.5}, id="attrs"),
    _case("Clip", 6, [np.array([-np.inf, 0.0, np.inf], dtype=np.float32)], id="attr-defaults"),
    _case("Clip", 13, [_f32(6) * 3, np.array(-0.5, dtype=np.float32)], id="min-only"),
    _case("Clip", 13, [_f32(6) * 3, None, np.array(0.5, dtype=np.float32)], id="max-only"),
    _case(
        "Clip", 13, [_i64(6), np.array(-2, dtype=np.int64), np.array(3, dtype=np.int64)], id="int64"
    ),
]

_REDUCE_CASES = [
    _case("ReduceSum", 11, [_f32(2, 3, 4)], {"axes": [1], "keepdims": 0}, id="attr"),
    _case("ReduceSum", 13, [_i64(2, 3, 4), _ints(-1, 0)], id="input-negative"),
    _case("ReduceSum", 13, [_f32(2, 3)], id="no-axes-reduces-all"),
    _case("ReduceSum", 13, [_f32(2, 3), _ints()], id="empty-axes-reduces-all"),
    _case(
        "ReduceSum", 13, [_f32(2, 3), _ints()], {"noop_with_empty_axes": 1}, id="empty-axes-noop"
    ),
    _case(
        "ReduceSum",
        13,
        [np.array([1, 2], dtype=np.int32), _ints(0)],
        {"keepdims": 0},
        id="int32-stays",
    ),
    _case("ReduceMean", 13, [_f32(2, 3, 4)], {"axes": [0, 2]}, id="attr"),
    _case("ReduceMean", 18, [_f32(2, 3, 4), _ints(-1)], {"keepdims": 0}, id="input"),
    _case("ReduceMean", 18, [_i64(2, 3)], {"noop_with_empty_axes": 1}, id="noop"),
    _case("ReduceMax", 13, [_i64(2, 3, 4)], {"axes": [-1], "keepdims": 0}, id="attr"),
    _case("ReduceMax", 18, [_f32(2, 3), _ints(1)], id="input"),
    _case("ReduceMin", 13, [_f32(2, 3, 4)], id="all"),
    _case("ReduceMin", 18, [_i64(2, 3, 4), _ints()], id="empty-axes"),
    _case("ReduceProd", 13, [_i64(2, 3, low=-3, high=4)], {"axes": [0]}, id="attr"),
    _case("ReduceProd", 18, [_f32(2, 3), _ints(1)], {"keepdims": 0}, id="input"),
    _case("CumSum", 14, [_f32(3, 4), np.array(1, dtype=np.int64)], id="plain"),
    _case("CumSum", 14, [_i64(3, 4), _ints(-2)], {"exclusive": 1}, id="exclusive"),
    _case("CumSum", 14, [_f32(3, 4), np.array(1, dtype=np.int32)], {"reverse": 1}, id="reverse"),
    _case(
        "CumSum",
        14,
        [_i64(5), np.array(0, dtype=np.int64)],
        {"exclusive": 1, "reverse": 1},
        id="both",
    ),
    _case("Softmax", 11, [_f32(2, 3, 4)], id="coerce-default-axis"),
    _case("Softmax", 11, [_f32(2, 3, 4)], {"axis": 2}, id="coerce-last"),
    _case("Softmax", 11, [_f32(2, 3, 4)], {"axis": 0}, id="coerce-axis0"),
    _case("Softmax", 13, [_f32(2, 3, 4)], id="default-axis"),
    _case("Softmax", 13, [_f32(2, 3, 4)], {"axis": 1}, id="axis1"),
]

_GENERATOR_CASES = [
    _case(
        "Range",
        11,
        [np.array(1, dtype=np.int64), np.array(10, dtype=np.int64), np.array(3, dtype=np.int64)],
        id="int64",
    ),
    _case(
        "Range",
        11,
        [np.array(5, dtype=np.int32), np.array(-4, dtype=np.int32), np.array(-2, dtype=np.int32)],
        id="int32-down",
    ),
    _case(
        "Range",
        11,
        [np.array(3, dtype=np.int64), np.array(1, dtype=np.int64), np.array(1, dtype=np.int64)],
        id="empty",
    ),
    _case(
        "Range",
        11,
        [
            np.array(0.1, dtype=np.float32),
            np.array(30.0, dtype=np.float32),
            np.array(0.1, dtype=np.float32),
        ],
        id="float-accumulating",
    ),
    _case(
        "Range",
        11,
        [
            np.array(1.0, dtype=np.float32),
            np.array(-2.0, dtype=np.float32),
            np.array(-0.7, dtype=np.float32),
        ],
        id="float-down",
    ),
    _case("ConstantOfShape", 9, [_ints(2, 3)], id="default-value"),
    _case(
        "ConstantOfShape",
        9,
        [_ints(2, 0)],
        {"value": np.array([7], dtype=np.int64)},
        id="int64-empty",
    ),
    _case(
        "ConstantOfShape", 9, [_ints()], {"value": np.array([1.5], dtype=np.float32)}, id="scalar"
    ),
    _case("Expand", 13, [_f32(3, 1), _ints(2, 1, 4)], id="bidirectional"),
    _case("Expand", 13, [_i64(2, 3), _ints(1)], id="smaller-shape"),
    _case("Tile", 13, [_i64(2, 3), _ints(2, 1)], id="int64"),
    _case("Tile", 13, [_f32(2, 1, 2), _ints(1, 3, 2)], id="float"),
    _case("Constant", 13, [], {"value": _f32(2, 2)}, id="tensor"),
    _case("Constant", 13, [], {"value_float": 2.5}, id="value-float"),
    _case("Constant", 13, [], {"value_floats": [1.0, 2.5]}, id="value-floats"),
    _case("Constant", 13, [], {"value_int": 7}, id="value-int"),
    _case("Constant", 13, [], {"value_ints": [1, -2, 3]}, id="value-ints"),
    _case("Constant", 13, [], {"value_strings": ["a", "bc"]}, id="value-strings"),
    _case("Trilu", 14, [_f32(3, 4)], id="upper"),
    _case(
        "Trilu", 14, [_i64(2, 3, 4), np.array(-1, dtype=np.int64)], {"upper": 0}, id="lower-batched"
    ),
    _case("Trilu", 14, [_f32(4, 3), np.array(1, dtype=np.int64)], id="upper-k1"),
    _case("NonZero", 13, [_i64(3, 4, low=-1, high=2)], id="2d"),
    _case("NonZero", 13, [_bools(6)], id="bool"),
    _case("NonZero", 13, [np.array(2.0, dtype=np.float32)], id="scalar"),
    _case("Dropout", 13, [_f32(2, 3)], outputs=2, id="inference-mask"),
    _case("Dropout", 7, [_f32(2, 3)], {"ratio": 0.3}, id="opset7"),
]

_SPLIT_CASES = [
    _case("Split", 11, [_f32(2, 3)], {"axis": 1, "split": [1, 2]}, outputs=2, id="attr"),
    _case("Split", 11, [_f32(4, 3)], outputs=2, id="equal-attr-era"),
    _case("Split", 13, [_i64(2, 5), _ints(2, 3)], {"axis": -1}, outputs=2, id="input"),
    _case("Split", 13, [_f32(6, 2)], outputs=3, id="equal"),
    _case("Split", 18, [_f32(7, 2)], {"num_outputs": 3}, outputs=3, id="num-outputs-uneven"),
]

_LINALG_CASES = [
    _case("MatMul", 13, [_f32(3, 4), _f32(4, 5)], id="2d"),
    _case("MatMul", 13, [_f32(2, 1, 3, 4), _f32(3, 4, 2)], id="batched-broadcast"),
    _case("MatMul", 13, [_f32(4), _f32(4, 2)], id="vector-matrix"),
    _case("MatMul", 13, [_i64(2, 3), _i64(3, 2)], id="int64"),
    _case("Gemm", 13, [_f32(3, 4), _f32(4, 5), _f32(5)], id="bias"),
    _case(
        "Gemm",
        13,
        [_f32(4, 3), _f32(5, 4), _f32(3, 1)],
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
        id="trans",
    ),
    _case("Gemm", 13, [_f32(3, 4), _f32(4, 5)], {"alpha": 1.5}, id="no-c"),
    _case("Einsum", 12, [_f32(3, 4), _f32(4, 5)], {"equation": "ij,jk->ik"}, id="matmul"),
    _case("Einsum", 12, [_f32(2, 3, 4)], {"equation": "bij -> bji"}, id="transpose-spaces"),
    _case("Einsum", 12, [_f32(3, 3)], {"equation": "ii->i"}, id="diagonal"),
    _case("Einsum", 12, [_f32(3, 4), _f32(4, 5)], {"equation": "ij,jk"}, id="implicit"),
    _case(
        "Einsum", 12, [_i64(2, 3), _i64(2, 3)], {"equation": "...j,...j->..."}, id="int64-ellipsis"
    ),
]

FAST_PATH_CASES = (
    _SHAPE_CASES
    + _SLICE_CASES
    + _ELEMENTWISE_CASES
    + _REDUCE_CASES
    + _GENERATOR_CASES
    + _SPLIT_CASES
    + _LINALG_CASES
)


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
    (result,) = evaluate_node("Shape", "ai.onnx", [_f32(2, 3)], {}, opset=13, num_outputs=1)
    np.testing.assert_array_equal(result, _ints(2, 3))


def test_graphsurgeon_constant_tensor_attribute() -> None:
    class FakeConstant:  # onnx-graphsurgeon imports tensor attributes as Constant objects
        values = np.array([3], dtype=np.int32)

    (result,) = evaluate_node(
        "ConstantOfShape", "", [_ints(2)], {"value": FakeConstant()}, opset=9, num_outputs=1
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
@example(("Div", _ints(-7, 7, -1), _ints(2, -2, 3).reshape(3, 1)))  # C truncation, broadcast
@example(("Mod", _ints(-7, 7), _ints(3, -3)))  # integer Mod takes the divisor's sign
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
            "HardSigmoid", [_f32(3, 4) * 4], {"alpha": 0.3, "beta": 0.4}, id="HardSigmoid"
        ),
        pytest.param("Det", [_f32(2, 3, 3)], {}, id="Det"),
        pytest.param("ArgMax", [_f32(3, 4)], {"axis": 1, "keepdims": 0}, id="ArgMax"),
        pytest.param(
            "EyeLike", [_f32(3, 4)], {"dtype": np.dtype(np.int64), "k": 1}, id="EyeLike-dtype-attr"
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
        "Cast", "", [_ints(1, -2)], {"to": TensorProto.STRING}, opset=13, num_outputs=1
    )
    assert result.dtype == object
    assert list(result) == ["1", "-2"]


@pytest.mark.parametrize("op_type", sorted(NONDETERMINISTIC_OPS))
def test_random_ops_are_refused(op_type: str) -> None:
    with pytest.raises(EvaluationUnsupported, match="random"):
        evaluate_node(op_type, "", [_f32(2, 2)], {"shape": [2, 2]}, opset=17, num_outputs=1)


def test_random_normal_is_refused() -> None:
    assert "RandomNormal" in NONDETERMINISTIC_OPS
    with pytest.raises(EvaluationUnsupported, match="RandomNormal"):
        evaluate_node("RandomNormal", "", [], {"shape": [2, 2]}, opset=17, num_outputs=1)


def test_dropout_in_training_mode_is_refused() -> None:
    inputs = [_f32(2, 2), np.array(0.5, dtype=np.float32), np.array(True)]
    with pytest.raises(EvaluationUnsupported, match="training"):
        evaluate_node("Dropout", "", inputs, {}, opset=13, num_outputs=1)


def test_custom_domain_is_refused() -> None:
    with pytest.raises(EvaluationUnsupported, match=r"com\.example"):
        evaluate_node("Add", "com.example", [_f32(2), _f32(2)], {}, opset=13, num_outputs=1)


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
        evaluate_node("NoSuchOp", "", [_f32(2)], {}, opset=13, num_outputs=1)


def test_reference_failure_is_chained() -> None:
    with pytest.raises(EvaluationUnsupported) as excinfo:
        evaluate_node("Det", "", [_f32(2, 3)], {}, opset=13, num_outputs=1)
    assert excinfo.value.__cause__ is not None


_REFUSALS = [  # (op, opset, inputs, attrs, outputs, the reason the error must give)
    ("Div", 13, [_ints(1, 2), _ints(1, 0)], {}, 1, "division by zero"),
    ("Mod", 13, [_f32(2), _f32(2)], {}, 1, "requires fmod=1"),
    ("Split", 13, [_f32(5)], {}, 2, "equal parts"),
    ("Gather", 13, [_f32(3), _ints(3)], {}, 1, "out of bounds"),
    ("Reshape", 13, [_f32(2, 3), _ints(4, -1)], {}, 1, "cannot reshape"),
    ("Squeeze", 13, [_f32(2, 3), _ints(0)], {}, 1, "cannot select an axis to squeeze"),
    ("Cast", 13, [_f32(2)], {"to": TensorProto.STRING}, 1, "formatting differs"),
    ("Dropout", 10, [_f32(2)], {}, 2, "mask of Dropout before opset 12"),
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
