"""Hypothesis strategies that generate small, valid, runnable ONNX graphs for property tests.

    @given(onnx_graphs())
    def test_pass(model): ... feeds shaped by test_dims(model) ...

`onnx_graphs` draws random DAGs rich in what the cleanup passes act on: Identity chains, duplicated
subexpressions, dead nodes, constant-only subtrees, Shape -> Gather -> Concat -> Reshape chains.
`shape_chain_graphs` draws exporter-style dynamic shape computations. Every model passes
`onnx.checker.check_model(m, full_check=True)` and runs in onnxruntime. Dims and value bounds are
tracked while drawing (never discovered by shape inference), so no intermediate overflows or divides
by ~0 for feeds within +-FEED_BOUND (standard-normal feeds, as `random_feeds` makes, qualify).
Symbolic input dims ("batch", "seq", ...) get concrete sizes recorded in `model.metadata_props`
under TEST_DIMS_KEY; read them back with `test_dims(model)`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = ["FEED_BOUND", "TEST_DIMS_KEY", "onnx_graphs", "shape_chain_graphs", "small_shapes", "test_dims"]

#: metadata_props key holding JSON {"input_name": [concrete dims]} for every graph input.
TEST_DIMS_KEY = "passes.test_dims"
#: value bounds assume every feed element lies within [-FEED_BOUND, FEED_BOUND].
FEED_BOUND = 4.0

_MIN_OPSET = 13
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_TAME_LIMIT = 16.0  # largest |value| any tensor may reach; bigger ones pass through Tanh/Sigmoid first
_MAX_ELEMENTS = 2048
_MAX_RANK = 5
_SYMBOLS = ("batch", "seq", "n", "m", "k", "len")
_INT64_MAX = int(np.iinfo(np.int64).max)
_SEEDS = st.integers(0, 2**32 - 1)
_UNARY_OPS = ("Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Exp")


@dataclass(frozen=True)
class _Dim:
    """One dimension: the concrete size used for feeds and a symbolic label (None when static).

    Labels are input symbols ("batch"), canonical products ("batch*seq*3") or opaque fresh names.
    """

    size: int
    label: str | None = None

    def same(self, other: _Dim) -> bool:
        """Equal for every binding of the symbols, not just the concrete one."""
        if self.label is None or other.label is None:
            return self.label is None and other.label is None and self.size == other.size
        return self.label == other.label

    @property
    def is_one(self) -> bool:
        return self.label is None and self.size == 1


_Dims = tuple[_Dim, ...]


def _broadcast(a: _Dims, b: _Dims) -> _Dims | None:
    """Numpy-style broadcast that only pairs identical dims or a static 1; None if incompatible."""
    out: list[_Dim] = []
    for x, y in itertools.zip_longest(reversed(a), reversed(b), fillvalue=_Dim(1)):
        if x.same(y) or y.is_one:
            out.append(x)
        elif x.is_one:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def _numel(dims: Sequence[_Dim]) -> int:
    return math.prod(d.size for d in dims)


def _merge(dims: Sequence[_Dim]) -> _Dim:
    """The single dim holding the product of `dims`, with a canonical product label."""
    tokens: list[str] = []
    factor = 1
    for dim in dims:
        if dim.label is None:
            factor *= dim.size
            continue
        for token in dim.label.split("*"):
            if token.isdigit():
                factor *= int(token)
            else:
                tokens.append(token)
    if not tokens:
        return _Dim(_numel(dims))
    return _Dim(_numel(dims), "*".join(sorted(tokens) + ([str(factor)] if factor != 1 else [])))


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


class _Builder:
    """Accumulates one graph and tracks each float tensor's dims and |value| bound.

    `pool` holds the float tensors later nodes may consume (dead outputs never enter it);
    `constants` the names computed from initializers/Constant nodes only; `computed` the names
    downstream of a real (non-Identity) op on a graph input; `consumed` the names some node reads.
    """

    def __init__(self, opset: int, dtype: np.dtype, seed: int) -> None:
        self.opset = opset
        self.dtype = dtype
        self.elem_type = helper.np_dtype_to_tensor_dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.dims: dict[str, _Dims] = {}
        self.bound: dict[str, float] = {}
        self.pool: list[str] = []
        self.constants: set[str] = set()
        self.computed: set[str] = set()
        self.consumed: set[str] = set()
        self.symbols: dict[str, int] = {}
        self.feed_dims: dict[str, list[int]] = {}
        self._counts: Counter[str] = Counter()

    def fresh(self, prefix: str) -> str:
        self._counts[prefix] += 1
        return f"{prefix}_{self._counts[prefix]}"

    def _register(self, name: str, dims: _Dims, bound: float, live: bool) -> None:
        self.dims[name] = dims
        self.bound[name] = bound
        if live:
            self.pool.append(name)

    def add_input(self, dims: _Dims) -> str:
        name = self.fresh("input")
        shape = [d.label or d.size for d in dims]
        self.inputs.append(helper.make_tensor_value_info(name, self.elem_type, shape))
        self.feed_dims[name] = [d.size for d in dims]
        self._register(name, dims, FEED_BOUND, live=True)
        return name

    def initializer(self, array: np.ndarray, *, live: bool = True) -> str:
        name = self.fresh("init")
        self.initializers.append(numpy_helper.from_array(array, name))
        self.constants.add(name)
        if array.dtype == self.dtype:
            dims = tuple(_Dim(s) for s in array.shape)
            self._register(name, dims, float(np.abs(array).max(initial=0.0)), live)
        return name

    def emit(
        self,
        op: str,
        inputs: Sequence[str],
        attrs: Mapping[str, Any] | None = None,
        *,
        dims: _Dims | None = None,
        bound: float = 1.0,
        live: bool = True,
    ) -> str:
        """Append one single-output node; float outputs pass `dims` and `bound`."""
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh(op), **(attrs or {})))
        if live:  # a dead node does not make its inputs consumed
            self.consumed.update(inputs)
        if all(i in self.constants for i in inputs):
            self.constants.add(out)
        elif op != "Identity" or any(i in self.computed for i in inputs):
            self.computed.add(out)
        if dims is not None:
            self._register(out, dims, bound, live)
        return out

    def duplicate(self, node: onnx.NodeProto) -> str:
        """Append a copy of `node` (same op, inputs, attributes) under fresh names."""
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        out = self.fresh(node.op_type.lower())
        copy.output[0] = out
        copy.name = self.fresh(node.op_type)
        self.nodes.append(copy)
        self.consumed.update(node.input)
        source = node.output[0]
        for group in (self.constants, self.computed):
            if source in group:
                group.add(out)
        self._register(out, self.dims[source], self.bound[source], live=True)
        return out

    def checkpoint(self) -> tuple[int, int, int]:
        return len(self.nodes), len(self.initializers), len(self.pool)

    def rollback(self, mark: tuple[int, int, int]) -> None:
        del self.nodes[mark[0] :], self.initializers[mark[1] :], self.pool[mark[2] :]

    def weights(self, shape: Sequence[int], scale: float, nonzero: bool = False) -> np.ndarray:
        """Uniform in [-scale, scale], or +-[0.5, 2] when `nonzero` (safe divisors)."""
        if nonzero:
            values = self.rng.uniform(0.5, 2.0, size=shape) * self.rng.choice([-1.0, 1.0], size=shape)
        else:
            values = self.rng.uniform(-scale, scale, size=shape)
        return np.asarray(values, dtype=self.dtype)

    def to_model(self, outputs: Sequence[str]) -> onnx.ModelProto:
        declared = [
            helper.make_tensor_value_info(name, self.elem_type, [self._declared(d) for d in self.dims[name]])
            for name in outputs
        ]
        graph = helper.make_graph(self.nodes, "generated", self.inputs, declared, self.initializers)
        opset_ids = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opset_ids, producer_name="passes.testing.strategies")
        model.ir_version = helper.find_min_ir_version_for(opset_ids)
        helper.set_model_props(model, {TEST_DIMS_KEY: json.dumps(self.feed_dims)})
        return model

    def _declared(self, dim: _Dim) -> int | str | None:
        """Static dims by value, input symbols by name, derived symbolic dims left unnamed."""
        if dim.label is None:
            return dim.size
        return dim.label if dim.label in self.symbols else None


# --- small drawing helpers ----------------------------------------------------------------------


def _pick(draw: st.DrawFn, b: _Builder, accept: Callable[[str], bool] = lambda _: True) -> str | None:
    """A live float tensor of rank >= 1 that satisfies `accept`, or None when there is none.
    Prefers unconsumed tensors, so that most nodes end up on a path to an output."""
    options = [n for n in b.pool if b.dims[n] and accept(n)]
    unconsumed = [n for n in options if n not in b.consumed]
    if unconsumed and draw(st.integers(0, 3)) > 0:
        options = unconsumed
    return draw(st.sampled_from(options)) if options else None


def _tame(draw: st.DrawFn, b: _Builder, name: str, limit: float) -> str:
    """`name` itself if its bound is within `limit`, else Tanh/Sigmoid of it."""
    if b.bound[name] <= limit:
        return name
    op = draw(st.sampled_from(("Tanh", "Sigmoid")))
    return b.emit(op, [name], dims=b.dims[name], bound=1.0)


def _int_const(draw: st.DrawFn, b: _Builder, values: int | Sequence[int]) -> str:
    """An int64 constant (a scalar for an int) as a Constant node or an initializer."""
    array = np.array(values, dtype=np.int64)
    if draw(st.booleans()):
        return b.emit("Constant", [], {"value": numpy_helper.from_array(array)})
    return b.initializer(array)


def _float_constant(b: _Builder, values: np.ndarray) -> str:
    dims = tuple(_Dim(s) for s in values.shape)
    bound = float(np.abs(values).max(initial=0.0))
    return b.emit("Constant", [], {"value": numpy_helper.from_array(values)}, dims=dims, bound=bound)


def _const_operand(
    draw: st.DrawFn, b: _Builder, shape: tuple[int, ...], *, scale: float = 1.0, nonzero: bool = False
) -> str:
    """A constant float tensor of `shape`, often a constant-only subtree (for fold-constants):
    Transpose/Reshape/Neg/Tanh of a weight, a sum of constants, |w| + 0.5. `nonzero` keeps every
    value within +-[0.5, 2]; otherwise values lie within +-scale."""
    kinds = ["initializer", "constant", "neg", "reshape"] + (["transpose"] if len(shape) >= 2 else [])
    kinds += ["abs_shift"] if nonzero else ["sum", "tanh"]
    kind = draw(st.sampled_from(kinds))
    dims = tuple(_Dim(s) for s in shape)
    if kind == "abs_shift":
        magnitude = b.emit("Abs", [b.initializer(b.weights(shape, 1.0))], dims=dims, bound=1.0)
        half = _float_constant(b, np.array(0.5, dtype=b.dtype))
        return b.emit("Add", [magnitude, half], dims=dims, bound=1.5)
    if kind == "sum":
        parts = [b.initializer(b.weights(shape, scale / 2)), _float_constant(b, b.weights(shape, scale / 2))]
        return b.emit("Add", parts, dims=dims, bound=scale)
    values = b.weights(shape, scale, nonzero)
    bound = 2.0 if nonzero else scale
    if kind == "initializer":
        return b.initializer(values)
    if kind == "constant":
        return _float_constant(b, values)
    if kind in ("neg", "tanh"):
        source = b.initializer(-values if kind == "neg" else values)
        return b.emit(kind.capitalize(), [source], dims=dims, bound=bound)
    if kind == "transpose":
        perm = draw(st.permutations(range(len(shape))))
        source = b.initializer(np.ascontiguousarray(values.transpose(np.argsort(perm))))
        return b.emit("Transpose", [source], {"perm": perm}, dims=dims, bound=bound)
    source = b.initializer(values.reshape(-1))
    return b.emit("Reshape", [source, _int_const(draw, b, list(shape))], dims=dims, bound=bound)


def _broadcastable_shape(draw: st.DrawFn, dims: _Dims) -> tuple[int, ...]:
    """A static shape that broadcasts onto `dims` without changing them (suffix, some dims 1)."""
    keep = draw(st.integers(0, len(dims)))
    return tuple(1 if d.label is not None or draw(st.booleans()) else d.size for d in dims[len(dims) - keep :])


def _emit_reduce_mean(draw: st.DrawFn, b: _Builder, t: str, axes: Sequence[int], keepdims: int) -> str:
    """ReduceMean over `axes`: an attribute before opset 18, an input from 18."""
    dims = b.dims[t]
    spelled = [a - len(dims) if draw(st.booleans()) else a for a in axes]
    out = tuple(_Dim(1) if i in axes else d for i, d in enumerate(dims) if keepdims or i not in axes)
    attrs: dict[str, Any] = {"keepdims": keepdims}
    inputs = [t]
    if b.opset >= 18:
        inputs.append(_int_const(draw, b, spelled))
    else:
        attrs["axes"] = spelled
    return b.emit("ReduceMean", inputs, attrs, dims=out, bound=b.bound[t])


# --- shape-tensor helpers (exporter idioms) ------------------------------------------------------


def _start_spellings(start: int, rank: int) -> list[int]:
    return [start, start - rank] + ([-rank - 3] if start == 0 else [])


def _end_spellings(end: int, rank: int) -> list[int]:
    return [end, end - rank] if end < rank else [end, rank + 3, _INT64_MAX]


def _concat_ints(b: _Builder, pieces: Sequence[str]) -> str:
    return pieces[0] if len(pieces) == 1 else b.emit("Concat", pieces, {"axis": 0})


def _maybe_cast(draw: st.DrawFn, b: _Builder, name: str) -> str:
    """`name`, a no-op Cast to int64, or an int32 round trip (exporters emit all three)."""
    choice = draw(st.sampled_from(("none", "int64", "int32")))
    if choice == "none":
        return name
    if choice == "int32":
        name = b.emit("Cast", [name], {"to": TensorProto.INT32})
    return b.emit("Cast", [name], {"to": TensorProto.INT64})


def _shape_with_attrs(draw: st.DrawFn, b: _Builder, t: str, start: int, end: int) -> str:
    """Shape(t, start, end) (opset >= 15), spelled with negative or out-of-range bounds at times."""
    rank = len(b.dims[t])
    first = draw(st.sampled_from([*_start_spellings(start, rank), *([None] if start == 0 else [])]))
    last = draw(st.sampled_from([*_end_spellings(end, rank), *([None] if end == rank else [])]))
    attrs = {key: value for key, value in (("start", first), ("end", last)) if value is not None}
    return b.emit("Shape", [t], attrs)


def _shape_piece(draw: st.DrawFn, b: _Builder, t: str, start: int, end: int, *, per_dim: bool = True) -> str:
    """A 1-D int64 tensor holding the sizes dims[start:end] of `t` (0 <= start < end <= rank)."""
    rank = len(b.dims[t])
    ways = ["gather", "slice"] + (["per_dim"] if per_dim else []) + (["attrs"] if b.opset >= 15 else [])
    way = draw(st.sampled_from(ways))
    if way == "attrs":
        return _maybe_cast(draw, b, _shape_with_attrs(draw, b, t, start, end))
    if way == "per_dim":
        zero = _int_const(draw, b, [0])
        dims = [b.emit("Unsqueeze", [_dim_scalar(draw, b, t, i), zero]) for i in range(start, end)]
        return _concat_ints(b, dims)
    shape = b.emit("Shape", [t])
    if way == "slice":
        starts = _int_const(draw, b, [draw(st.sampled_from(_start_spellings(start, rank)))])
        ends = _int_const(draw, b, [draw(st.sampled_from(_end_spellings(end, rank)))])
        extra = [_int_const(draw, b, [0]), _int_const(draw, b, [1])] if draw(st.booleans()) else []
        return _maybe_cast(draw, b, b.emit("Slice", [shape, starts, ends, *extra]))
    indices = [i - rank if draw(st.booleans()) else i for i in range(start, end)]
    return _maybe_cast(draw, b, b.emit("Gather", [shape, _int_const(draw, b, indices)]))


def _dim_scalar(draw: st.DrawFn, b: _Builder, t: str, axis: int) -> str:
    """A 0-d int64 tensor holding the size of `t` along `axis`."""
    rank = len(b.dims[t])
    if draw(st.booleans()):
        index = axis - rank if draw(st.booleans()) else axis
        return b.emit("Gather", [b.emit("Shape", [t]), _int_const(draw, b, index)])
    piece = _shape_piece(draw, b, t, axis, axis + 1, per_dim=False)
    return b.emit("Squeeze", [piece, _int_const(draw, b, [0])])


# --- shape-chain steps: (draw, builder, float tensor) -> new float tensor, or None if not applicable


def _step_flatten(draw: st.DrawFn, b: _Builder, t: str) -> str | None:
    """Reshape(t, Concat(Shape(t)[:keep], [-1])): merge the trailing dims (keep == rank: append 1)."""
    dims = b.dims[t]
    if len(dims) >= _MAX_RANK:
        return None
    keep = draw(st.integers(1, len(dims)))
    target = _concat_ints(b, [_shape_piece(draw, b, t, 0, keep), _int_const(draw, b, [-1])])
    return b.emit("Reshape", [t, target], dims=dims[:keep] + (_merge(dims[keep:]),), bound=b.bound[t])


def _step_split(draw: st.DrawFn, b: _Builder, t: str) -> str | None:
    """Reshape(t, Concat(Shape(t)[:axis], [p, size/p], Shape(t)[axis+1:])): split a static dim."""
    dims = b.dims[t]
    axes = [i for i, d in enumerate(dims) if d.label is None and len(_prime_factors(d.size)) > 1]
    if not axes or len(dims) >= _MAX_RANK:
        return None
    axis = draw(st.sampled_from(axes))
    p = _prime_factors(dims[axis].size)[0]
    rest = dims[axis].size // p
    pieces = [_shape_piece(draw, b, t, 0, axis)] if axis else []
    pieces.append(_int_const(draw, b, [p, -1 if draw(st.booleans()) else rest]))
    if axis + 1 < len(dims):
        pieces.append(_shape_piece(draw, b, t, axis + 1, len(dims)))
    new = dims[:axis] + (_Dim(p), _Dim(rest)) + dims[axis + 1 :]
    return b.emit("Reshape", [t, _concat_ints(b, pieces)], dims=new, bound=b.bound[t])


def _step_restore(draw: st.DrawFn, b: _Builder, t: str) -> str | None:
    """Reshape(t, Shape(u)) for an earlier tensor u with the same element count."""
    size = _merge(b.dims[t])
    options = [u for u in b.pool if b.dims[u] and b.dims[u] != b.dims[t] and _merge(b.dims[u]).same(size)]
    if not options:
        return None
    u = draw(st.sampled_from(options))
    whole = draw(st.booleans())
    target = b.emit("Shape", [u]) if whole else _shape_piece(draw, b, u, 0, len(b.dims[u]))
    return b.emit("Reshape", [t, target], dims=b.dims[u], bound=b.bound[t])


def _step_expand(draw: st.DrawFn, b: _Builder, t: str) -> str:
    """t - Expand(ReduceMean(t), Where(Equal(target, -1), 1, target)): torch's expand(-1, ...)."""
    dims = b.dims[t]
    axes = sorted(draw(st.lists(st.integers(0, len(dims) - 1), min_size=1, max_size=len(dims), unique=True)))
    mean = _emit_reduce_mean(draw, b, t, axes, keepdims=1)
    sized = [draw(st.booleans()) for _ in dims]
    pieces = [_shape_piece(draw, b, t, i, i + 1) if s else _int_const(draw, b, [-1]) for i, s in enumerate(sized)]
    target = _concat_ints(b, pieces)
    one = numpy_helper.from_array(np.array([1], dtype=np.int64))
    ones = b.emit("ConstantOfShape", [b.emit("Shape", [target])], {"value": one})
    is_free = b.emit("Equal", [target, _int_const(draw, b, -1)])
    fixed = b.emit("Where", [is_free, ones, target])
    expanded_dims = tuple(
        d if s or i not in axes else _Dim(1) for i, (d, s) in enumerate(zip(dims, sized, strict=True))
    )
    expanded = b.emit("Expand", [mean, fixed], dims=expanded_dims, bound=b.bound[mean])
    t = _tame(draw, b, t, _TAME_LIMIT / 2)
    expanded = _tame(draw, b, expanded, _TAME_LIMIT / 2)
    return b.emit("Sub", [t, expanded], dims=dims, bound=b.bound[t] + b.bound[expanded])


def _step_tile(draw: st.DrawFn, b: _Builder, t: str) -> str | None:
    """Tile(t, Where(Equal(Range(0, rank, 1), axis), 2, 1)): double one axis."""
    dims = b.dims[t]
    if 2 * _numel(dims) > _MAX_ELEMENTS:
        return None
    axis = draw(st.integers(0, len(dims) - 1))
    if draw(st.booleans()):
        repeats = _int_const(draw, b, [2 if i == axis else 1 for i in range(len(dims))])
    else:
        shape = b.emit("Shape", [t])
        if draw(st.booleans()):
            rank = b.emit("Size", [shape])
        else:
            rank = b.emit("Squeeze", [b.emit("Shape", [shape]), _int_const(draw, b, [0])])
        positions = b.emit("Range", [_int_const(draw, b, 0), rank, _int_const(draw, b, 1)])
        hit = b.emit("Equal", [positions, _int_const(draw, b, axis)])
        repeats = b.emit("Where", [hit, _int_const(draw, b, 2), _int_const(draw, b, 1)])
    new = dims[:axis] + (_merge((_Dim(2), dims[axis])),) + dims[axis + 1 :]
    return b.emit("Tile", [t, repeats], dims=new, bound=b.bound[t])


def _step_slice(draw: st.DrawFn, b: _Builder, t: str) -> str:
    """Slice(t, [start], Shape(t)[axis] - trim, [axis]) along one axis."""
    dims = b.dims[t]
    axis = draw(st.integers(0, len(dims) - 1))
    dim = dims[axis]
    start = draw(st.integers(0, 1)) if dim.size >= 2 else 0
    trim = draw(st.integers(0, 1)) if dim.size - start >= 2 else 0
    end = _shape_piece(draw, b, t, axis, axis + 1)
    if trim:
        end = b.emit("Sub", [end, _int_const(draw, b, [trim])])
    spelled = axis - len(dims) if draw(st.booleans()) else axis
    inputs = [t, _int_const(draw, b, [start]), end, _int_const(draw, b, [spelled])]
    if draw(st.booleans()):
        inputs.append(_int_const(draw, b, [1]))
    size = dim.size - start - trim
    new_dim = dim if size == dim.size else _Dim(size, None if dim.label is None else b.fresh("sliced"))
    return b.emit("Slice", inputs, dims=dims[:axis] + (new_dim,) + dims[axis + 1 :], bound=b.bound[t])


def _step_gather_range(draw: st.DrawFn, b: _Builder, t: str) -> str:
    """Gather(t, Range(0, n, 1), axis) or Range(-1, -1 - n, -1) (a flip) along one axis."""
    dims = b.dims[t]
    axis = draw(st.integers(0, len(dims) - 1))
    n = _dim_scalar(draw, b, t, axis)
    if draw(st.booleans()):
        indices = b.emit("Range", [_int_const(draw, b, 0), n, _int_const(draw, b, 1)])
    else:  # [-1, ..., -n]: the spelling Range(n - 1, -1, -1) trips onnxruntime's GatherToSliceFusion
        stop = b.emit("Sub", [_int_const(draw, b, -1), n])
        indices = b.emit("Range", [_int_const(draw, b, -1), stop, _int_const(draw, b, -1)])
    spelled = axis - len(dims) if draw(st.booleans()) else axis
    return b.emit("Gather", [t, indices], {"axis": spelled}, dims=dims, bound=b.bound[t])


def _step_range_add(draw: st.DrawFn, b: _Builder, t: str) -> str:
    """t + Range(0, n, 1) / n along the last axis (positional offsets in [0, 1))."""
    dims = b.dims[t]
    n = _dim_scalar(draw, b, t, len(dims) - 1)
    positions = b.emit("Range", [_int_const(draw, b, 0), n, _int_const(draw, b, 1)])
    numerator = b.emit("Cast", [positions], {"to": b.elem_type})
    denominator = b.emit("Cast", [n], {"to": b.elem_type})
    offsets = b.emit("Div", [numerator, denominator], dims=dims[-1:], bound=1.0)
    t = _tame(draw, b, t, _TAME_LIMIT - 1)
    return b.emit("Add", [t, offsets], dims=dims, bound=b.bound[t] + 1.0)


def _step_fill_mul(draw: st.DrawFn, b: _Builder, t: str) -> str:
    """t * ConstantOfShape(Shape(t)[start:], value): a dynamically shaped constant."""
    dims = b.dims[t]
    start = draw(st.integers(0, len(dims) - 1))
    whole = start == 0 and draw(st.booleans())
    shape = b.emit("Shape", [t]) if whole else _shape_piece(draw, b, t, start, len(dims))
    value = draw(st.sampled_from((0.5, 1.5, -1.0)))
    fill_value = numpy_helper.from_array(np.array([value], dtype=b.dtype))
    fill = b.emit("ConstantOfShape", [shape], {"value": fill_value}, dims=dims[start:], bound=abs(value))
    t = _tame(draw, b, t, _TAME_LIMIT / 1.5)
    return b.emit("Mul", [t, fill], dims=dims, bound=b.bound[t] * abs(value))


def _step_unsqueeze(draw: st.DrawFn, b: _Builder, t: str) -> str | None:
    """Squeeze(t, [axis]) of a static size-1 axis, or Unsqueeze(t, [axis])."""
    dims = b.dims[t]
    rank = len(dims)
    ones = [i for i, d in enumerate(dims) if d.is_one]
    if ones and rank > 1 and draw(st.booleans()):
        axis = draw(st.sampled_from(ones))
        axes = _int_const(draw, b, [axis - rank if draw(st.booleans()) else axis])
        return b.emit("Squeeze", [t, axes], dims=dims[:axis] + dims[axis + 1 :], bound=b.bound[t])
    if rank >= _MAX_RANK:
        return None
    axis = draw(st.integers(0, rank))
    axes = _int_const(draw, b, [axis - rank - 1 if draw(st.booleans()) else axis])
    return b.emit("Unsqueeze", [t, axes], dims=dims[:axis] + (_Dim(1),) + dims[axis:], bound=b.bound[t])


_Step = Callable[[st.DrawFn, _Builder, str], "str | None"]
_SHAPE_STEPS: tuple[_Step, ...] = (
    _step_flatten,
    _step_restore,
    _step_expand,
    _step_tile,
    _step_slice,
    _step_gather_range,
    _step_range_add,
    _step_fill_mul,
    _step_unsqueeze,
    _step_split,
)

_RESHAPE_STEPS = (_step_flatten, _step_restore, _step_split, _step_flatten)  # extra weight in onnx_graphs


# --- node families for onnx_graphs: (draw, builder) -> None ------------------------------------


def _emit_unary(draw: st.DrawFn, b: _Builder, t: str) -> str:
    op = draw(st.sampled_from(_UNARY_OPS))
    if op == "Exp":
        t = _tame(draw, b, t, 2.0)
        bound = math.exp(b.bound[t])
    else:
        bound = 1.0 if op in ("Sigmoid", "Tanh") else b.bound[t]
    return b.emit(op, [t], dims=b.dims[t], bound=bound)


def _draw_unary(draw: st.DrawFn, b: _Builder) -> None:
    """Relu/Neg/Abs/Sigmoid/Tanh, or Exp of a bounded input."""
    if (t := _pick(draw, b)) is not None:
        _emit_unary(draw, b, t)


def _draw_binary(draw: st.DrawFn, b: _Builder) -> None:
    """Add/Sub/Mul of a tensor with a broadcast-compatible tensor or constant."""
    if (x := _pick(draw, b)) is None:
        return
    op = draw(st.sampled_from(("Add", "Sub", "Mul")))
    fits = [n for n in b.pool if (out := _broadcast(b.dims[x], b.dims[n])) and _numel(out) <= _MAX_ELEMENTS]
    if draw(st.booleans()) and fits:
        y = draw(st.sampled_from(fits))
    else:
        y = _const_operand(draw, b, _broadcastable_shape(draw, b.dims[x]))
    limit = 4.0 if op == "Mul" else _TAME_LIMIT / 2
    x, y = _tame(draw, b, x, limit), _tame(draw, b, y, limit)
    dims = _broadcast(b.dims[x], b.dims[y])
    assert dims is not None
    bound = b.bound[x] * b.bound[y] if op == "Mul" else b.bound[x] + b.bound[y]
    b.emit(op, [y, x] if draw(st.booleans()) else [x, y], dims=dims, bound=bound)


def _draw_div(draw: st.DrawFn, b: _Builder) -> None:
    """Div by a constant whose values lie within +-[0.5, 2]."""
    if (x := _pick(draw, b)) is None:
        return
    x = _tame(draw, b, x, _TAME_LIMIT / 2)
    divisor = _const_operand(draw, b, _broadcastable_shape(draw, b.dims[x]), nonzero=True)
    b.emit("Div", [x, divisor], dims=b.dims[x], bound=2 * b.bound[x])


def _draw_identity(draw: st.DrawFn, b: _Builder) -> None:
    """A chain of 1-3 Identity nodes; every link stays consumable."""
    if (t := _pick(draw, b)) is None:
        return
    for _ in range(draw(st.integers(1, 3))):
        t = b.emit("Identity", [t], dims=b.dims[t], bound=b.bound[t])


def _draw_duplicate(draw: st.DrawFn, b: _Builder) -> None:
    """Repeat an earlier node on the same inputs (for CSE), often adding the two copies."""
    options = [i for i, node in enumerate(b.nodes) if node.output[0] in b.dims]
    if not options:
        return
    node = b.nodes[draw(st.sampled_from(options))]
    original, copy = node.output[0], b.duplicate(node)
    if draw(st.booleans()):
        first, second = _tame(draw, b, original, _TAME_LIMIT / 2), _tame(draw, b, copy, _TAME_LIMIT / 2)
        b.emit("Add", [first, second], dims=b.dims[copy], bound=b.bound[first] + b.bound[second])


def _draw_dead(draw: st.DrawFn, b: _Builder) -> None:
    """Nodes (or an initializer) whose outputs nobody uses (for DCE)."""
    kind = draw(st.sampled_from(("node", "chain", "initializer", "constant")))
    if kind == "initializer":
        b.initializer(b.weights((draw(st.integers(1, 4)),), 1.0), live=False)
        return
    if kind == "constant":
        b.emit("Constant", [], {"value": numpy_helper.from_array(b.weights((2,), 1.0))}, dims=(_Dim(2),), live=False)
        return
    if (t := _pick(draw, b)) is None:
        return
    for _ in range(1 if kind == "node" else 2):
        op = draw(st.sampled_from(("Relu", "Neg", "Abs", "Sigmoid")))
        t = b.emit(op, [t], dims=b.dims[t], bound=b.bound[t], live=False)


def _draw_matmul(draw: st.DrawFn, b: _Builder) -> None:
    """MatMul by a constant [K, N] weight scaled by 1/K, so the output bound equals the input's."""
    if (x := _pick(draw, b, lambda n: b.dims[n][-1].label is None)) is None:
        return
    k = b.dims[x][-1].size
    out = b.dims[x][:-1] + (_Dim(draw(st.integers(1, 5))),)
    if _numel(out) <= _MAX_ELEMENTS:
        weight = _const_operand(draw, b, (k, out[-1].size), scale=1.0 / k)
        b.emit("MatMul", [x, weight], dims=out, bound=b.bound[x])


def _factorize(draw: st.DrawFn, n: int, max_parts: int) -> list[int]:
    parts = [1] * draw(st.integers(1, max_parts))
    for p in _prime_factors(n):
        parts[draw(st.integers(0, len(parts) - 1))] *= p
    return parts


def _draw_reshape(draw: st.DrawFn, b: _Builder) -> None:
    """Reshape by a constant shape; 0 copies a leading dim, -1 stands for at most one symbolic dim."""
    if (x := _pick(draw, b)) is None:
        return
    dims = b.dims[x]
    labeled = [i for i, d in enumerate(dims) if d.label is not None]
    prefix = draw(st.integers(labeled[-2] + 1 if len(labeled) >= 2 else 0, len(dims)))
    free = [d for d in dims[prefix:] if d.label is not None]
    static = _numel([d for d in dims[prefix:] if d.label is None])
    factors = _factorize(draw, static, max(1, _MAX_RANK - prefix - len(free)))
    target = [0] * prefix + factors
    out = list(dims[:prefix]) + [_Dim(f) for f in factors]
    if free:
        position = draw(st.integers(prefix, len(target)))
        target.insert(position, -1)
        out.insert(position, free[0])
    elif draw(st.booleans()):
        target[draw(st.integers(prefix, len(target) - 1))] = -1
    b.emit("Reshape", [x, _int_const(draw, b, target)], dims=tuple(out), bound=b.bound[x])


def _draw_transpose(draw: st.DrawFn, b: _Builder) -> None:
    if (x := _pick(draw, b, lambda n: len(b.dims[n]) >= 2)) is None:
        return
    perm = draw(st.permutations(range(len(b.dims[x]))))
    reverse = perm == list(reversed(range(len(perm))))
    attrs = {} if reverse and draw(st.booleans()) else {"perm": perm}
    b.emit("Transpose", [x], attrs, dims=tuple(b.dims[x][p] for p in perm), bound=b.bound[x])


def _concat_partner(draw: st.DrawFn, b: _Builder, dims: _Dims, axis: int) -> str:
    """A tensor that may be concatenated with `dims` along `axis` (often the same one again)."""
    if all(d.label is None for d in dims) and draw(st.booleans()):
        shape = [d.size for d in dims]
        shape[axis] = draw(st.integers(1, 3))
        return _const_operand(draw, b, tuple(shape))

    def fits(n: str) -> bool:
        other = b.dims[n]
        if len(other) != len(dims) or other[axis].label is not None:
            return False
        return all(o.same(d) for i, (o, d) in enumerate(zip(other, dims, strict=True)) if i != axis)

    return draw(st.sampled_from([n for n in b.pool if fits(n)]))


def _draw_concat(draw: st.DrawFn, b: _Builder) -> None:
    """Concat along a static axis with itself, a matching tensor or a constant."""
    if (x := _pick(draw, b, lambda n: any(d.label is None for d in b.dims[n]))) is None:
        return
    dims = b.dims[x]
    axis = draw(st.sampled_from([i for i, d in enumerate(dims) if d.label is None]))
    parts = [x] + [_concat_partner(draw, b, dims, axis) for _ in range(draw(st.integers(1, 2)))]
    out = dims[:axis] + (_Dim(sum(b.dims[p][axis].size for p in parts)),) + dims[axis + 1 :]
    if _numel(out) <= _MAX_ELEMENTS:
        spelled = axis - len(dims) if draw(st.booleans()) else axis
        b.emit("Concat", parts, {"axis": spelled}, dims=out, bound=max(b.bound[p] for p in parts))


def _draw_softmax(draw: st.DrawFn, b: _Builder) -> None:
    if (x := _pick(draw, b)) is None:
        return
    axis = draw(st.integers(-len(b.dims[x]), len(b.dims[x]) - 1))
    attrs = {} if axis == -1 and draw(st.booleans()) else {"axis": axis}
    b.emit("Softmax", [x], attrs, dims=b.dims[x], bound=1.0)


def _draw_reduce_mean(draw: st.DrawFn, b: _Builder) -> None:
    if (x := _pick(draw, b)) is None:
        return
    rank = len(b.dims[x])
    axes = sorted(draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True)))
    keepdims = 1 if len(axes) == rank else int(draw(st.booleans()))
    _emit_reduce_mean(draw, b, x, axes, keepdims)


def _draw_shape_chain(draw: st.DrawFn, b: _Builder) -> None:
    """Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape (or another shape step) on a tensor."""
    if (t := _pick(draw, b)) is not None:
        draw(st.sampled_from(_RESHAPE_STEPS + _SHAPE_STEPS))(draw, b, t) or _step_flatten(draw, b, t)


_Family = Callable[[st.DrawFn, _Builder], None]
_FAMILIES: tuple[_Family, ...] = (  # repeats weight the draw
    _draw_unary,
    _draw_binary,
    _draw_identity,
    _draw_duplicate,
    _draw_dead,
    _draw_shape_chain,
    _draw_unary,
    _draw_identity,
    _draw_div,
    _draw_matmul,
    _draw_reshape,
    _draw_transpose,
    _draw_concat,
    _draw_softmax,
    _draw_reduce_mean,
    _draw_shape_chain,
    _draw_duplicate,
)


# --- inputs, outputs and the public strategies ---------------------------------------------------


def _label_dim(draw: st.DrawFn, b: _Builder, size: int) -> _Dim:
    """`size` under a symbol: one already bound to `size`, or a fresh one."""
    options = [s for s, v in b.symbols.items() if v == size]
    options += [s for s in _SYMBOLS if s not in b.symbols][:1]
    if not options:
        return _Dim(size)
    label = draw(st.sampled_from(options))
    b.symbols[label] = size
    return _Dim(size, label)


def _label_dims(draw: st.DrawFn, b: _Builder, shape: Sequence[int], dynamic: bool) -> _Dims:
    return tuple(_label_dim(draw, b, s) if dynamic and draw(st.booleans()) else _Dim(s) for s in shape)


def _draw_inputs(draw: st.DrawFn, b: _Builder, dynamic: bool) -> None:
    """1-3 inputs: the first from small_shapes, others the same, broadcastable or independent."""
    first = _label_dims(draw, b, draw(small_shapes()), dynamic)
    b.add_input(first)
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("same", "broadcast", "fresh")))
        if kind == "same":
            dims = first
        elif kind == "broadcast":
            tail = first[len(first) - draw(st.integers(1, len(first))) :]
            dims = tuple(_Dim(1) if draw(st.booleans()) else d for d in tail)
        else:
            dims = _label_dims(draw, b, draw(small_shapes()), dynamic)
        b.add_input(dims)


def _ancestors(b: _Builder, name: str) -> set[int]:
    """Indices of the nodes `name` depends on."""
    producer = {out: i for i, node in enumerate(b.nodes) for out in node.output}
    found: set[int] = set()
    stack = [name]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in found:
            found.add(index)
            stack.extend(b.nodes[index].input)
    return found


def _draw_outputs(draw: st.DrawFn, b: _Builder, max_nodes: int) -> list[str]:
    """1-2 outputs among tensors downstream of a real computation, preferring unconsumed ones."""
    candidates = [n for n in b.pool if n in b.computed]
    if not candidates:
        source = draw(st.sampled_from([i.name for i in b.inputs]))
        op = draw(st.sampled_from(_UNARY_OPS[:-1]))  # not Exp: it may need a Tanh first
        candidates = [b.emit(op, [source], dims=b.dims[source], bound=b.bound[source])]
    options = [n for n in candidates if n not in b.consumed] or candidates
    options.sort(key=lambda n: -len(_ancestors(b, n)))  # the largest subgraphs first
    outputs = options[: draw(st.integers(1, 2))]
    others = [n for n in candidates if n != outputs[0]]
    if draw(st.booleans()) and others:  # at times an inner tensor that other nodes also read
        outputs = [outputs[0], draw(st.sampled_from(others))]
    for index, name in enumerate(outputs):
        if len(b.nodes) < max_nodes and draw(st.booleans()):
            outputs[index] = b.emit("Identity", [name], dims=b.dims[name], bound=b.bound[name])
    return outputs


@st.composite
def _onnx_graph(
    draw: st.DrawFn, max_nodes: int, opsets: tuple[int, ...], dtypes: tuple[np.dtype, ...], dynamic: bool
) -> onnx.ModelProto:
    b = _Builder(draw(st.sampled_from(opsets)), draw(st.sampled_from(dtypes)), draw(_SEEDS))
    _draw_inputs(draw, b, dynamic)
    target = draw(st.integers((max_nodes - 1) // 2, max_nodes - 1))
    for _ in range(2 * max_nodes):
        if len(b.nodes) >= target:
            break
        mark = b.checkpoint()
        draw(st.sampled_from(_FAMILIES))(draw, b)
        if len(b.nodes) > max_nodes - 1:  # one node stays reserved for the output stage
            b.rollback(mark)
    return b.to_model(_draw_outputs(draw, b, max_nodes))


@st.composite
def _shape_chain_graph(draw: st.DrawFn, opsets: tuple[int, ...]) -> onnx.ModelProto:
    b = _Builder(draw(st.sampled_from(opsets)), np.dtype(np.float32), draw(_SEEDS))
    shape = draw(small_shapes(min_rank=2, max_rank=4))
    dims = list(_label_dims(draw, b, shape, True))
    if all(d.label is None for d in dims):
        dims[0] = _label_dim(draw, b, shape[0])
    current = first = b.add_input(tuple(dims))
    for _ in range(draw(st.integers(1, 5))):
        current = draw(st.sampled_from(_SHAPE_STEPS))(draw, b, current) or current
    if current == first:
        current = _step_fill_mul(draw, b, current)
    outputs = [current]
    earlier = [n for n in b.pool if n in b.computed and n != current]
    if draw(st.booleans()) and earlier:
        outputs.append(draw(st.sampled_from(earlier)))
    return b.to_model(outputs)


def _checked_opsets(opsets: Sequence[int]) -> tuple[int, ...]:
    newest = onnx.defs.onnx_opset_version()
    bad = [o for o in opsets if not _MIN_OPSET <= o <= newest]
    if not opsets or bad:
        raise ValueError(f"opsets must be a non-empty selection of {_MIN_OPSET}..{newest}, got {list(opsets)}")
    return tuple(opsets)


def small_shapes(*, min_rank: int = 1, max_rank: int = 4, max_dim: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    """Static shapes of rank min_rank..max_rank with every dim in 1..max_dim."""
    if not 0 <= min_rank <= max_rank or max_dim < 1:
        raise ValueError(f"need 0 <= min_rank <= max_rank and max_dim >= 1, got {min_rank}, {max_rank}, {max_dim}")
    return st.lists(st.integers(1, max_dim), min_size=min_rank, max_size=max_rank).map(tuple)


def onnx_graphs(
    *,
    max_nodes: int = 12,
    opsets: Sequence[int] = (13, 17, 18),
    dtypes: Sequence[npt.DTypeLike] = (np.float32,),
    allow_dynamic: bool = True,
) -> st.SearchStrategy[onnx.ModelProto]:
    """Random DAGs of at most `max_nodes` nodes over 1-3 float inputs (one dtype per graph), rich in
    Identity chains, duplicated subexpressions, dead nodes, constant-only subtrees and shape chains,
    with 1-2 outputs that each depend on a real computation. Symbolic dims only if `allow_dynamic`."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, got {max_nodes}")
    chosen = tuple(np.dtype(d) for d in dtypes)
    if not chosen or any(d not in _FLOAT_DTYPES for d in chosen):
        raise ValueError(f"dtypes must be a non-empty selection of float32/float64, got {list(dtypes)}")
    return _onnx_graph(max_nodes, _checked_opsets(opsets), chosen, allow_dynamic)


def shape_chain_graphs(*, opsets: Sequence[int] = (13, 17, 18)) -> st.SearchStrategy[onnx.ModelProto]:
    """Float32 graphs dominated by exporter-style shape computations on one input with symbolic
    dims: Shape(start, end), Gather, Slice, Concat, (Un)Squeeze, Cast, Range, ConstantOfShape,
    Equal/Where feeding Reshape, Expand, Tile, Slice and Gather of the input."""
    return _shape_chain_graph(_checked_opsets(opsets))


def test_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The concrete input dims a generated model was drawn with ({} when it records none)."""
    for entry in model.metadata_props:
        if entry.key == TEST_DIMS_KEY:
            return {name: [int(d) for d in dims] for name, dims in json.loads(entry.value).items()}
    return {}


test_dims.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name
