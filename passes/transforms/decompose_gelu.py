"""`decompose-gelu`: lower Gelu (opset 20) to primitive ops, for back ends that lack it.

    Gelu(x){approximate="none"} -> x * 0.5 * (1 + Erf(x / sqrt(2)))
    Gelu(x){approximate="tanh"} -> x * 0.5 * (1 + Tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))

Constants are in x's dtype; `powers=pow` spells the cube `Pow(x, 3)` instead of `x * x * x`. The
graph's opset is left as it is (every op used exists long before opset 20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules
from passes.transforms._decompose import Emitter, Powers, float_type

#: the Tanh approximation's cubic coefficient.
TANH_CUBIC = 0.044715
APPROXIMATIONS = ("none", "tanh")


def _approximation(node: gs.Node) -> str:
    value = node.attrs.get("approximate", "none")
    return value.decode() if isinstance(value, bytes) else str(value)


class GeluToPrimitives(RewriteRule):
    anchor_ops = ("Gelu",)
    math = "Gelu(x) -> x * 0.5 * (1 + Erf(x / sqrt(2)))   (tanh: Tanh(sqrt(2/pi) * (x + 0.044715 x^3)) for Erf)"

    def __init__(self, powers: Powers) -> None:
        self.powers = powers

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        if not anchor.inputs:
            return None
        elem = float_type(anchor.inputs[0], "X")
        return Match(anchor, [anchor], {"elem": elem, "approximate": _approximation(anchor)})

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        if isinstance(match["elem"], str):
            return match["elem"]
        if match["approximate"] not in APPROXIMATIONS:
            return f"approximate={match['approximate']!r} is neither 'none' nor 'tanh'"
        return None

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        anchor, elem = match.anchor, match["elem"]
        x = anchor.inputs[0]
        emit = Emitter(ctx, anchor.name or "gelu")
        if match["approximate"] == "tanh":
            cubic = emit.op("Mul", [emit.scalar("cubic", TANH_CUBIC, elem), emit.power(x, 3, elem, self.powers)], x)
            polynomial = emit.op("Add", [x, cubic], x)
            scaled = emit.op("Mul", [emit.scalar("sqrt_2_over_pi", math.sqrt(2 / math.pi), elem), polynomial], x)
            phi = emit.op("Tanh", [scaled], x)
        else:
            phi = emit.op("Erf", [emit.op("Div", [x, emit.scalar("sqrt_2", math.sqrt(2), elem)], x)], x)
        one_plus = emit.op("Add", [emit.scalar("one", 1.0, elem), phi], x)
        half_x = emit.op("Mul", [x, emit.scalar("half", 0.5, elem)], x)
        return Replacement(emit.nodes, [emit.op("Mul", [half_x, one_plus], x)])


@dataclass(frozen=True)
class DecomposeGelu(Pass):
    """Lower Gelu to Div/Erf (or the Tanh approximation's Mul/Add/Tanh) and Mul/Add primitives."""

    name = "decompose-gelu"

    powers: Powers = field(
        default="mul",
        metadata={"help": "cube x (approximate=tanh) with Mul(Mul(x, x), x), or with Pow(x, 3)"},
    )

    def call(self, graph: gs.Graph) -> PassResult:
        return run_rules(graph, [GeluToPrimitives(self.powers)], "gelus_decomposed")
