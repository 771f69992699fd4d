"""Numpy implementations of ONNX operators, the fast paths behind `passes.core._evaluate`.

This module holds the shared `OpCall` contract and helpers, and the elementwise, math, reduction
and linear-algebra ops; `passes.core._evaluate_shape_ops` holds the shape, layout and generator ops.
Each implementation takes an `OpCall` and returns the node's outputs with exactly the dtypes the
ONNX spec gives them, matching onnxruntime (C-style integer division and casts, Shape's clamped
`start`/`end`, Slice's clamping rules). Invalid or unspecified cases raise `ValueError`,
`IndexError` or `OverflowError` with a message that says why; the dispatcher turns them into
`EvaluationUnsupported`. A case a fast path deliberately does not cover raises `NeedsReference`,
and the dispatcher evaluates it with `onnx.reference` instead. Outputs may share memory with the
inputs: treat both as read-only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

_NUMERIC_TYPES = frozenset(
    np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
)


class NeedsReference(Exception):
    """The fast path does not cover this case; evaluate it with `onnx.reference` instead."""


@dataclass(frozen=True)
class OpCall:
    """One node's constant inputs, attributes and context, as a fast path receives them."""

    inputs: Sequence[np.ndarray | None]
    attrs: Mapping[str, Any]
    opset: int
    num_outputs: int

    def optional_input(self, index: int) -> np.ndarray | None:
        """Input `index`, or None when it is omitted or past the end."""
        return self.inputs[index] if index < len(self.inputs) else None

    def input(self, index: int) -> np.ndarray:
        """Input `index`, which the op requires."""
        value = self.optional_input(index)
        if value is None:
            raise ValueError(f"required input {index} is missing")
        return value

    def attr(self, name: str, default: Any = None) -> Any:
        """Attribute `name`, or `default` when the node does not set it."""
        value = self.attrs.get(name)
        return default if value is None else value

    def required_attr(self, name: str) -> Any:
        """Attribute `name`, which the op requires."""
        if self.attrs.get(name) is None:
            raise ValueError(f"required attribute {name!r} is missing")
        return self.attrs[name]


OpImpl = Callable[[OpCall], list[np.ndarray]]


# ---------------------------------------------------------------- helpers


def to_np_dtype(value: Any) -> np.dtype:
    """A numpy dtype from a numpy dtype/type or an ONNX `TensorProto` element-type enum."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(value)))
    return np.dtype(value)


def tensor_value(value: Any) -> np.ndarray:
    """A tensor attribute as an array: numpy array, `TensorProto`, or a graphsurgeon Constant."""
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if hasattr(value, "values") and not isinstance(value, (np.ndarray, Mapping)):
        return np.asarray(value.values)
    return np.asarray(value)


def as_ints(values: Any) -> list[int]:
    """A list of python ints from a 0-d/1-d array or a sequence."""
    return [int(v) for v in np.asarray(values).reshape(-1)]


def normalize_axis(axis: int, rank: int) -> int:
    """`axis` in [0, rank), accepting negative axes; out-of-range axes are an error."""
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def read_axes(call: OpCall, input_index: int, input_since: int) -> list[int] | None:
    """The `axes` of the node: an input from opset `input_since`, an attribute before it."""
    value = call.optional_input(input_index) if call.opset >= input_since else call.attr("axes")
    return None if value is None else as_ints(value)


def is_integer(array: np.ndarray) -> bool:
    return array.dtype.kind in "iu"


def _lowest(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return -np.inf
    return False if dtype.kind == "b" else np.iinfo(dtype).min


def _highest(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.inf
    return True if dtype.kind == "b" else np.iinfo(dtype).max


# ---------------------------------------------------------------- elementwise


def unary(function: Callable[[np.ndarray], np.ndarray]) -> OpImpl:
    """A one-input, one-output op applying `function`."""

    def apply(call: OpCall) -> list[np.ndarray]:
        return [function(call.input(0))]

    return apply


def binary(function: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpImpl:
    """A two-input broadcasting op applying `function`."""

    def apply(call: OpCall) -> list[np.ndarray]:
        return [function(call.input(0), call.input(1))]

    return apply


def variadic(function: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpImpl:
    """A broadcasting op over one or more inputs, folding them left to right."""

    def apply(call: OpCall) -> list[np.ndarray]:
        arrays = [x for x in call.inputs if x is not None]
        if not arrays:
            raise ValueError("needs at least one input")
        return [functools.reduce(function, arrays)]

    return apply


def via_float64(function: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """`function` computed in float64 and rounded back to the input dtype."""

    def apply(x: np.ndarray) -> np.ndarray:
        return function(x.astype(np.float64)).astype(x.dtype)

    return apply


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.zeros((), dtype=x.dtype))


def _check_nonzero_divisor(divisor: np.ndarray) -> None:
    if is_integer(divisor) and np.any(divisor == 0):
        raise ValueError("integer division by zero")


def divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX Div: integer division truncates toward zero (C), unlike numpy's floor division."""
    if not is_integer(a):
        return np.divide(a, b)
    _check_nonzero_divisor(b)
    return (a - np.fmod(a, b)) // b


def power(base: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """ONNX Pow: the result has the base's dtype, whatever the exponent's."""
    if is_integer(base) and is_integer(exponent) and not np.any(exponent < 0):
        return np.power(base, exponent.astype(base.dtype))
    result = np.power(base.astype(np.float64), exponent.astype(np.float64))
    return result.astype(base.dtype)


def mod(call: OpCall) -> list[np.ndarray]:
    """ONNX Mod: sign of the divisor by default, sign of the dividend (C fmod) with `fmod=1`."""
    a, b = call.input(0), call.input(1)
    use_fmod = bool(call.attr("fmod", 0))
    if not use_fmod and not is_integer(a):
        raise ValueError("Mod on floating-point inputs requires fmod=1")
    _check_nonzero_divisor(b)
    return [np.fmod(a, b) if use_fmod else np.mod(a, b)]


def logical(function: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpImpl:
    """A comparison or logical op: broadcasting, always a bool result."""

    def apply(call: OpCall) -> list[np.ndarray]:
        return [np.asarray(function(call.input(0), call.input(1))).astype(np.bool_)]

    return apply


def where(call: OpCall) -> list[np.ndarray]:
    return [np.where(call.input(0), call.input(1), call.input(2))]


def clip(call: OpCall) -> list[np.ndarray]:
    """ONNX Clip: bounds are attributes before opset 11 (finite float32 defaults), inputs after."""
    data = call.input(0)
    if call.opset >= 11:
        low, high = call.optional_input(1), call.optional_input(2)
    else:
        finfo = np.finfo(np.float32)
        default_low, default_high = (finfo.min, finfo.max) if call.opset >= 6 else (None, None)
        low = _bound(call.attr("min", default_low), data.dtype)
        high = _bound(call.attr("max", default_high), data.dtype)
    result = data
    if low is not None:
        result = np.maximum(result, low)
    if high is not None:
        result = np.minimum(result, high)
    return [result]


def _bound(value: float | None, dtype: np.dtype) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=dtype)


def cast(call: OpCall) -> list[np.ndarray]:
    """ONNX Cast between bool, integer and IEEE float types (C-style truncation to integers)."""
    data = call.input(0)
    target = to_np_dtype(call.required_attr("to"))
    if target == np.dtype(object) and data.dtype.kind == "f":
        raise ValueError("float-to-string formatting differs between onnx.reference and runtimes")
    if data.dtype not in _NUMERIC_TYPES or target not in _NUMERIC_TYPES:
        raise NeedsReference(f"Cast from {data.dtype} to {target}")
    return [data.astype(target)]


def dropout(call: OpCall) -> list[np.ndarray]:
    """Dropout in inference mode: the input, and (from opset 12) an all-true mask."""
    data = call.input(0)
    if call.opset >= 12:
        return [data, np.ones(data.shape, dtype=np.bool_)]
    if call.num_outputs > 1:
        raise ValueError("the inference mask of Dropout before opset 12 is unspecified")
    return [data]


def identity(call: OpCall) -> list[np.ndarray]:
    return [call.input(0)]


# ---------------------------------------------------------------- reductions


def reduce(
    reducer: Callable[[np.ndarray, tuple[int, ...], bool], np.ndarray], input_since: int
) -> OpImpl:
    """A Reduce* op whose `axes` is an input from opset `input_since`, an attribute before."""

    def apply(call: OpCall) -> list[np.ndarray]:
        data = call.input(0)
        axes = read_axes(call, 1, input_since)
        if not axes:
            if call.attr("noop_with_empty_axes", 0):
                return [data]
            axes = list(range(data.ndim))
        normalized = tuple(sorted({normalize_axis(axis, data.ndim) for axis in axes}))
        return [reducer(data, normalized, bool(call.attr("keepdims", 1)))]

    return apply


def reduce_sum(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """Sum, accumulated in float64 for floats; integers wrap in their own dtype, as in C."""
    accumulator = np.float64 if x.dtype.kind == "f" else x.dtype
    return np.sum(x, axis=axes, dtype=accumulator, keepdims=keepdims).astype(x.dtype)


def reduce_prod(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    return np.prod(x, axis=axes, dtype=x.dtype, keepdims=keepdims)


def reduce_max(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    return np.max(x, axis=axes, keepdims=keepdims, initial=_lowest(x.dtype))


def reduce_min(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    return np.min(x, axis=axes, keepdims=keepdims, initial=_highest(x.dtype))


def reduce_mean(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """Mean in float64 for floats; for integers the sum divided with truncation, as in C."""
    if not is_integer(x):
        return np.mean(x.astype(np.float64), axis=axes, keepdims=keepdims).astype(x.dtype)
    count = math.prod(x.shape[axis] for axis in axes)
    if count == 0:
        raise ValueError("integer mean over an empty set")
    return divide(reduce_sum(x, axes, keepdims), np.asarray(count, dtype=x.dtype))


def cumsum(call: OpCall) -> list[np.ndarray]:
    data = call.input(0)
    axis = normalize_axis(as_ints(call.input(1))[0], data.ndim)
    reverse = bool(call.attr("reverse", 0))
    ordered = np.flip(data, axis) if reverse else data
    result = np.cumsum(ordered, axis=axis, dtype=data.dtype)
    if call.attr("exclusive", 0):
        lead = (slice(None),) * axis
        shifted = np.zeros_like(result)
        shifted[(*lead, slice(1, None))] = result[(*lead, slice(None, -1))]
        result = shifted
    return [np.flip(result, axis) if reverse else result]


def softmax(call: OpCall) -> list[np.ndarray]:
    """Softmax; before opset 13 the input is coerced to 2-D at `axis` (default 1)."""
    data = call.input(0)
    if call.opset >= 13:
        return [_softmax_along(data, normalize_axis(int(call.attr("axis", -1)), data.ndim))]
    axis = int(call.attr("axis", 1))
    axis = axis + data.ndim if axis < 0 else axis
    if not 0 <= axis <= data.ndim:
        raise ValueError(f"axis {axis} is out of range for rank {data.ndim}")
    outer = math.prod(data.shape[:axis])
    flat = data.reshape(outer, math.prod(data.shape[axis:]))
    return [_softmax_along(flat, 1).reshape(data.shape)]


def _softmax_along(x: np.ndarray, axis: int) -> np.ndarray:
    exponentials = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return exponentials / np.sum(exponentials, axis=axis, keepdims=True)


# ---------------------------------------------------------------- linear algebra


def matmul(call: OpCall) -> list[np.ndarray]:
    return [np.matmul(call.input(0), call.input(1))]


def gemm(call: OpCall) -> list[np.ndarray]:
    """alpha * A' @ B' + beta * C, for floating-point types."""
    a, b, c = call.input(0), call.input(1), call.optional_input(2)
    if a.dtype.kind != "f":
        raise NeedsReference(f"Gemm on {a.dtype}")
    a = a.T if call.attr("transA", 0) else a
    b = b.T if call.attr("transB", 0) else b
    result = np.asarray(call.attr("alpha", 1.0), dtype=a.dtype) * np.matmul(a, b)
    if c is not None:
        result = result + np.asarray(call.attr("beta", 1.0), dtype=a.dtype) * c
    return [result.astype(a.dtype)]


def einsum(call: OpCall) -> list[np.ndarray]:
    equation = str(call.required_attr("equation")).replace(" ", "")
    return [np.einsum(equation, *[x for x in call.inputs if x is not None])]
