"""The graph builder behind `passes.testing.strategies`: symbolic dims, `Builder` and basic emit helpers.

`Dim` pairs a concrete size with a symbolic label; `Builder` accumulates one graph while tracking
every float tensor's dims and |value| bound; the helpers below it draw and emit small building
blocks (tamed operands, int64 constants, constant-only float subtrees, ReduceMean).
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
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper

#: metadata_props key holding JSON {"input_name": [concrete dims]} for every graph input.
TEST_DIMS_KEY = "passes.test_dims"
#: value bounds assume every feed element lies within [-FEED_BOUND, FEED_BOUND].
FEED_BOUND = 4.0

TAME_LIMIT = 16.0  # largest |value| any tensor may reach; bigger ones pass through Tanh/Sigmoid first
MAX_ELEMENTS = 2048
MAX_RANK = 5


@dataclass(frozen=True)
class Dim:
    """One dimension: the concrete size used for feeds and a symbolic label (None when static).

    Labels are input symbols ("batch"), canonical products ("batch*seq*3") or opaque fresh names.
    """

    size: int
    label: str | None = None

    def same(self, other: Dim) -> bool:
        """Equal for every binding of the symbols, not just the concrete one."""
        if self.label is None or other.label is None:
            return self.label is None and other.label is None and self.size == other.size
        return self.label == other.label

    @property
    def is_one(self) -> bool:
        return self.label is None and self.size == 1


Dims = tuple[Dim, ...]


def broadcast(a: Dims, b: Dims) -> Dims | None:
    """Numpy-style broadcast that only pairs identical dims or a static 1; None if incompatible."""
    out: list[Dim] = []
    for x, y in itertools.zip_longest(reversed(a), reversed(b), fillvalue=Dim(1)):
        if x.same(y) or y.is_one:
            out.append(x)
        elif x.is_one:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def numel(dims: Sequence[Dim]) -> int:
    return math.prod(d.size for d in dims)


def merge(dims: Sequence[Dim]) -> Dim:
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
        return Dim(numel(dims))
    return Dim(numel(dims), "*".join(sorted(tokens) + ([str(factor)] if factor != 1 else [])))


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def factorize(draw: st.DrawFn, n: int, max_parts: int) -> list[int]:
    """`n` as a product of 1..max_parts factors (some may be 1), drawn at random."""
    parts = [1] * draw(st.integers(1, max_parts))
    for p in prime_factors(n):
        parts[draw(st.integers(0, len(parts) - 1))] *= p
    return parts


class Builder:
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
        self.dims: dict[str, Dims] = {}
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

    def _register(self, name: str, dims: Dims, bound: float, live: bool) -> None:
        self.dims[name] = dims
        self.bound[name] = bound
        if live:
            self.pool.append(name)

    def add_input(self, dims: Dims) -> str:
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
            dims = tuple(Dim(s) for s in array.shape)
            self._register(name, dims, float(np.abs(array).max(initial=0.0)), live)
        return name

    def emit(
        self,
        op: str,
        inputs: Sequence[str],
        attrs: Mapping[str, Any] | None = None,
        *,
        dims: Dims | None = None,
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

    def ancestors(self, name: str) -> set[int]:
        """Indices of the nodes `name` depends on."""
        producer = {out: i for i, node in enumerate(self.nodes) for out in node.output}
        found: set[int] = set()
        stack = [name]
        while stack:
            index = producer.get(stack.pop())
            if index is not None and index not in found:
                found.add(index)
                stack.extend(self.nodes[index].input)
        return found

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

    def _declared(self, dim: Dim) -> int | str | None:
        """Static dims by value, input symbols by name, derived symbolic dims left unnamed."""
        if dim.label is None:
            return dim.size
        return dim.label if dim.label in self.symbols else None


# --- small drawing helpers ----------------------------------------------------------------------


def pick(draw: st.DrawFn, b: Builder, accept: Callable[[str], bool] = lambda _: True) -> str | None:
    """A live float tensor of rank >= 1 that satisfies `accept`, or None when there is none.
    Prefers unconsumed tensors, so that most nodes end up on a path to an output."""
    options = [n for n in b.pool if b.dims[n] and accept(n)]
    unconsumed = [n for n in options if n not in b.consumed]
    if unconsumed and draw(st.integers(0, 3)) > 0:
        options = unconsumed
    return draw(st.sampled_from(options)) if options else None


def tame(draw: st.DrawFn, b: Builder, name: str, limit: float) -> str:
    """`name` itself if its bound is within `limit`, else Tanh/Sigmoid of it."""
    if b.bound[name] <= limit:
        return name
    op = draw(st.sampled_from(("Tanh", "Sigmoid")))
    return b.emit(op, [name], dims=b.dims[name], bound=1.0)


def int_const(draw: st.DrawFn, b: Builder, values: int | Sequence[int]) -> str:
    """An int64 constant (a scalar for an int) as a Constant node or an initializer."""
    array = np.array(values, dtype=np.int64)
    if draw(st.booleans()):
        return b.emit("Constant", [], {"value": numpy_helper.from_array(array)})
    return b.initializer(array)


def _float_constant(b: Builder, values: np.ndarray) -> str:
    dims = tuple(Dim(s) for s in values.shape)
    bound = float(np.abs(values).max(initial=0.0))
    return b.emit("Constant", [], {"value": numpy_helper.from_array(values)}, dims=dims, bound=bound)


def const_operand(
    draw: st.DrawFn, b: Builder, shape: tuple[int, ...], *, scale: float = 1.0, nonzero: bool = False
) -> str:
    """A constant float tensor of `shape`, often a constant-only subtree (for fold-constants):
    Transpose/Reshape/Neg/Tanh of a weight, a sum of constants, |w| + 0.5. `nonzero` keeps every
    value within +-[0.5, 2]; otherwise values lie within +-scale."""
    kinds = ["initializer", "constant", "neg", "reshape"] + (["transpose"] if len(shape) >= 2 else [])
    kinds += ["abs_shift"] if nonzero else ["sum", "tanh"]
    kind = draw(st.sampled_from(kinds))
    dims = tuple(Dim(s) for s in shape)
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
    return b.emit("Reshape", [source, int_const(draw, b, list(shape))], dims=dims, bound=bound)


def broadcastable_shape(draw: st.DrawFn, dims: Dims) -> tuple[int, ...]:
    """A static shape that broadcasts onto `dims` without changing them (suffix, some dims 1)."""
    keep = draw(st.integers(0, len(dims)))
    return tuple(1 if d.label is not None or draw(st.booleans()) else d.size for d in dims[len(dims) - keep :])


def emit_reduce_mean(draw: st.DrawFn, b: Builder, t: str, axes: Sequence[int], keepdims: int) -> str:
    """ReduceMean over `axes`: an attribute before opset 18, an input from 18."""
    dims = b.dims[t]
    spelled = [a - len(dims) if draw(st.booleans()) else a for a in axes]
    out = tuple(Dim(1) if i in axes else d for i, d in enumerate(dims) if keepdims or i not in axes)
    attrs: dict[str, Any] = {"keepdims": keepdims}
    inputs = [t]
    if b.opset >= 18:
        inputs.append(int_const(draw, b, spelled))
    else:
        attrs["axes"] = spelled
    return b.emit("ReduceMean", inputs, attrs, dims=out, bound=b.bound[t])
