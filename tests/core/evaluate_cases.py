"""The fast-path cases of `passes.core._evaluate`, one `pytest.param` per op and corner, that
`test_evaluate.py` runs against onnxruntime (every fast path has at least one).

Inputs come from one seeded generator, drawn at import in table order, so every run sees the same cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min

_rng = np.random.default_rng(20240607)


def f32(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def i64(*shape: int, low: int = -10, high: int = 10) -> np.ndarray:
    return _rng.integers(low, high, shape, dtype=np.int64)


def bools(*shape: int) -> np.ndarray:
    return _rng.integers(0, 2, shape).astype(np.bool_)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def case(
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
    case("Identity", 13, [f32(2, 3)], id="float"),
    case("Shape", 13, [f32(2, 3, 4)], id="plain"),
    case("Shape", 15, [f32(2, 3, 4)], {"start": 1}, id="start"),
    case("Shape", 15, [f32(2, 3, 4)], {"start": -2}, id="start-negative"),
    case("Shape", 15, [f32(2, 3, 4)], {"end": -1}, id="end-negative"),
    case("Shape", 15, [f32(2, 3, 4)], {"start": -100, "end": 100}, id="out-of-range"),
    case("Shape", 15, [f32(2, 3, 4)], {"start": 5}, id="start-past-end"),
    case("Shape", 15, [f32(2, 3, 4)], {"start": 2, "end": 1}, id="start-after-end"),
    case("Size", 13, [f32(2, 3, 4)], id="3d"),
    case("Size", 13, [np.array(1.5, dtype=np.float32)], id="scalar"),
    case("Cast", 13, [_CAST_SOURCE], {"to": np.dtype(np.int64)}, id="float-to-int64"),
    case("Cast", 13, [_CAST_SOURCE], {"to": TensorProto.INT32}, id="float-to-int32-enum"),
    case("Cast", 13, [_CAST_SOURCE], {"to": np.bool_}, id="float-to-bool"),
    case("Cast", 13, [_CAST_SOURCE], {"to": np.float16}, id="float-to-half"),
    case("Cast", 19, [i64(5, low=-300, high=300)], {"to": TensorProto.INT8}, id="int64-to-int8"),
    case("Cast", 13, [i64(5)], {"to": np.float32}, id="int64-to-float"),
    case("Cast", 13, [bools(5)], {"to": np.float32}, id="bool-to-float"),
    case("Gather", 13, [f32(5, 3), ints(-1, 0, -5, 2)], id="axis0-negative"),
    case(
        "Gather",
        13,
        [f32(2, 4, 3), ints(-2, 1).reshape(2, 1)],
        {"axis": 1},
        id="axis1-2d-indices",
    ),
    case(
        "Gather", 13, [i64(2, 3, 4), np.array(-1, dtype=np.int64)], {"axis": -1}, id="scalar-index"
    ),
    case("Gather", 11, [ints(4, 5, 6), np.array([0, -1], dtype=np.int32)], id="int32-indices"),
    case("Unsqueeze", 11, [f32(2, 3)], {"axes": [0, -1]}, id="attr-negative"),
    case("Unsqueeze", 13, [f32(2, 3), ints(-1, 1)], id="input-negative"),
    case("Unsqueeze", 13, [np.array(3, dtype=np.int64), ints(0)], id="scalar"),
    case("Squeeze", 11, [f32(1, 3, 1)], {"axes": [-1]}, id="attr"),
    case("Squeeze", 13, [f32(1, 3, 1, 2)], id="no-axes"),
    case("Squeeze", 13, [f32(1, 3, 1), ints(0, -1)], id="input-negative"),
    case("Concat", 13, [f32(2, 3), f32(1, 3)], {"axis": 0}, id="axis0"),
    case(
        "Concat", 13, [i64(2, 1), i64(2, 2), i64(2, 0)], {"axis": -1}, id="int64-negative-axis"
    ),
    case("Reshape", 13, [f32(2, 3, 4), ints(0, -1)], id="zero-and-minus-one"),
    case("Reshape", 13, [f32(2, 3, 4), ints(-1)], id="flatten"),
    case("Reshape", 13, [f32(2, 3, 4), ints(2, 0, 2, -1)], id="copy-middle"),
    case("Reshape", 14, [f32(0, 3), ints(0, 3)], {"allowzero": 1}, id="allowzero"),
    case("Reshape", 14, [f32(2, 3), ints(0, 3)], {"allowzero": 0}, id="zero-copies"),
    case("Transpose", 13, [f32(2, 3, 4)], id="default-perm"),
    case("Transpose", 13, [i64(2, 3, 4)], {"perm": [1, 0, 2]}, id="perm"),
    case("Flatten", 13, [f32(2, 3, 4)], id="default"),
    case("Flatten", 13, [f32(2, 3, 4)], {"axis": 0}, id="axis0"),
    case("Flatten", 13, [f32(2, 3, 4)], {"axis": -1}, id="axis-negative"),
    case("Flatten", 13, [f32(2, 3, 4)], {"axis": 3}, id="axis-rank"),
]

_SLICE_CASES = [
    case("Slice", 13, [f32(5, 6), ints(1), ints(INT64_MAX), ints(1)], id="int64-max-end"),
    case(
        "Slice",
        13,
        [f32(5, 6), ints(-1), ints(-INT64_MAX), ints(0), ints(-1)],
        id="reverse-all",
    ),
    # onnxruntime reads an INT32_MAX/INT64_MAX end as "to the end" even when stepping backwards.
    case(
        "Slice",
        13,
        [f32(5, 6), ints(-10, 3), ints(INT64_MAX, INT64_MAX), ints(0, 1), ints(-1, -2)],
        id="negative-step-int64-max-end",
    ),
    case(
        "Slice",
        13,
        [f32(5, 6), ints(3), ints(np.iinfo(np.int32).max), ints(0), ints(-1)],
        id="negative-step-int32-max-end",
    ),
    case(
        "Slice",
        13,
        [f32(5, 6), ints(INT64_MAX), ints(INT64_MIN), ints(-1), ints(-2)],
        id="reverse-step2",
    ),
    case("Slice", 13, [f32(5, 6), ints(-100, 1), ints(100, -1)], id="clamped-no-axes"),
    case(
        "Slice",
        13,
        [f32(5, 6), ints(4), ints(1), ints(0), ints(-1)],
        id="negative-step-partial",
    ),
    case(
        "Slice", 13, [f32(5, 6), ints(1), ints(4), ints(0), ints(-1)], id="negative-step-empty"
    ),
    case(
        "Slice",
        13,
        [i64(4, 5, 6), ints(0, 1), ints(6, 5), ints(-1, 1), ints(2, 3)],
        id="steps",
    ),
    case("Slice", 13, [f32(5, 6), ints(-3), ints(-1), None, ints(1)], id="omitted-axes"),
    case(
        "Slice",
        9,
        [f32(5, 6)],
        {"starts": [1, -4], "ends": [INT64_MAX, -1], "axes": [0, 1]},
        id="attrs",
    ),
]

_ELEMENTWISE_CASES = [
    case("Add", 14, [f32(2, 3), f32(3)], id="float-broadcast"),
    case("Add", 14, [i64(2, 1), i64(1, 4)], id="int64"),
    case("Sub", 14, [f32(2, 3), f32(2, 3)], id="float"),
    case("Mul", 14, [i64(3, 1), i64(4)], id="int64"),
    case("Mul", 14, [f32(3), np.array(2.5, dtype=np.float32)], id="float-scalar"),
    case(
        "Div", 14, [ints(-7, 7, -7, 7, -1, 0, 9), ints(2, -2, -2, 2, 3, 5, 3)], id="int64-signs"
    ),
    case(
        "Div",
        14,
        [np.array([-7, 5, -9], dtype=np.int32), np.array([2, -3, 4], dtype=np.int32)],
        id="int32",
    ),
    case("Div", 14, [f32(2, 3), f32(3)], id="float"),
    case("Mod", 13, [ints(-7, 7, -7, 7, 0), ints(3, -3, -3, 3, 2)], id="int64-python-sign"),
    case(
        "Mod", 13, [ints(-7, 7, -7, 7, 0), ints(3, -3, -3, 3, 2)], {"fmod": 1}, id="int64-fmod"
    ),
    case("Mod", 13, [f32(6) * 5, np.abs(f32(6)) + 0.5], {"fmod": 1}, id="float-fmod"),
    case("Pow", 15, [np.abs(f32(4)) + 0.1, f32(4)], id="float"),
    case("Pow", 15, [f32(4), ints(0, 1, 2, 3)], id="float-int-exponent"),
    case("Pow", 15, [i64(5), ints(0, 1, 2, 3, 4)], id="int64"),
    case(
        "Pow",
        15,
        [np.array([2, 3, 9], dtype=np.int32), np.array([0.5, 2.0, 0.5], dtype=np.float32)],
        id="int-float",
    ),
    case("Neg", 13, [i64(5)], id="int64"),
    case("Abs", 13, [f32(5)], id="float"),
    case("Sqrt", 13, [np.abs(f32(5))], id="float"),
    case("Reciprocal", 13, [f32(5)], id="float"),
    case("Exp", 13, [f32(5)], id="float"),
    case("Log", 13, [np.abs(f32(5)) + 0.1], id="float"),
    case("Erf", 13, [f32(20) * 2], id="float"),
    case("Tanh", 13, [f32(20) * 3], id="float"),
    case("Sigmoid", 13, [f32(20) * 5], id="float"),
    case("Floor", 13, [f32(6) * 3], id="float"),
    case("Ceil", 13, [f32(6) * 3], id="float"),
    case("Sign", 13, [np.array([-2.5, 0.0, 3.0], dtype=np.float32)], id="float"),
    case("Sign", 13, [ints(-3, 0, 4)], id="int64"),
    case("Relu", 14, [f32(2, 3)], id="float"),
    case("Relu", 14, [np.array([-3, 0, 5], dtype=np.int32)], id="int32"),
    case("Equal", 13, [i64(3, 4, low=0, high=3), i64(4, low=0, high=3)], id="int64"),
    case("Less", 13, [f32(3, 4), f32(4)], id="float"),
    case("Greater", 13, [i64(3, 1), i64(1, 4)], id="int64"),
    case("LessOrEqual", 16, [i64(5, low=0, high=3), i64(5, low=0, high=3)], id="int64"),
    case("GreaterOrEqual", 16, [f32(5), f32(1)], id="float"),
    case("Not", 1, [bools(2, 3)], id="bool"),
    case("And", 7, [bools(2, 3), bools(3)], id="bool"),
    case("Or", 7, [bools(2, 3), bools(2, 1)], id="bool"),
    case("Xor", 7, [bools(4), bools(4)], id="bool"),
    case("Where", 16, [bools(2, 3), f32(3), f32(2, 1)], id="float"),
    case("Where", 16, [bools(3), i64(3), np.array(0, dtype=np.int64)], id="int64"),
    case("Min", 13, [f32(2, 3), f32(3), f32(1)], id="float-variadic"),
    case("Max", 13, [i64(2, 3), i64(2, 1)], id="int64"),
    case("Max", 13, [f32(4)], id="single"),
    case("Clip", 6, [f32(6) * 3], {"min": -1.0, "max": 1.5}, id="attrs"),
    case("Clip", 6, [np.array([-np.inf, 0.0, np.inf], dtype=np.float32)], id="attr-defaults"),
    case("Clip", 13, [f32(6) * 3, np.array(-0.5, dtype=np.float32)], id="min-only"),
    case("Clip", 13, [f32(6) * 3, None, np.array(0.5, dtype=np.float32)], id="max-only"),
    case(
        "Clip", 13, [i64(6), np.array(-2, dtype=np.int64), np.array(3, dtype=np.int64)], id="int64"
    ),
]

_REDUCE_CASES = [
    case("ReduceSum", 11, [f32(2, 3, 4)], {"axes": [1], "keepdims": 0}, id="attr"),
    case("ReduceSum", 13, [i64(2, 3, 4), ints(-1, 0)], id="input-negative"),
    case("ReduceSum", 13, [f32(2, 3)], id="no-axes-reduces-all"),
    case("ReduceSum", 13, [f32(2, 3), ints()], id="empty-axes-reduces-all"),
    case(
        "ReduceSum", 13, [f32(2, 3), ints()], {"noop_with_empty_axes": 1}, id="empty-axes-noop"
    ),
    case(
        "ReduceSum",
        13,
        [np.array([1, 2], dtype=np.int32), ints(0)],
        {"keepdims": 0},
        id="int32-stays",
    ),
    case("ReduceMean", 13, [f32(2, 3, 4)], {"axes": [0, 2]}, id="attr"),
    case("ReduceMean", 18, [f32(2, 3, 4), ints(-1)], {"keepdims": 0}, id="input"),
    case("ReduceMean", 18, [i64(2, 3)], {"noop_with_empty_axes": 1}, id="noop"),
    case("ReduceMax", 13, [i64(2, 3, 4)], {"axes": [-1], "keepdims": 0}, id="attr"),
    case("ReduceMax", 18, [f32(2, 3), ints(1)], id="input"),
    case("ReduceMin", 13, [f32(2, 3, 4)], id="all"),
    case("ReduceMin", 18, [i64(2, 3, 4), ints()], id="empty-axes"),
    case("ReduceProd", 13, [i64(2, 3, low=-3, high=4)], {"axes": [0]}, id="attr"),
    case("ReduceProd", 18, [f32(2, 3), ints(1)], {"keepdims": 0}, id="input"),
    case("CumSum", 14, [f32(3, 4), np.array(1, dtype=np.int64)], id="plain"),
    case("CumSum", 14, [i64(3, 4), ints(-2)], {"exclusive": 1}, id="exclusive"),
    case("CumSum", 14, [f32(3, 4), np.array(1, dtype=np.int32)], {"reverse": 1}, id="reverse"),
    case(
        "CumSum",
        14,
        [i64(5), np.array(0, dtype=np.int64)],
        {"exclusive": 1, "reverse": 1},
        id="both",
    ),
    case("Softmax", 11, [f32(2, 3, 4)], id="coerce-default-axis"),
    case("Softmax", 11, [f32(2, 3, 4)], {"axis": 2}, id="coerce-last"),
    case("Softmax", 11, [f32(2, 3, 4)], {"axis": 0}, id="coerce-axis0"),
    case("Softmax", 13, [f32(2, 3, 4)], id="default-axis"),
    case("Softmax", 13, [f32(2, 3, 4)], {"axis": 1}, id="axis1"),
]

_GENERATOR_CASES = [
    case(
        "Range",
        11,
        [np.array(1, dtype=np.int64), np.array(10, dtype=np.int64), np.array(3, dtype=np.int64)],
        id="int64",
    ),
    case(
        "Range",
        11,
        [np.array(5, dtype=np.int32), np.array(-4, dtype=np.int32), np.array(-2, dtype=np.int32)],
        id="int32-down",
    ),
    case(
        "Range",
        11,
        [np.array(3, dtype=np.int64), np.array(1, dtype=np.int64), np.array(1, dtype=np.int64)],
        id="empty",
    ),
    case(
        "Range",
        11,
        [
            np.array(0.1, dtype=np.float32),
            np.array(30.0, dtype=np.float32),
            np.array(0.1, dtype=np.float32),
        ],
        id="float-accumulating",
    ),
    case(
        "Range",
        11,
        [
            np.array(1.0, dtype=np.float32),
            np.array(-2.0, dtype=np.float32),
            np.array(-0.7, dtype=np.float32),
        ],
        id="float-down",
    ),
    case("ConstantOfShape", 9, [ints(2, 3)], id="default-value"),
    case(
        "ConstantOfShape",
        9,
        [ints(2, 0)],
        {"value": np.array([7], dtype=np.int64)},
        id="int64-empty",
    ),
    case(
        "ConstantOfShape", 9, [ints()], {"value": np.array([1.5], dtype=np.float32)}, id="scalar"
    ),
    case("Expand", 13, [f32(3, 1), ints(2, 1, 4)], id="bidirectional"),
    case("Expand", 13, [i64(2, 3), ints(1)], id="smaller-shape"),
    case("Tile", 13, [i64(2, 3), ints(2, 1)], id="int64"),
    case("Tile", 13, [f32(2, 1, 2), ints(1, 3, 2)], id="float"),
    case("Constant", 13, [], {"value": f32(2, 2)}, id="tensor"),
    case("Constant", 13, [], {"value_float": 2.5}, id="value-float"),
    case("Constant", 13, [], {"value_floats": [1.0, 2.5]}, id="value-floats"),
    case("Constant", 13, [], {"value_int": 7}, id="value-int"),
    case("Constant", 13, [], {"value_ints": [1, -2, 3]}, id="value-ints"),
    case("Constant", 13, [], {"value_strings": ["a", "bc"]}, id="value-strings"),
    case("Trilu", 14, [f32(3, 4)], id="upper"),
    case(
        "Trilu", 14, [i64(2, 3, 4), np.array(-1, dtype=np.int64)], {"upper": 0}, id="lower-batched"
    ),
    case("Trilu", 14, [f32(4, 3), np.array(1, dtype=np.int64)], id="upper-k1"),
    case("NonZero", 13, [i64(3, 4, low=-1, high=2)], id="2d"),
    case("NonZero", 13, [bools(6)], id="bool"),
    case("NonZero", 13, [np.array(2.0, dtype=np.float32)], id="scalar"),
    case("Dropout", 13, [f32(2, 3)], outputs=2, id="inference-mask"),
    case("Dropout", 7, [f32(2, 3)], {"ratio": 0.3}, id="opset7"),
]

_SPLIT_CASES = [
    case("Split", 11, [f32(2, 3)], {"axis": 1, "split": [1, 2]}, outputs=2, id="attr"),
    case("Split", 11, [f32(4, 3)], outputs=2, id="equal-attr-era"),
    case("Split", 13, [i64(2, 5), ints(2, 3)], {"axis": -1}, outputs=2, id="input"),
    case("Split", 13, [f32(6, 2)], outputs=3, id="equal"),
    case("Split", 18, [f32(7, 2)], {"num_outputs": 3}, outputs=3, id="num-outputs-uneven"),
]

_LINALG_CASES = [
    case("MatMul", 13, [f32(3, 4), f32(4, 5)], id="2d"),
    case("MatMul", 13, [f32(2, 1, 3, 4), f32(3, 4, 2)], id="batched-broadcast"),
    case("MatMul", 13, [f32(4), f32(4, 2)], id="vector-matrix"),
    case("MatMul", 13, [i64(2, 3), i64(3, 2)], id="int64"),
    case("Gemm", 13, [f32(3, 4), f32(4, 5), f32(5)], id="bias"),
    case(
        "Gemm",
        13,
        [f32(4, 3), f32(5, 4), f32(3, 1)],
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
        id="trans",
    ),
    case("Gemm", 13, [f32(3, 4), f32(4, 5)], {"alpha": 1.5}, id="no-c"),
    case("Einsum", 12, [f32(3, 4), f32(4, 5)], {"equation": "ij,jk->ik"}, id="matmul"),
    case("Einsum", 12, [f32(2, 3, 4)], {"equation": "bij -> bji"}, id="transpose-spaces"),
    case("Einsum", 12, [f32(3, 3)], {"equation": "ii->i"}, id="diagonal"),
    case("Einsum", 12, [f32(3, 4), f32(4, 5)], {"equation": "ij,jk"}, id="implicit"),
    case(
        "Einsum", 12, [i64(2, 3), i64(2, 3)], {"equation": "...j,...j->..."}, id="int64-ellipsis"
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
