"""`decompose-layer-norm`: lower LayerNormalization to primitive ops, for back ends that lack it.

    LayerNormalization(X, S, B){axis, epsilon, stash_type}
      -> Cast(D / Sqrt(ReduceMean(D * D) + eps), T) * S + B,   D = U(X) - ReduceMean(U(X))

over the axes `[axis, rank)`, computed in the stash type `U` (X is cast to it and the result back
when the types differ). `form=reciprocal` spells the division `D * Reciprocal(Sqrt(...))`; `powers=pow`
spells the square `Pow(D, 2)`. The optional outputs are produced when read, exactly as the ONNX
spec defines them: Mean = ReduceMean(U(X)), InvStdDev = Reciprocal(Sqrt(Var + eps)), both in `U`
with the reduced axes kept as 1s. ReduceMean takes its axes as an attribute before opset 18 and as
an input from 18; the graph's opset is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules
from passes.transforms._decompose import (
    Emitter,
    Form,
    NormAxes,
    Powers,
    float_type,
    is_used,
    norm_axes,
    stash_type,
)

#: LayerNormalization's attribute defaults (opset 17).
DEFAULT_AXIS = -1
DEFAULT_EPSILON = 1e-5


@dataclass(frozen=True)
class _LayerNormPlan:
    """What the rewrite needs, read off the node once by `match`."""

    axes: NormAxes
    elem: int
    stash: int
    epsilon: float
    bias: gs.Tensor | None
    want_mean: bool
    want_inv_std_dev: bool


class LayerNormToPrimitives(RewriteRule):
    anchor_ops = ("LayerNormalization",)
    math = "LayerNormalization(X, S, B) -> D / Sqrt(ReduceMean(D * D) + eps) * S + B, D = X - ReduceMean(X)"

    def __init__(self, form: Form, powers: Powers) -> None:
        self.form = form
        self.powers = powers

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        if len(anchor.inputs) < 2:
            return None
        return Match(anchor, [anchor], {"plan": _plan(anchor, ctx)})

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        plan = match["plan"]
        return plan if isinstance(plan, str) else None

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        plan: _LayerNormPlan = match["plan"]
        anchor = match.anchor
        x, scale = anchor.inputs[0], anchor.inputs[1]
        emit = Emitter(ctx, anchor.name or "layer_norm")
        xu = emit.cast(x, plan.stash, plan.elem)
        mean = emit.reduce_mean(xu, plan.axes)
        deviation = emit.op("Sub", [xu, mean], xu)
        variance = emit.reduce_mean(emit.power(deviation, 2, plan.stash, self.powers), plan.axes)
        shifted = emit.op("Add", [variance, emit.scalar("epsilon", plan.epsilon, plan.stash)], variance)
        std_dev = emit.op("Sqrt", [shifted], variance)
        inv_std_dev = None
        if self.form == "div" and plan.want_inv_std_dev:  # the spec's InvStdDev; Div makes none
            inv_std_dev = emit.op("Reciprocal", [std_dev], std_dev)
        normalized, reciprocal = emit.divide(deviation, std_dev, self.form)
        inv_std_dev = reciprocal if reciprocal is not None else inv_std_dev
        y = emit.op("Mul", [emit.cast(normalized, plan.elem, plan.stash), scale], x)
        if plan.bias is not None:
            y = emit.op("Add", [y, plan.bias], x)
        extra = [(plan.want_mean, mean), (plan.want_inv_std_dev, inv_std_dev)]
        outputs: list[gs.Tensor] = [y] + [
            produced if wanted and produced is not None else old  # unread: rebound to itself, it disappears
            for old, (wanted, produced) in zip(anchor.outputs[1:], extra)
        ]
        return Replacement(emit.nodes, outputs)


def _plan(node: gs.Node, ctx: RewriteContext) -> _LayerNormPlan | str:
    """The rewrite's inputs, or the reason the node cannot be decomposed."""
    x = node.inputs[0]
    elem = float_type(x, "X")
    if isinstance(elem, str):
        return elem
    axes = norm_axes(x, int(node.attrs.get("axis", DEFAULT_AXIS)))
    if isinstance(axes, str):
        return axes
    stash = stash_type(node)
    if isinstance(stash, str):
        return stash
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    outputs = node.outputs
    return _LayerNormPlan(
        axes=axes,
        elem=elem,
        stash=stash,
        epsilon=float(node.attrs.get("epsilon", DEFAULT_EPSILON)),
        bias=bias,
        want_mean=len(outputs) > 1 and is_used(outputs[1], ctx),
        want_inv_std_dev=len(outputs) > 2 and is_used(outputs[2], ctx),
    )


@dataclass(frozen=True)
class DecomposeLayerNorm(Pass):
    """Lower LayerNormalization to ReduceMean/Sub/Mul/Add/Sqrt/Div (or Reciprocal) primitives."""

    name = "decompose-layer-norm"

    form: Form = field(
        default="div",
        metadata={"help": "divide by the standard deviation with Div, or multiply by its Reciprocal"},
    )
    powers: Powers = field(
        default="mul",
        metadata={"help": "square the deviation with Mul(d, d), or with Pow(d, 2)"},
    )

    def call(self, graph: gs.Graph) -> PassResult:
        return run_rules(graph, [LayerNormToPrimitives(self.form, self.powers)], "layer_norms_decomposed")
