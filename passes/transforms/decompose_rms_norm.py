"""`decompose-rms-norm`: lower RMSNormalization (opset 23) to primitive ops, for back ends that lack it.

    RMSNormalization(X, S){axis, epsilon, stash_type} -> Cast(U(X) / Sqrt(ReduceMean(U(X)^2) + eps), T) * S

over the axes `[axis, rank)`, computed in the stash type `U` (X is cast to it and the result back
when the types differ), as the ONNX function body defines it. `form=reciprocal` spells the division
`U(X) * Reciprocal(Sqrt(...))`; `powers=pow` spells the square `Pow(U(X), 2)`. The graph's opset is
left as it is (ReduceMean takes its axes as an input there).

The spec multiplies `Cast(Normalized, T)` by a scale of type `V`; a scale whose type differs from
X's (mixed precision) has no valid primitive spelling in that body and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs
from passes.core import ir
from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules
from passes.transforms._decompose import (
    Emitter,
    Form,
    NormAxes,
    Powers,
    float_type,
    norm_axes,
    stash_type,
    type_name,
)

#: RMSNormalization's attribute defaults (opset 23).
DEFAULT_AXIS = -1
DEFAULT_EPSILON = 1e-5


@dataclass(frozen=True)
class _RmsNormPlan:
    """What the rewrite needs, read off the node once by `match`."""

    axes: NormAxes
    elem: int
    stash: int
    epsilon: float


class RmsNormToPrimitives(RewriteRule):
    anchor_ops = ("RMSNormalization",)
    math = "RMSNormalization(X, S) -> X / Sqrt(ReduceMean(X * X) + eps) * S"

    def __init__(self, form: Form, powers: Powers) -> None:
        self.form = form
        self.powers = powers

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        if len(anchor.inputs) < 2:
            return None
        return Match(anchor, [anchor], {"plan": _plan(anchor)})

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        plan = match["plan"]
        return plan if isinstance(plan, str) else None

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        plan: _RmsNormPlan = match["plan"]
        anchor = match.anchor
        x, scale = anchor.inputs[0], anchor.inputs[1]
        emit = Emitter(ctx, anchor.name or "rms_norm")
        xu = emit.cast(x, plan.stash, plan.elem)
        mean_square = emit.reduce_mean(emit.power(xu, 2, plan.stash, self.powers), plan.axes)
        shifted = emit.op("Add", [mean_square, emit.scalar("epsilon", plan.epsilon, plan.stash)], mean_square)
        rms = emit.op("Sqrt", [shifted], mean_square)
        normalized, _ = emit.divide(xu, rms, self.form)
        y = emit.op("Mul", [emit.cast(normalized, plan.elem, plan.stash), scale], x)
        return Replacement(emit.nodes, [y])


def _plan(node: gs.Node) -> _RmsNormPlan | str:
    """The rewrite's inputs, or the reason the node cannot be decomposed."""
    x, scale = node.inputs[0], node.inputs[1]
    elem = float_type(x, "X")
    if isinstance(elem, str):
        return elem
    scale_elem = ir.elem_type(scale)
    if scale_elem != elem:
        return f"scale is {type_name(scale_elem)} but X is {type_name(elem)} (mixed precision)"
    axes = norm_axes(x, int(node.attrs.get("axis", DEFAULT_AXIS)))
    if isinstance(axes, str):
        return axes
    stash = stash_type(node)
    if isinstance(stash, str):
        return stash
    return _RmsNormPlan(axes, elem, stash, float(node.attrs.get("epsilon", DEFAULT_EPSILON)))


@dataclass(frozen=True)
class DecomposeRmsNorm(Pass):
    """Lower RMSNormalization to Mul/ReduceMean/Add/Sqrt/Div (or Reciprocal) primitives."""

    name = "decompose-rms-norm"

    form: Form = field(
        default="div",
        metadata={"help": "divide by the root mean square with Div, or multiply by its Reciprocal"},
    )
    powers: Powers = field(
        default="mul",
        metadata={"help": "square the input with Mul(x, x), or with Pow(x, 2)"},
    )

    def call(self, graph: gs.Graph) -> PassResult:
        return run_rules(graph, [RmsNormToPrimitives(self.form, self.powers)], "rms_norms_decomposed")
