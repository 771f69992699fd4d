"""Numpy implementations of ONNX shape, layout and generator ops, for `passes.core._evaluate`.

Shape, Size, Gather, (Un)Squeeze, Concat, Reshape, Transpose, Flatten, Slice, Split, Expand, Tile,
Trilu, NonZero, Constant, ConstantOfShape and Range. They follow the contract that
`passes.core._evaluate_ops` describes and share its `OpCall` and helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from passes.core._evaluate_ops import (
    NeedsReference,
    OpCall,
    as_ints,
    is_integer,
    normalize_axis,
    read_axes,
    tensor_value,
)


def _clamp(value: int, low: int, high: int) -> int:
    return min(max(value, low), high)


# ---------------------------------------------------------------- shapes and layout


def shape(call: OpCall) -> list[np.ndarray]:
    """ONNX Shape: `start`/`end` are made non-negative, then clamped to [0, rank]."""
    dims = call.input(0).shape
    start = _clamp_index(int(call.attr("start", 0)), len(dims))
    end = _clamp_index(int(call.attr("end", len(dims))), len(dims))
    return [np.array(dims[start:end], dtype=np.int64)]


def _clamp_index(index: int, rank: int) -> int:
    return _clamp(index + rank if index < 0 else index, 0, rank)


def size(call: OpCall) -> list[np.ndarray]:
    return [np.array(call.input(0).size, dtype=np.int64)]


def gather(call: OpCall) -> list[np.ndarray]:
    data, indices = call.input(0), call.input(1)
    axis = normalize_axis(int(call.attr("axis", 0)), data.ndim)
    return [np.take(data, indices.astype(np.int64), axis=axis)]


def unsqueeze(call: OpCall) -> list[np.ndarray]:
    axes = read_axes(call, 1, input_since=13)
    if axes is None:
        raise ValueError("Unsqueeze needs axes")
    return [np.expand_dims(call.input(0), tuple(axes))]


def squeeze(call: OpCall) -> list[np.ndarray]:
    """ONNX Squeeze; without axes every dimension of size 1 is removed."""
    data = call.input(0)
    axes = read_axes(call, 1, input_since=13)
    if axes is None:
        return [np.squeeze(data)]
    return [np.squeeze(data, axis=tuple(normalize_axis(axis, data.ndim) for axis in axes))]


def concat(call: OpCall) -> list[np.ndarray]:
    arrays = [x for x in call.inputs if x is not None]
    if not arrays:
        raise ValueError("Concat needs at least one input")
    axis = call.attr("axis", 1) if call.opset < 4 else call.required_attr("axis")
    return [np.concatenate(arrays, axis=normalize_axis(int(axis), arrays[0].ndim))]


def reshape(call: OpCall) -> list[np.ndarray]:
    """ONNX Reshape: 0 copies the input's dimension unless `allowzero=1`; one -1 is inferred."""
    data = call.input(0)
    requested = as_ints(call.input(1) if call.opset >= 5 else call.required_attr("shape"))
    if not call.attr("allowzero", 0):
        requested = [data.shape[i] if dim == 0 else dim for i, dim in enumerate(requested)]
    return [np.reshape(data, requested)]


def transpose(call: OpCall) -> list[np.ndarray]:
    data = call.input(0)
    perm = call.attr("perm")
    return [np.transpose(data, None if perm is None else as_ints(perm))]


def flatten(call: OpCall) -> list[np.ndarray]:
    data = call.input(0)
    axis = int(call.attr("axis", 1))
    axis = axis + data.ndim if axis < 0 else axis
    if not 0 <= axis <= data.ndim:
        raise ValueError(f"axis {axis} is out of range for rank {data.ndim}")
    return [data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))]


def slice_(call: OpCall) -> list[np.ndarray]:
    """ONNX Slice: inputs from opset 10 (with steps), attributes before; clamped per the spec."""
    data = call.input(0)
    if call.opset >= 10:
        starts, ends = as_ints(call.input(1)), as_ints(call.input(2))
        axes_value, steps_value = call.optional_input(3), call.optional_input(4)
    else:
        starts, ends = as_ints(call.required_attr("starts")), as_ints(call.required_attr("ends"))
        axes_value, steps_value = call.attr("axes"), None
    axes = list(range(len(starts))) if axes_value is None else as_ints(axes_value)
    steps = [1] * len(starts) if steps_value is None else as_ints(steps_value)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("starts, ends, axes and steps differ in length")
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = normalize_axis(axis, data.ndim)
        index[axis] = _slice_for_axis(start, end, step, data.shape[axis])
    return [data[tuple(index)]]


_SLICE_END_SENTINELS = frozenset({np.iinfo(np.int32).max, np.iinfo(np.int64).max})


def _slice_for_axis(start: int, end: int, step: int, dim: int) -> slice:
    """One axis of Slice, clamped per the spec.

    Like onnxruntime, an `end` of INT32_MAX or INT64_MAX means "to the end in the stepping
    direction" (numpy's None) even for negative steps, where the spec would clamp it to dim - 1.
    """
    if step == 0:
        raise ValueError("Slice step is 0")
    start = start + dim if start < 0 else start
    if end in _SLICE_END_SENTINELS:
        end = dim if step > 0 else -1
    elif end < 0:
        end += dim
    if step > 0:
        return slice(_clamp(start, 0, dim), _clamp(end, 0, dim), step)
    end = _clamp(end, -1, dim - 1)
    return slice(_clamp(start, 0, dim - 1), None if end < 0 else end, step)


def split(call: OpCall) -> list[np.ndarray]:
    """ONNX Split: sizes are an attribute before 13, an input after; else equal parts."""
    data = call.input(0)
    axis = normalize_axis(int(call.attr("axis", 0)), data.ndim)
    if call.opset < 2:
        raise NeedsReference("Split-1 takes its sizes from an input or an attribute")
    sizes_value = call.optional_input(1) if call.opset >= 13 else call.attr("split")
    dim = data.shape[axis]
    sizes = _equal_split(dim, call) if sizes_value is None else as_ints(sizes_value)
    if len(sizes) != call.num_outputs or sum(sizes) != dim or min(sizes, default=0) < 0:
        raise ValueError(
            f"split sizes {sizes} do not cut a dimension of {dim} into {call.num_outputs}"
        )
    return np.split(data, np.cumsum(sizes)[:-1], axis=axis)


def _equal_split(dim: int, call: OpCall) -> list[int]:
    """Equal parts; from opset 18 the last part may be smaller, before it `dim` must divide."""
    parts = (
        int(call.attr("num_outputs", call.num_outputs)) if call.opset >= 18 else call.num_outputs
    )
    if parts <= 0:
        raise ValueError("Split needs at least one output")
    if call.opset < 18 and dim % parts:
        raise ValueError(f"dimension {dim} does not split into {parts} equal parts")
    chunk = -(-dim // parts)
    return [_clamp(dim - i * chunk, 0, chunk) for i in range(parts)]


def expand(call: OpCall) -> list[np.ndarray]:
    data = call.input(0)
    target = np.broadcast_shapes(data.shape, tuple(as_ints(call.input(1))))
    return [np.broadcast_to(data, target).copy()]


def tile(call: OpCall) -> list[np.ndarray]:
    if call.opset < 6:
        raise NeedsReference("Tile-1 takes tiles and axis inputs")
    data = call.input(0)
    repeats = as_ints(call.input(1))
    if len(repeats) != data.ndim:
        raise ValueError(f"Tile repeats {repeats} do not match rank {data.ndim}")
    return [np.tile(data, repeats)]


def trilu(call: OpCall) -> list[np.ndarray]:
    data = call.input(0)
    k_value = call.optional_input(1)
    k = 0 if k_value is None else as_ints(k_value)[0]
    return [np.triu(data, k) if call.attr("upper", 1) else np.tril(data, k)]


def nonzero(call: OpCall) -> list[np.ndarray]:
    """Indices of the non-zero elements, shape [rank, count]; a scalar counts as shape [1]."""
    data = call.input(0)
    flat = data.reshape(1) if data.ndim == 0 else data
    return [np.array(np.nonzero(flat), dtype=np.int64).reshape(flat.ndim, -1)]


# ---------------------------------------------------------------- constants and generators


def constant(call: OpCall) -> list[np.ndarray]:
    """ONNX Constant from whichever `value*` attribute the node sets."""
    builders: dict[str, Callable[[Any], np.ndarray]] = {
        "value": tensor_value,
        "value_float": lambda v: np.array(v, dtype=np.float32),
        "value_floats": lambda v: np.array(list(v), dtype=np.float32).reshape(-1),
        "value_int": lambda v: np.array(v, dtype=np.int64),
        "value_ints": lambda v: np.array(list(v), dtype=np.int64).reshape(-1),
        "value_string": lambda v: np.array(v, dtype=object),
        "value_strings": lambda v: np.array(list(v), dtype=object).reshape(-1),
    }
    present = [name for name in call.attrs if call.attrs[name] is not None]
    if any(name not in builders for name in present):
        raise NeedsReference(f"Constant with attributes {present}")
    if len(present) != 1:
        raise ValueError(f"Constant needs exactly one value attribute, has {present}")
    return [builders[present[0]](call.attrs[present[0]])]


def constant_of_shape(call: OpCall) -> list[np.ndarray]:
    dims = as_ints(call.input(0))
    value = call.attr("value")
    fill = np.zeros(1, dtype=np.float32) if value is None else tensor_value(value).reshape(-1)
    if fill.size != 1:
        raise ValueError("ConstantOfShape value must have exactly one element")
    return [np.full(dims, fill[0], dtype=fill.dtype)]


def range_(call: OpCall) -> list[np.ndarray]:
    """ONNX Range, accumulating `delta` step by step in the input dtype as onnxruntime does."""
    start, limit, delta = (call.input(i).reshape(()) for i in range(3))
    if delta == 0:
        raise ValueError("Range delta is 0")
    if is_integer(start):
        first, step = int(start), int(delta)
        count = max(-((first - int(limit)) // step), 0)
        return [(np.arange(count, dtype=np.int64) * step + first).astype(start.dtype)]
    count = max(math.ceil(float(np.subtract(limit, start)) / float(delta)), 0)
    terms = np.full(count, delta, dtype=start.dtype)
    terms[:1] = start
    return [np.add.accumulate(terms, dtype=start.dtype)]
