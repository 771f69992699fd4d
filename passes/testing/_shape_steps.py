"""Shape-chain steps for `passes.testing.strategies`: exporter-style shape computations.

Each step maps (draw, builder, float tensor) to a new float tensor built through a dynamic shape
computation (Shape -> Gather/Slice -> Concat -> Reshape, Expand, Tile, Range, ConstantOfShape, ...),
or to None when it does not apply. The `_shape_piece` family spells the shape tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from passes.testing._graph_builder import (
    MAX_ELEMENTS,
    MAX_RANK,
    TAME_LIMIT,
    Builder,
    Dim,
    emit_reduce_mean,
    int_const,
    merge,
    numel,
    prime_factors,
    tame,
)

_INT64_MAX = int(np.iinfo(np.int64).max)


# --- shape-tensor helpers (exporter idioms) ------------------------------------------------------


def _start_spellings(start: int, rank: int) -> list[int]:
    return [start, start - rank] + ([-rank - 3] if start == 0 else [])


def _end_spellings(end: int, rank: int) -> list[int]:
    return [end, end - rank] if end < rank else [end, rank + 3, _INT64_MAX]


def _concat_ints(b: Builder, pieces: Sequence[str]) -> str:
    return pieces[0] if len(pieces) == 1 else b.emit("Concat", pieces, {"axis": 0})


def _maybe_cast(draw: st.DrawFn, b: Builder, name: str) -> str:
    """`name`, a no-op Cast to int64, or an int32 round trip (exporters emit all three)."""
    choice = draw(st.sampled_from(("none", "int64", "int32")))
    if choice == "none":
        return name
    if choice == "int32":
        name = b.emit("Cast", [name], {"to": TensorProto.INT32})
    return b.emit("Cast", [name], {"to": TensorProto.INT64})


def _shape_with_attrs(draw: st.DrawFn, b: Builder, t: str, start: int, end: int) -> str:
    """Shape(t, start, end) (opset >= 15), spelled with negative or out-of-range bounds at times."""
    rank = len(b.dims[t])
    first = draw(st.sampled_from([*_start_spellings(start, rank), *([None] if start == 0 else [])]))
    last = draw(st.sampled_from([*_end_spellings(end, rank), *([None] if end == rank else [])]))
    attrs = {key: value for key, value in (("start", first), ("end", last)) if value is not None}
    return b.emit("Shape", [t], attrs)


def _shape_piece(draw: st.DrawFn, b: Builder, t: str, start: int, end: int, *, per_dim: bool = True) -> str:
    """A 1-D int64 tensor holding the sizes dims[start:end] of `t` (0 <= start < end <= rank)."""
    rank = len(b.dims[t])
    ways = ["gather", "slice"] + (["per_dim"] if per_dim else []) + (["attrs"] if b.opset >= 15 else [])
    way = draw(st.sampled_from(ways))
    if way == "attrs":
        return _maybe_cast(draw, b, _shape_with_attrs(draw, b, t, start, end))
    if way == "per_dim":
        zero = int_const(draw, b, [0])
        dims = [b.emit("Unsqueeze", [_dim_scalar(draw, b, t, i), zero]) for i in range(start, end)]
        return _concat_ints(b, dims)
    shape = b.emit("Shape", [t])
    if way == "slice":
        starts = int_const(draw, b, [draw(st.sampled_from(_start_spellings(start, rank)))])
        ends = int_const(draw, b, [draw(st.sampled_from(_end_spellings(end, rank)))])
        extra = [int_const(draw, b, [0]), int_const(draw, b, [1])] if draw(st.booleans()) else []
        return _maybe_cast(draw, b, b.emit("Slice", [shape, starts, ends, *extra]))
    indices = [i - rank if draw(st.booleans()) else i for i in range(start, end)]
    return _maybe_cast(draw, b, b.emit("Gather", [shape, int_const(draw, b, indices)]))


def _dim_scalar(draw: st.DrawFn, b: Builder, t: str, axis: int) -> str:
    """A 0-d int64 tensor holding the size of `t` along `axis`."""
    rank = len(b.dims[t])
    if draw(st.booleans()):
        index = axis - rank if draw(st.booleans()) else axis
        return b.emit("Gather", [b.emit("Shape", [t]), int_const(draw, b, index)])
    piece = _shape_piece(draw, b, t, axis, axis + 1, per_dim=False)
    return b.emit("Squeeze", [piece, int_const(draw, b, [0])])


# --- shape-chain steps: (draw, builder, float tensor) -> new float tensor, or None if not applicable


def step_flatten(draw: st.DrawFn, b: Builder, t: str) -> str | None:
    """Reshape(t, Concat(Shape(t)[:keep], [-1])): merge the trailing dims (keep == rank: append 1)."""
    dims = b.dims[t]
    if len(dims) >= MAX_RANK:
        return None
    keep = draw(st.integers(1, len(dims)))
    target = _concat_ints(b, [_shape_piece(draw, b, t, 0, keep), int_const(draw, b, [-1])])
    return b.emit("Reshape", [t, target], dims=dims[:keep] + (merge(dims[keep:]),), bound=b.bound[t])


def step_split(draw: st.DrawFn, b: Builder, t: str) -> str | None:
    """Reshape(t, Concat(Shape(t)[:axis], [p, size/p], Shape(t)[axis+1:])): split a static dim."""
    dims = b.dims[t]
    axes = [i for i, d in enumerate(dims) if d.label is None and len(prime_factors(d.size)) > 1]
    if not axes or len(dims) >= MAX_RANK:
        return None
    axis = draw(st.sampled_from(axes))
    p = prime_factors(dims[axis].size)[0]
    rest = dims[axis].size // p
    pieces = [_shape_piece(draw, b, t, 0, axis)] if axis else []
    pieces.append(int_const(draw, b, [p, -1 if draw(st.booleans()) else rest]))
    if axis + 1 < len(dims):
        pieces.append(_shape_piece(draw, b, t, axis + 1, len(dims)))
    new = dims[:axis] + (Dim(p), Dim(rest)) + dims[axis + 1 :]
    return b.emit("Reshape", [t, _concat_ints(b, pieces)], dims=new, bound=b.bound[t])


def step_restore(draw: st.DrawFn, b: Builder, t: str) -> str | None:
    """Reshape(t, Shape(u)) for an earlier tensor u with the same element count."""
    size = merge(b.dims[t])
    options = [u for u in b.pool if b.dims[u] and b.dims[u] != b.dims[t] and merge(b.dims[u]).same(size)]
    if not options:
        return None
    u = draw(st.sampled_from(options))
    whole = draw(st.booleans())
    target = b.emit("Shape", [u]) if whole else _shape_piece(draw, b, u, 0, len(b.dims[u]))
    return b.emit("Reshape", [t, target], dims=b.dims[u], bound=b.bound[t])


def step_expand(draw: st.DrawFn, b: Builder, t: str) -> str:
    """t - Expand(ReduceMean(t), Where(Equal(target, -1), 1, target)): torch's expand(-1, ...)."""
    dims = b.dims[t]
    axes = sorted(draw(st.lists(st.integers(0, len(dims) - 1), min_size=1, max_size=len(dims), unique=True)))
    mean = emit_reduce_mean(draw, b, t, axes, keepdims=1)
    sized = [draw(st.booleans()) for _ in dims]
    pieces = [_shape_piece(draw, b, t, i, i + 1) if s else int_const(draw, b, [-1]) for i, s in enumerate(sized)]
    target = _concat_ints(b, pieces)
    one = numpy_helper.from_array(np.array([1], dtype=np.int64))
    ones = b.emit("ConstantOfShape", [b.emit("Shape", [target])], {"value": one})
    is_free = b.emit("Equal", [target, int_const(draw, b, -1)])
    fixed = b.emit("Where", [is_free, ones, target])
    expanded_dims = tuple(
        d if s or i not in axes else Dim(1) for i, (d, s) in enumerate(zip(dims, sized, strict=True))
    )
    expanded = b.emit("Expand", [mean, fixed], dims=expanded_dims, bound=b.bound[mean])
    t = tame(draw, b, t, TAME_LIMIT / 2)
    expanded = tame(draw, b, expanded, TAME_LIMIT / 2)
    return b.emit("Sub", [t, expanded], dims=dims, bound=b.bound[t] + b.bound[expanded])


def step_tile(draw: st.DrawFn, b: Builder, t: str) -> str | None:
    """Tile(t, Where(Equal(Range(0, rank, 1), axis), 2, 1)): double one axis."""
    dims = b.dims[t]
    if 2 * numel(dims) > MAX_ELEMENTS:
        return None
    axis = draw(st.integers(0, len(dims) - 1))
    if draw(st.booleans()):
        repeats = int_const(draw, b, [2 if i == axis else 1 for i in range(len(dims))])
    else:
        shape = b.emit("Shape", [t])
        if draw(st.booleans()):
            rank = b.emit("Size", [shape])
        else:
            rank = b.emit("Squeeze", [b.emit("Shape", [shape]), int_const(draw, b, [0])])
        positions = b.emit("Range", [int_const(draw, b, 0), rank, int_const(draw, b, 1)])
        hit = b.emit("Equal", [positions, int_const(draw, b, axis)])
        repeats = b.emit("Where", [hit, int_const(draw, b, 2), int_const(draw, b, 1)])
    new = dims[:axis] + (merge((Dim(2), dims[axis])),) + dims[axis + 1 :]
    return b.emit("Tile", [t, repeats], dims=new, bound=b.bound[t])


def step_slice(draw: st.DrawFn, b: Builder, t: str) -> str:
    """Slice(t, [start], Shape(t)[axis] - trim, [axis]) along one axis."""
    dims = b.dims[t]
    axis = draw(st.integers(0, len(dims) - 1))
    dim = dims[axis]
    start = draw(st.integers(0, 1)) if dim.size >= 2 else 0
    trim = draw(st.integers(0, 1)) if dim.size - start >= 2 else 0
    end = _shape_piece(draw, b, t, axis, axis + 1)
    if trim:
        end = b.emit("Sub", [end, int_const(draw, b, [trim])])
    spelled = axis - len(dims) if draw(st.booleans()) else axis
    inputs = [t, int_const(draw, b, [start]), end, int_const(draw, b, [spelled])]
    if draw(st.booleans()):
        inputs.append(int_const(draw, b, [1]))
    size = dim.size - start - trim
    new_dim = dim if size == dim.size else Dim(size, None if dim.label is None else b.fresh("sliced"))
    return b.emit("Slice", inputs, dims=dims[:axis] + (new_dim,) + dims[axis + 1 :], bound=b.bound[t])


def step_gather_range(draw: st.DrawFn, b: Builder, t: str) -> str:
    """Gather(t, Range(0, n, 1), axis) or Range(-1, -1 - n, -1) (a flip) along one axis."""
    dims = b.dims[t]
    axis = draw(st.integers(0, len(dims) - 1))
    n = _dim_scalar(draw, b, t, axis)
    if draw(st.booleans()):
        indices = b.emit("Range", [int_const(draw, b, 0), n, int_const(draw, b, 1)])
    else:  # [-1, ..., -n]: the spelling Range(n - 1, -1, -1) trips onnxruntime's GatherToSliceFusion
        stop = b.emit("Sub", [int_const(draw, b, -1), n])
        indices = b.emit("Range", [int_const(draw, b, -1), stop, int_const(draw, b, -1)])
    spelled = axis - len(dims) if draw(st.booleans()) else axis
    return b.emit("Gather", [t, indices], {"axis": spelled}, dims=dims, bound=b.bound[t])


def step_range_add(draw: st.DrawFn, b: Builder, t: str) -> str:
    """t + Range(0, n, 1) / n along the last axis (positional offsets in [0, 1))."""
    dims = b.dims[t]
    n = _dim_scalar(draw, b, t, len(dims) - 1)
    positions = b.emit("Range", [int_const(draw, b, 0), n, int_const(draw, b, 1)])
    numerator = b.emit("Cast", [positions], {"to": b.elem_type})
    denominator = b.emit("Cast", [n], {"to": b.elem_type})
    offsets = b.emit("Div", [numerator, denominator], dims=dims[-1:], bound=1.0)
    t = tame(draw, b, t, TAME_LIMIT - 1)
    return b.emit("Add", [t, offsets], dims=dims, bound=b.bound[t] + 1.0)


def step_fill_mul(draw: st.DrawFn, b: Builder, t: str) -> str:
    """t * ConstantOfShape(Shape(t)[start:], value): a dynamically shaped constant."""
    dims = b.dims[t]
    start = draw(st.integers(0, len(dims) - 1))
    whole = start == 0 and draw(st.booleans())
    shape = b.emit("Shape", [t]) if whole else _shape_piece(draw, b, t, start, len(dims))
    value = draw(st.sampled_from((0.5, 1.5, -1.0)))
    fill_value = numpy_helper.from_array(np.array([value], dtype=b.dtype))
    fill = b.emit("ConstantOfShape", [shape], {"value": fill_value}, dims=dims[start:], bound=abs(value))
    t = tame(draw, b, t, TAME_LIMIT / 1.5)
    return b.emit("Mul", [t, fill], dims=dims, bound=b.bound[t] * abs(value))


def step_unsqueeze(draw: st.DrawFn, b: Builder, t: str) -> str | None:
    """Squeeze(t, [axis]) of a static size-1 axis, or Unsqueeze(t, [axis])."""
    dims = b.dims[t]
    rank = len(dims)
    ones = [i for i, d in enumerate(dims) if d.is_one]
    if ones and rank > 1 and draw(st.booleans()):
        axis = draw(st.sampled_from(ones))
        axes = int_const(draw, b, [axis - rank if draw(st.booleans()) else axis])
        return b.emit("Squeeze", [t, axes], dims=dims[:axis] + dims[axis + 1 :], bound=b.bound[t])
    if rank >= MAX_RANK:
        return None
    axis = draw(st.integers(0, rank))
    axes = int_const(draw, b, [axis - rank - 1 if draw(st.booleans()) else axis])
    return b.emit("Unsqueeze", [t, axes], dims=dims[:axis] + (Dim(1),) + dims[axis:], bound=b.bound[t])


_Step = Callable[[st.DrawFn, Builder, str], "str | None"]
SHAPE_STEPS: tuple[_Step, ...] = (
    step_flatten,
    step_restore,
    step_expand,
    step_tile,
    step_slice,
    step_gather_range,
    step_range_add,
    step_fill_mul,
    step_unsqueeze,
    step_split,
)

RESHAPE_STEPS = (step_flatten, step_restore, step_split, step_flatten)  # extra weight in onnx_graphs
