"""Shared pieces of the `decompose-*` passes: the normalised axes of a norm op, dtype and stash-type
checks, and an emitter that appends primitive nodes valid at the graph's opset.

    ReduceMean(x){axes, keepdims=1}        before opset 18
    ReduceMean(x, axes: int64[]){keepdims=1}   from opset 18
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from passes.core import ir
from passes.infra.rewrite import RewriteContext

#: how `x^2` / `x^3` are spelled: `Mul(x, x)` chains or `Pow(x, n)`.
Powers = Literal["mul", "pow"]
#: how `d / s` is spelled: `Div(d, s)` or `Mul(d, Reciprocal(s))`.
Form = Literal["div", "reciprocal"]

#: ONNX element types the decompositions compute in (the norm ops' `T`, and valid stash types).
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
#: ReduceMean takes `axes` as an input from this opset on (an attribute before).
REDUCE_AXES_AS_INPUT = 18


@dataclass(frozen=True)
class NormAxes:
    """The axes `[start, rank)` a norm op reduces over, and the shape of a reduced tensor (1s there)."""

    axes: list[int]
    reduced_shape: list[Any]


def norm_axes(x: gs.Tensor, axis: int) -> NormAxes | str:
    """The normalised axes `[axis, rank)` of `x` (negative `axis` counts from the end), else why not."""
    if x.shape is None:
        return "rank of X is unknown"
    shape = list(x.shape)
    rank = len(shape)
    if not -rank <= axis < rank:
        return f"axis={axis} is out of range for X of rank {rank}"
    start = axis + rank if axis < 0 else axis
    return NormAxes(list(range(start, rank)), shape[:start] + [1] * (rank - start))


def float_type(tensor: gs.Tensor, label: str) -> int | str:
    """The tensor's floating-point ONNX element type, else why it has none."""
    elem = ir.elem_type(tensor)
    if elem is None:
        return f"dtype of {label} is unknown"
    if elem not in FLOAT_TYPES:
        return f"{label} is {type_name(elem)}, not a floating-point type"
    return elem


def stash_type(node: gs.Node) -> int | str:
    """The node's `stash_type` (default 1 = float32) when it is a floating-point type, else why not."""
    stash = int(node.attrs.get("stash_type", TensorProto.FLOAT))
    if stash not in FLOAT_TYPES:
        return f"stash_type={stash} is not a floating-point type"
    return stash


def np_dtype(elem: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def type_name(elem: int | None) -> str:
    """`float16`, `int64`, ... for an ONNX element type; `unknown` for None."""
    return "unknown" if elem is None else np_dtype(elem).name


def is_used(tensor: gs.Tensor, ctx: RewriteContext) -> bool:
    """A named tensor that some node reads or that is a graph output."""
    return bool(tensor.name) and (bool(tensor.outputs) or ctx.is_graph_output(tensor))


class Emitter:
    """Appends new nodes in topological order; each method returns the new node's output tensor."""

    def __init__(self, ctx: RewriteContext, base: str) -> None:
        self.ctx = ctx
        self.base = base
        self.nodes: list[gs.Node] = []
        self._axes: dict[tuple[int, ...], gs.Constant] = {}

    def op(self, op: str, inputs: Sequence[gs.Tensor], like: gs.Tensor, **attrs: Any) -> gs.Variable:
        """`op(inputs)` with an output of `like`'s dtype and shape."""
        return self.typed(op, inputs, like.dtype, like.shape, **attrs)

    def typed(
        self, op: str, inputs: Sequence[gs.Tensor], dtype: Any, shape: Sequence[Any] | None, **attrs: Any
    ) -> gs.Variable:
        out = self.ctx.variable(f"{self.base}/{op}", dtype, shape)
        self.nodes.append(self.ctx.node(op, inputs, [out], base=f"{self.base}/{op}", **attrs))
        return out

    def scalar(self, label: str, value: float, elem: int) -> gs.Constant:
        """A rank-0 constant `value` in element type `elem`."""
        return self.ctx.const(f"{self.base}/{label}", np.array(value, dtype=np_dtype(elem)))

    def cast(self, x: gs.Tensor, elem: int, from_elem: int) -> gs.Tensor:
        """`Cast(x, to=elem)`, or `x` itself when it already has that type."""
        if elem == from_elem:
            return x
        return self.typed("Cast", [x], np_dtype(elem), x.shape, to=elem)

    def power(self, x: gs.Tensor, exponent: int, elem: int, powers: Powers) -> gs.Tensor:
        """`x^exponent` as a chain of Muls or one Pow with an exponent of x's type."""
        if powers == "pow":
            return self.op("Pow", [x, self.scalar(f"exponent_{exponent}", exponent, elem)], x)
        result = x
        for _ in range(exponent - 1):
            result = self.op("Mul", [result, x], x)
        return result

    def reduce_mean(self, x: gs.Tensor, axes: NormAxes) -> gs.Variable:
        """`ReduceMean(x){keepdims=1}` over `axes`, spelled for the graph's opset."""
        if self.ctx.opset < REDUCE_AXES_AS_INPUT:
            return self.typed("ReduceMean", [x], x.dtype, axes.reduced_shape, axes=axes.axes, keepdims=1)
        key = tuple(axes.axes)
        if key not in self._axes:
            self._axes[key] = self.ctx.const(f"{self.base}/axes", np.array(axes.axes, dtype=np.int64))
        axes_input = self._axes[key]
        return self.typed("ReduceMean", [x, axes_input], x.dtype, axes.reduced_shape, keepdims=1)

    def divide(self, numerator: gs.Tensor, denominator: gs.Tensor, form: Form) -> tuple[gs.Tensor, gs.Tensor | None]:
        """`numerator / denominator` in `form`; also returns the Reciprocal when the form made one."""
        if form == "div":
            return self.op("Div", [numerator, denominator], numerator), None
        inverse = self.op("Reciprocal", [denominator], denominator)
        return self.op("Mul", [numerator, inverse], numerator), inverse
