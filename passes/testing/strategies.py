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

This module holds the node families and the public strategies; the graph builder lives in
`passes.testing._graph_builder`, the shape-chain steps in `passes.testing._shape_steps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import onnx
from hypothesis import strategies as st
from onnx import numpy_helper

from passes.testing._graph_builder import (
    FEED_BOUND,
    MAX_ELEMENTS,
    MAX_RANK,
    TAME_LIMIT,
    TEST_DIMS_KEY,
    Builder,
    Dim,
    Dims,
    broadcast,
    broadcastable_shape,
    const_operand,
    emit_reduce_mean,
    factorize,
    int_const,
    numel,
    pick,
    tame,
)
from passes.testing._shape_steps import RESHAPE_STEPS, SHAPE_STEPS, step_fill_mul, step_flatten

__all__ = ["FEED_BOUND", "TEST_DIMS_KEY", "onnx_graphs", "shape_chain_graphs", "small_shapes", "test_dims"]

_MIN_OPSET = 13
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_SYMBOLS = ("batch", "seq", "n", "m", "k", "len")
_SEEDS = st.integers(0, 2**32 - 1)
_UNARY_OPS = ("Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Exp")


# --- node families for onnx_graphs: (draw, builder) -> None ------------------------------------


def _emit_unary(draw: st.DrawFn, b: Builder, t: str) -> str:
    op = draw(st.sampled_from(_UNARY_OPS))
    if op == "Exp":
        t = tame(draw, b, t, 2.0)
        bound = math.exp(b.bound[t])
    else:
        bound = 1.0 if op in ("Sigmoid", "Tanh") else b.bound[t]
    return b.emit(op, [t], dims=b.dims[t], bound=bound)


def _draw_unary(draw: st.DrawFn, b: Builder) -> None:
    """Relu/Neg/Abs/Sigmoid/Tanh, or Exp of a bounded input."""
    if (t := pick(draw, b)) is not None:
        _emit_unary(draw, b, t)


def _draw_binary(draw: st.DrawFn, b: Builder) -> None:
    """Add/Sub/Mul of a tensor with a broadcast-compatible tensor or constant."""
    if (x := pick(draw, b)) is None:
        return
    op = draw(st.sampled_from(("Add", "Sub", "Mul")))
    fits = [n for n in b.pool if (out := broadcast(b.dims[x], b.dims[n])) and numel(out) <= MAX_ELEMENTS]
    if draw(st.booleans()) and fits:
        y = draw(st.sampled_from(fits))
    else:
        y = const_operand(draw, b, broadcastable_shape(draw, b.dims[x]))
    limit = 4.0 if op == "Mul" else TAME_LIMIT / 2
    x, y = tame(draw, b, x, limit), tame(draw, b, y, limit)
    dims = broadcast(b.dims[x], b.dims[y])
    assert dims is not None
    bound = b.bound[x] * b.bound[y] if op == "Mul" else b.bound[x] + b.bound[y]
    b.emit(op, [y, x] if draw(st.booleans()) else [x, y], dims=dims, bound=bound)


def _draw_div(draw: st.DrawFn, b: Builder) -> None:
    """Div by a constant whose values lie within +-[0.5, 2]."""
    if (x := pick(draw, b)) is None:
        return
    x = tame(draw, b, x, TAME_LIMIT / 2)
    divisor = const_operand(draw, b, broadcastable_shape(draw, b.dims[x]), nonzero=True)
    b.emit("Div", [x, divisor], dims=b.dims[x], bound=2 * b.bound[x])


def _draw_identity(draw: st.DrawFn, b: Builder) -> None:
    """A chain of 1-3 Identity nodes; every link stays consumable."""
    if (t := pick(draw, b)) is None:
        return
    for _ in range(draw(st.integers(1, 3))):
        t = b.emit("Identity", [t], dims=b.dims[t], bound=b.bound[t])


def _draw_duplicate(draw: st.DrawFn, b: Builder) -> None:
    """Repeat an earlier node on the same inputs (for CSE), often adding the two copies."""
    options = [i for i, node in enumerate(b.nodes) if node.output[0] in b.dims]
    if not options:
        return
    node = b.nodes[draw(st.sampled_from(options))]
    original, copy = node.output[0], b.duplicate(node)
    if draw(st.booleans()):
        first, second = tame(draw, b, original, TAME_LIMIT / 2), tame(draw, b, copy, TAME_LIMIT / 2)
        b.emit("Add", [first, second], dims=b.dims[copy], bound=b.bound[first] + b.bound[second])


def _draw_dead(draw: st.DrawFn, b: Builder) -> None:
    """Nodes (or an initializer) whose outputs nobody uses (for DCE)."""
    kind = draw(st.sampled_from(("node", "chain", "initializer", "constant")))
    if kind == "initializer":
        b.initializer(b.weights((draw(st.integers(1, 4)),), 1.0), live=False)
        return
    if kind == "constant":
        b.emit("Constant", [], {"value": numpy_helper.from_array(b.weights((2,), 1.0))}, dims=(Dim(2),), live=False)
        return
    if (t := pick(draw, b)) is None:
        return
    for _ in range(1 if kind == "node" else 2):
        op = draw(st.sampled_from(("Relu", "Neg", "Abs", "Sigmoid")))
        t = b.emit(op, [t], dims=b.dims[t], bound=b.bound[t], live=False)


def _draw_matmul(draw: st.DrawFn, b: Builder) -> None:
    """MatMul by a constant [K, N] weight scaled by 1/K, so the output bound equals the input's."""
    if (x := pick(draw, b, lambda n: b.dims[n][-1].label is None)) is None:
        return
    k = b.dims[x][-1].size
    out = b.dims[x][:-1] + (Dim(draw(st.integers(1, 5))),)
    if numel(out) <= MAX_ELEMENTS:
        weight = const_operand(draw, b, (k, out[-1].size), scale=1.0 / k)
        b.emit("MatMul", [x, weight], dims=out, bound=b.bound[x])


def _draw_reshape(draw: st.DrawFn, b: Builder) -> None:
    """Reshape by a constant shape; 0 copies a leading dim, -1 stands for at most one symbolic dim."""
    if (x := pick(draw, b)) is None:
        return
    dims = b.dims[x]
    labeled = [i for i, d in enumerate(dims) if d.label is not None]
    prefix = draw(st.integers(labeled[-2] + 1 if len(labeled) >= 2 else 0, len(dims)))
    free = [d for d in dims[prefix:] if d.label is not None]
    static = numel([d for d in dims[prefix:] if d.label is None])
    factors = factorize(draw, static, max(1, MAX_RANK - prefix - len(free)))
    target = [0] * prefix + factors
    out = list(dims[:prefix]) + [Dim(f) for f in factors]
    if free:
        position = draw(st.integers(prefix, len(target)))
        target.insert(position, -1)
        out.insert(position, free[0])
    elif draw(st.booleans()):
        target[draw(st.integers(prefix, len(target) - 1))] = -1
    b.emit("Reshape", [x, int_const(draw, b, target)], dims=tuple(out), bound=b.bound[x])


def _draw_transpose(draw: st.DrawFn, b: Builder) -> None:
    if (x := pick(draw, b, lambda n: len(b.dims[n]) >= 2)) is None:
        return
    perm = draw(st.permutations(range(len(b.dims[x]))))
    reverse = perm == list(reversed(range(len(perm))))
    attrs = {} if reverse and draw(st.booleans()) else {"perm": perm}
    b.emit("Transpose", [x], attrs, dims=tuple(b.dims[x][p] for p in perm), bound=b.bound[x])


def _concat_partner(draw: st.DrawFn, b: Builder, dims: Dims, axis: int) -> str:
    """A tensor that may be concatenated with `dims` along `axis` (often the same one again)."""
    if all(d.label is None for d in dims) and draw(st.booleans()):
        shape = [d.size for d in dims]
        shape[axis] = draw(st.integers(1, 3))
        return const_operand(draw, b, tuple(shape))

    def fits(n: str) -> bool:
        other = b.dims[n]
        if len(other) != len(dims) or other[axis].label is not None:
            return False
        return all(o.same(d) for i, (o, d) in enumerate(zip(other, dims, strict=True)) if i != axis)

    return draw(st.sampled_from([n for n in b.pool if fits(n)]))


def _draw_concat(draw: st.DrawFn, b: Builder) -> None:
    """Concat along a static axis with itself, a matching tensor or a constant."""
    if (x := pick(draw, b, lambda n: any(d.label is None for d in b.dims[n]))) is None:
        return
    dims = b.dims[x]
    axis = draw(st.sampled_from([i for i, d in enumerate(dims) if d.label is None]))
    parts = [x] + [_concat_partner(draw, b, dims, axis) for _ in range(draw(st.integers(1, 2)))]
    out = dims[:axis] + (Dim(sum(b.dims[p][axis].size for p in parts)),) + dims[axis + 1 :]
    if numel(out) <= MAX_ELEMENTS:
        spelled = axis - len(dims) if draw(st.booleans()) else axis
        b.emit("Concat", parts, {"axis": spelled}, dims=out, bound=max(b.bound[p] for p in parts))


def _draw_softmax(draw: st.DrawFn, b: Builder) -> None:
    if (x := pick(draw, b)) is None:
        return
    axis = draw(st.integers(-len(b.dims[x]), len(b.dims[x]) - 1))
    attrs = {} if axis == -1 and draw(st.booleans()) else {"axis": axis}
    b.emit("Softmax", [x], attrs, dims=b.dims[x], bound=1.0)


def _draw_reduce_mean(draw: st.DrawFn, b: Builder) -> None:
    if (x := pick(draw, b)) is None:
        return
    rank = len(b.dims[x])
    axes = sorted(draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True)))
    keepdims = 1 if len(axes) == rank else int(draw(st.booleans()))
    emit_reduce_mean(draw, b, x, axes, keepdims)


def _draw_shape_chain(draw: st.DrawFn, b: Builder) -> None:
    """Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape (or another shape step) on a tensor."""
    if (t := pick(draw, b)) is not None:
        draw(st.sampled_from(RESHAPE_STEPS + SHAPE_STEPS))(draw, b, t) or step_flatten(draw, b, t)


_Family = Callable[[st.DrawFn, Builder], None]
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


def _label_dim(draw: st.DrawFn, b: Builder, size: int) -> Dim:
    """`size` under a symbol: one already bound to `size`, or a fresh one."""
    options = [s for s, v in b.symbols.items() if v == size]
    options += [s for s in _SYMBOLS if s not in b.symbols][:1]
    if not options:
        return Dim(size)
    label = draw(st.sampled_from(options))
    b.symbols[label] = size
    return Dim(size, label)


def _label_dims(draw: st.DrawFn, b: Builder, shape: Sequence[int], dynamic: bool) -> Dims:
    return tuple(_label_dim(draw, b, s) if dynamic and draw(st.booleans()) else Dim(s) for s in shape)


def _draw_inputs(draw: st.DrawFn, b: Builder, dynamic: bool) -> None:
    """1-3 inputs: the first from small_shapes, others the same, broadcastable or independent."""
    first = _label_dims(draw, b, draw(small_shapes()), dynamic)
    b.add_input(first)
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("same", "broadcast", "fresh")))
        if kind == "same":
            dims = first
        elif kind == "broadcast":
            tail = first[len(first) - draw(st.integers(1, len(first))) :]
            dims = tuple(Dim(1) if draw(st.booleans()) else d for d in tail)
        else:
            dims = _label_dims(draw, b, draw(small_shapes()), dynamic)
        b.add_input(dims)


def _draw_outputs(draw: st.DrawFn, b: Builder, max_nodes: int) -> list[str]:
    """1-2 outputs among tensors downstream of a real computation, preferring unconsumed ones."""
    candidates = [n for n in b.pool if n in b.computed]
    if not candidates:
        source = draw(st.sampled_from([i.name for i in b.inputs]))
        op = draw(st.sampled_from(_UNARY_OPS[:-1]))  # not Exp: it may need a Tanh first
        candidates = [b.emit(op, [source], dims=b.dims[source], bound=b.bound[source])]
    options = [n for n in candidates if n not in b.consumed] or candidates
    options.sort(key=lambda n: -len(b.ancestors(n)))  # the largest subgraphs first
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
    b = Builder(draw(st.sampled_from(opsets)), draw(st.sampled_from(dtypes)), draw(_SEEDS))
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
    b = Builder(draw(st.sampled_from(opsets)), np.dtype(np.float32), draw(_SEEDS))
    shape = draw(small_shapes(min_rank=2, max_rank=4))
    dims = list(_label_dims(draw, b, shape, True))
    if all(d.label is None for d in dims):
        dims[0] = _label_dim(draw, b, shape[0])
    current = first = b.add_input(tuple(dims))
    for _ in range(draw(st.integers(1, 5))):
        current = draw(st.sampled_from(SHAPE_STEPS))(draw, b, current) or current
    if current == first:
        current = step_fill_mul(draw, b, current)
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
