"""Matching helpers shared by the fusion passes (fuse-layer-norm, fuse-rms-norm, fuse-gelu).

Exporters spell a normalisation as `numerator / sqrt(mean(square) + eps)` in three ways
(`Div(n, Sqrt)`, `Mul(n, Reciprocal(Sqrt))`, `Mul(n, Div(1, Sqrt))`), square as `Pow(s, 2)` or
`Mul(s, s)`, give ReduceMean its axes as an attribute (opset < 18) or an int64 input (opset >= 18),
and wrap the reduction in `Cast(float32) ... Cast(back)` for fp16 models. `match_standardized`
reads all of those; `NormRule` adds the affine stages (`Cast` back, `Mul(scale)`, `Add(bias)`, either
operand order) around a core that a subclass parses, and proves the fused op equal before it fires.

Fused ops need a recent opset (LayerNormalization 17, Gelu 20, RMSNormalization 23): see
`_opset_bump.run_fusion`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from passes.core import ir
from passes.core.ir import elem_type
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule
from passes.transforms._norm_helpers import (  # noqa: F401 (re-exported for the fusion passes)
    absorb_constants, close_to, is_constant, is_parameter, rank, reduce_axes, scalar_constant, trailing_count, type_name,
)

FLOAT = TensorProto.FLOAT
#: input types whose `Cast(float32) -> norm -> Cast(back)` the fused op reproduces with stash_type=1.
STASHABLE = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT)


@dataclass
class Standardized:
    """`numerator / sqrt(ReduceMean(square(squared)) + epsilon)` as matched."""

    numerator: gs.Tensor
    squared: gs.Tensor
    reduce: gs.Node
    epsilon: gs.Tensor | None
    exponent: gs.Tensor | None  # Pow's exponent; None when squared as Mul(s, s)
    nodes: list[gs.Node]


def _inverse_sqrt(tensor: gs.Tensor, ctx: RewriteContext) -> tuple[gs.Node, list[gs.Node]] | None:
    """`Reciprocal(Sqrt(v))` or `Div(1, Sqrt(v))`: the Sqrt node and the nodes around it."""
    inverse = ctx.producer(tensor, ("Reciprocal", "Div"))
    if inverse is None:
        return None
    if inverse.op == "Div":
        one = scalar_constant(ctx, inverse.inputs[0], rank(inverse.inputs[1]))
        if one is None or float(one.reshape(-1)[0]) != 1.0:
            return None
    sqrt = ctx.producer(inverse.inputs[-1], "Sqrt")
    return (sqrt, [inverse, sqrt]) if sqrt is not None else None


def _sqrt_of(tensor: gs.Tensor, ctx: RewriteContext) -> tuple[gs.Tensor, gs.Node, list[gs.Node]] | None:
    """The numerator, the Sqrt node and the division nodes of `tensor = numerator / Sqrt(.)`."""
    node = ir.producer(tensor)
    if node is None or not ir.is_default_domain(node):
        return None
    if node.op == "Div":
        sqrt = ctx.producer(node.inputs[1], "Sqrt")
        return (node.inputs[0], sqrt, [node, sqrt]) if sqrt is not None else None
    if node.op == "Mul":
        for numerator, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            found = _inverse_sqrt(other, ctx)
            if found is not None:
                return numerator, found[0], [node, *found[1]]
    return None


def match_standardized(tensor: gs.Tensor, ctx: RewriteContext) -> Standardized | None:
    """`tensor = n / sqrt(mean(s^2) + eps)` in any exporter spelling, or None."""
    found = _sqrt_of(tensor, ctx)
    if found is None:
        return None
    numerator, sqrt, nodes = found
    variance, epsilon = sqrt.inputs[0], None
    add = ctx.producer(variance, "Add")
    if add is not None:
        pairs = ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0]))
        variance, epsilon = next(((v, e) for v, e in pairs if ctx.producer(v, "ReduceMean")), (None, None))
        if variance is None:
            return None
        nodes.append(add)
    reduce = ctx.producer(variance, "ReduceMean")
    square = ctx.producer(reduce.inputs[0], ("Pow", "Mul")) if reduce is not None else None
    if square is None:
        return None
    if square.op == "Mul" and square.inputs[0] is not square.inputs[1]:
        return None
    exponent = square.inputs[1] if square.op == "Pow" else None
    return Standardized(numerator, square.inputs[0], reduce, epsilon, exponent, [*nodes, reduce, square])


# -- scale and bias -----------------------------------------------------------------------------
def fit_parameter(
    tensor: gs.Tensor, ctx: RewriteContext, role: str, norm_shape: list[int], of_rank: int, elem: int
) -> str | None:
    """Why `tensor` cannot be the fused op's `role` (scale/bias) for inputs normalised over
    `norm_shape`, or None. It must broadcast onto the normalised dims only, never over leading axes."""
    value = ctx.constant(tensor)
    shape = list(value.shape) if value is not None else (list(tensor.shape) if tensor.shape is not None else None)
    if shape is None:
        return f"{role} shape is unknown"
    kind = elem_type(tensor) if value is None else int(onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
    if kind != elem:
        return f"{role} type {type_name(kind)} is not the input type {type_name(elem)}"
    k = len(norm_shape)
    if len(shape) > of_rank or any(d != 1 for d in shape[: max(0, len(shape) - k)]):
        return f"{role} of shape {shape} broadcasts over leading axes"
    tail = [1] * max(0, k - len(shape)) + shape[-k:]
    if any(t not in (1, n) for t, n in zip(tail, norm_shape)):
        return f"{role} of shape {shape} does not broadcast to the normalised shape {norm_shape}"
    if value is None and shape != norm_shape:
        return f"{role} input of shape {shape} is not the normalised shape {norm_shape}"
    return None


def fused_parameter(tensor: gs.Tensor, ctx: RewriteContext, norm_shape: list[int]) -> gs.Tensor:
    """The parameter as the fused op takes it: exactly `norm_shape` (an initializer is reused)."""
    if not is_constant(tensor):
        return tensor  # a graph input, already of the normalised shape
    if isinstance(tensor, gs.Constant) and list(tensor.shape) == norm_shape:
        return tensor
    value = ctx.constant(tensor)
    k = len(norm_shape)
    trailing = [1] * max(0, k - value.ndim) + list(value.shape)[-k:]
    tail = value.reshape(trailing)  # leading dims are all 1 (fit_parameter checked)
    return ctx.const("fused_param", np.ascontiguousarray(np.broadcast_to(tail, norm_shape)))


# -- the normalisation rule --------------------------------------------------------------------
@dataclass
class NormCore:
    """The normalisation without its affine stages: `x` is the tensor normalised (a Cast output
    in the fp16 idiom), `reductions` every ReduceMean that must reduce the trailing axes."""

    x: gs.Tensor
    standardized: Standardized
    reductions: list[gs.Node]
    nodes: list[gs.Node]
    problem: str | None = None  # a refusal the core parser found (LayerNorm: Subs with two means)


@dataclass
class NormParts:
    core: NormCore
    stages: dict[str, tuple[gs.Node, gs.Tensor | None]] = field(default_factory=dict)  # stage -> (node, param)


@dataclass(frozen=True)
class NormPlan:
    """What the fused op gets, once the match is proven equal."""

    x: gs.Tensor
    axis: int
    epsilon: float
    norm_shape: list[int]
    elem: int


def _closing_in_cast(core: NormCore, back: int | None, inside: set[int], ctx: RewriteContext) -> gs.Node | bool:
    """For a Cast back to `back` after the core: the `Cast(x, to=float32)` before it that the pattern
    takes in (so the fused op reads `x`), False when no such Cast closes the pair, True when the Cast
    back is an identity and nothing needs taking in. A Cast read outside the pattern (TorchScript
    reuses a no-op `.to(float32)` as the residual) is taken in only when it is not an identity."""
    cast = ctx.producer(core.x, "Cast")
    source = elem_type(cast.inputs[0]) if cast is not None and cast.attrs.get("to") == FLOAT else None
    private = cast is not None and not ctx.is_graph_output(core.x) and all(id(c) in inside for c in core.x.outputs)
    if back == elem_type(core.x):  # back to float32: take in only an identity Cast that nothing else reads
        return cast if source == FLOAT and private else True
    return cast if source == back and back in STASHABLE and private else False


def _in_cast(parts: NormParts, ctx: RewriteContext) -> gs.Node | None:
    """The Cast before the core that the match takes in, if any (see `_closing_in_cast`)."""
    if "cast" not in parts.stages:
        return None
    inside = {id(n) for n in parts.core.nodes} | {id(n) for n, _ in parts.stages.values()}
    found = _closing_in_cast(parts.core, parts.stages["cast"][0].attrs.get("to"), inside, ctx)
    return found if isinstance(found, gs.Node) else None


def _scalar_value(ctx: RewriteContext, tensor: gs.Tensor, of_rank: int, what: str) -> float | str:
    if not is_constant(tensor):
        return f"{what} is not a constant"
    value = scalar_constant(ctx, tensor, of_rank)
    if value is None:
        return f"{what} is not a scalar"
    return float(value.reshape(-1)[0])


class NormRule(RewriteRule):
    """`[Add(.., bias)] <- [Mul(.., scale)] <- [Cast back] <- core`, the core parsed by a subclass.

    A match that its anchor's only consumer would extend (a Cast back, a scale, a bias) defers to
    that consumer, so the whole normalisation fuses at once, or is refused as a whole."""

    fused_op: ClassVar[str]
    with_bias: ClassVar[bool]

    def __init__(self, opset_refusal: str | None = None) -> None:
        self.opset_refusal = opset_refusal  # set when the graph's opset lacks the fused op

    @abc.abstractmethod
    def parse_core(self, tensor: gs.Tensor, ctx: RewriteContext) -> NormCore | None:
        """The core whose output is `tensor`, or None."""

    @property
    def stages(self) -> tuple[str, ...]:
        return ("bias", "scale", "cast") if self.with_bias else ("scale", "cast")

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        parts = self._peel(anchor.outputs[0], ctx, self.stages)
        if parts is None or self._defers(anchor, parts, ctx):
            return None
        nodes = [*parts.core.nodes, *(node for node, _ in parts.stages.values())]
        in_cast = _in_cast(parts, ctx)
        nodes += [in_cast] if in_cast is not None else []
        return Match(anchor, nodes + absorb_constants(nodes, ctx), {"parts": parts})

    def _peel(self, tensor: gs.Tensor, ctx: RewriteContext, stages: tuple[str, ...]) -> NormParts | None:
        node = ir.producer(tensor)
        if node is not None and ir.is_default_domain(node):
            for index, stage in enumerate(stages):
                for inner, param in self._splits(stage, node, ctx):
                    parts = self._peel(inner, ctx, stages[index + 1:])
                    if parts is not None:
                        parts.stages[stage] = (node, param)
                        return parts
        core = self.parse_core(tensor, ctx)
        return NormParts(core) if core is not None else None

    @staticmethod
    def _splits(stage: str, node: gs.Node, ctx: RewriteContext) -> Iterator[tuple[gs.Tensor, gs.Tensor | None]]:
        if stage == "cast" and node.op == "Cast":
            yield node.inputs[0], None
        elif (stage, node.op) in (("bias", "Add"), ("scale", "Mul")):
            a, b = node.inputs
            for inner, param in ((a, b), (b, a)):
                if is_parameter(param, ctx) and not is_parameter(inner, ctx):
                    yield inner, param

    def _defers(self, anchor: gs.Node, parts: NormParts, ctx: RewriteContext) -> bool:
        out = anchor.outputs[0]
        if ctx.is_graph_output(out) or len(out.outputs) != 1:
            return False
        consumer = out.outputs[0]
        present = [s for s in self.stages if s in parts.stages]
        open_stages = self.stages[: self.stages.index(present[0])] if present else self.stages
        if not ir.is_default_domain(consumer):
            return False
        if consumer.op == "Cast" and "cast" in open_stages:  # only a Cast back to the input type
            inside = {id(n) for n in parts.core.nodes}
            return _closing_in_cast(parts.core, consumer.attrs.get("to"), inside, ctx) is not False
        role = {"Mul": "scale", "Add": "bias"}.get(consumer.op)
        if role not in open_stages:
            return False
        others = [t for t in consumer.inputs if t is not out]
        if len(others) != 1 or not is_parameter(others[0], ctx):
            return False
        plan = self.analyse(parts, ctx)
        if isinstance(plan, str) or is_constant(others[0]):
            return True  # a constant right after the norm is its scale/bias: fuse it or say why not
        return fit_parameter(others[0], ctx, role, plan.norm_shape, len(plan.x.shape), plan.elem) is None

    def analyse(self, parts: NormParts, ctx: RewriteContext) -> NormPlan | str:
        """The fused op's inputs and attributes, or why the match is not provably equal."""
        core = parts.core
        if core.problem is not None:
            return core.problem
        of_rank = rank(core.x)
        if of_rank is None:
            return "rank of the input is unknown"
        all_axes: list[list[int]] = []
        for reduce in core.reductions:
            if int(reduce.attrs.get("keepdims", 1)) == 0:
                return "keepdims=0"
            axes = reduce_axes(reduce, ctx, of_rank)
            if isinstance(axes, str):
                return axes
            all_axes.append(axes)
        if any(axes != all_axes[0] for axes in all_axes):
            return f"the ReduceMeans reduce different axes ({' and '.join(map(str, all_axes))})"
        k = trailing_count(all_axes[0], of_rank)
        if k is None:
            return f"reduction axes {all_axes[0]} are not the trailing axes"
        std = core.standardized
        epsilon = 0.0 if std.epsilon is None else _scalar_value(ctx, std.epsilon, of_rank, "epsilon")
        if isinstance(epsilon, str):
            return epsilon
        if std.exponent is not None:
            exponent = _scalar_value(ctx, std.exponent, of_rank, "Pow exponent")
            if isinstance(exponent, str) or exponent != 2.0:
                return exponent if isinstance(exponent, str) else f"Pow exponent is {exponent:g}, not 2"
        return self._plan(parts, ctx, k, epsilon)

    def _plan(self, parts: NormParts, ctx: RewriteContext, k: int, epsilon: float) -> NormPlan | str:
        core, in_cast = parts.core, _in_cast(parts, ctx)
        if elem_type(core.x) != FLOAT:
            return f"the normalisation is computed in {type_name(elem_type(core.x))}, not float32"
        x = in_cast.inputs[0] if in_cast is not None else core.x
        elem = elem_type(x)
        if "cast" in parts.stages and (parts.stages["cast"][0].attrs.get("to") != elem or elem not in STASHABLE):
            return f"the Casts around the normalisation are not {type_name(elem)} -> float32 -> {type_name(elem)}"
        norm_shape = list(core.x.shape[-k:])
        if not all(isinstance(d, (int, np.integer)) for d in norm_shape):
            return f"normalised dims {norm_shape} are not static"
        norm_shape = [int(d) for d in norm_shape]
        for role in ("scale", "bias"):
            if role in parts.stages:
                param = parts.stages[role][1]
                assert param is not None
                reason = fit_parameter(param, ctx, role, norm_shape, len(core.x.shape), elem)  # type: ignore[arg-type]
                if reason is not None:
                    return reason
        return NormPlan(x, -k, epsilon, norm_shape, elem)  # type: ignore[arg-type]

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        plan = self.analyse(match["parts"], ctx)
        return plan if isinstance(plan, str) else self.opset_refusal

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        parts: NormParts = match["parts"]
        plan = self.analyse(parts, ctx)
        assert isinstance(plan, NormPlan)
        if "scale" in parts.stages:
            scale = fused_parameter(parts.stages["scale"][1], ctx, plan.norm_shape)  # type: ignore[arg-type]
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(plan.elem)
            scale = ctx.const("ones", np.ones(plan.norm_shape, dtype=dtype))
        inputs = [plan.x, scale]
        if "bias" in parts.stages:
            inputs.append(fused_parameter(parts.stages["bias"][1], ctx, plan.norm_shape))  # type: ignore[arg-type]
        out = ctx.variable(self.fused_op.lower(), match.anchor.outputs[0].dtype, match.anchor.outputs[0].shape)
        node = ctx.node(self.fused_op, inputs, [out], base=self.fused_op.lower(),
                        axis=plan.axis, epsilon=plan.epsilon, stash_type=1)
        return Replacement([node], [out])
