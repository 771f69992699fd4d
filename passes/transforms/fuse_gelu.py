"""`fuse-gelu`: recognise decomposed GELU (exact, via Erf, or the tanh approximation) -> Gelu (opset 20).

    Mul(Mul(x, Add(Erf(Div(x, sqrt(2))), 1)), 0.5) -> Gelu(x)
    Mul(Mul(0.5, x), Add(1, Tanh(Mul(sqrt(2/pi), Add(x, Mul(0.044715, Pow(x, 3))))))) -> Gelu(x){approximate="tanh"}

The three factors `x`, `0.5` and `1 + erf(..)` may be multiplied in any association and operand order
(`x * 0.5 * p`, `0.5 * x * p`, `x * (0.5 * p)`, `(x * 0.5) * p`); the Erf argument may be `Div(x, sqrt 2)`
or `Mul(x, 1/sqrt 2)`; the cube `Pow(x, 3)`, `Mul(x, Mul(x, x))` or `Mul(Mul(x, x), x)`. Constants must
be the exact values rounded to their own type (within 2 ulps). Below opset 20 the pass refuses, or with
`bump_opset=true` raises the opset when every other op means the same there.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule
from passes.transforms._opset_bump import run_fusion
from passes.transforms._norm_patterns import (
    absorb_constants,
    close_to,
    is_constant,
    rank,
    scalar_constant,
)

GELU_OPSET = 20
SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715


def _is_const(ctx: RewriteContext, tensor: gs.Tensor, x: gs.Tensor, value: float) -> bool:
    found = scalar_constant(ctx, tensor, rank(x))
    return found is not None and close_to(found, value)


def _operand_pairs(node: gs.Node) -> Iterator[tuple[gs.Tensor, gs.Tensor]]:
    a, b = node.inputs
    yield a, b
    yield b, a


class GeluPattern(RewriteRule):
    """`x * 0.5 * (1 + inner(x))`; subclasses say what `inner` is and which Gelu it makes."""

    anchor_ops = ("Mul",)
    approximate = "none"

    def __init__(self, opset_refusal: str | None = None) -> None:
        self.opset_refusal = opset_refusal

    @abc.abstractmethod
    def inner(self, tensor: gs.Tensor, x: gs.Tensor, ctx: RewriteContext) -> list[gs.Node] | None:
        """The nodes computing `erf(x / sqrt 2)` (or its tanh counterpart) into `tensor`, or None."""

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        for product, other in _operand_pairs(anchor):
            inner_mul = ctx.producer(product, "Mul")
            if inner_mul is None:
                continue
            factors = [*inner_mul.inputs, other]
            for half_index, half in enumerate(factors):
                rest = factors[:half_index] + factors[half_index + 1:]
                for x, one_plus in (rest, rest[::-1]):
                    if not _is_const(ctx, half, x, 0.5):
                        continue
                    nodes = self._one_plus(one_plus, x, ctx)
                    if nodes is not None:
                        nodes += [inner_mul, anchor]
                        return Match(anchor, nodes + absorb_constants(nodes, ctx), {"x": x})
        return None

    def _one_plus(self, tensor: gs.Tensor, x: gs.Tensor, ctx: RewriteContext) -> list[gs.Node] | None:
        add = ctx.producer(tensor, "Add")
        if add is None or is_constant(x):
            return None
        for inner, one in _operand_pairs(add):
            if _is_const(ctx, one, x, 1.0):
                nodes = self.inner(inner, x, ctx)
                if nodes is not None:
                    return [*nodes, add]
        return None

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        return self.opset_refusal

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        out = ctx.variable("gelu", match.anchor.outputs[0].dtype, match.anchor.outputs[0].shape)
        node = ctx.node("Gelu", [match["x"]], [out], base="gelu", approximate=self.approximate)
        return Replacement([node], [out])


class GeluErfPattern(GeluPattern):
    math = "x * 0.5 * (1 + Erf(x / sqrt(2))) -> Gelu(x)"

    def inner(self, tensor: gs.Tensor, x: gs.Tensor, ctx: RewriteContext) -> list[gs.Node] | None:
        erf = ctx.producer(tensor, "Erf")
        scaled = ctx.producer(erf.inputs[0], ("Div", "Mul")) if erf is not None else None
        if scaled is None:
            return None
        if scaled.op == "Div":
            ok = scaled.inputs[0] is x and _is_const(ctx, scaled.inputs[1], x, SQRT_2)
        else:
            ok = any(a is x and _is_const(ctx, c, x, 1.0 / SQRT_2) for a, c in _operand_pairs(scaled))
        return [scaled, erf] if ok else None


def _cube(tensor: gs.Tensor, x: gs.Tensor, ctx: RewriteContext) -> list[gs.Node] | None:
    """`Pow(x, 3)`, `Mul(x, Mul(x, x))` or `Mul(Mul(x, x), x)`."""
    node = ctx.producer(tensor, ("Pow", "Mul"))
    if node is None:
        return None
    if node.op == "Pow":
        return [node] if node.inputs[0] is x and _is_const(ctx, node.inputs[1], x, 3.0) else None
    for single, square in _operand_pairs(node):
        inner = ctx.producer(square, "Mul")
        if single is x and inner is not None and inner.inputs[0] is x and inner.inputs[1] is x:
            return [inner, node]
    return None


class GeluTanhPattern(GeluPattern):
    math = "x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> Gelu(x){approximate=tanh}"
    approximate = "tanh"

    def inner(self, tensor: gs.Tensor, x: gs.Tensor, ctx: RewriteContext) -> list[gs.Node] | None:
        tanh = ctx.producer(tensor, "Tanh")
        scaled = ctx.producer(tanh.inputs[0], "Mul") if tanh is not None else None
        if scaled is None:
            return None
        for polynomial, k in _operand_pairs(scaled):
            add = ctx.producer(polynomial, "Add")
            if add is None or not _is_const(ctx, k, x, SQRT_2_OVER_PI):
                continue
            for linear, cubic in _operand_pairs(add):
                term = ctx.producer(cubic, "Mul")
                if linear is not x or term is None:
                    continue
                for cube, c in _operand_pairs(term):
                    cube_nodes = _cube(cube, x, ctx) if _is_const(ctx, c, x, TANH_CUBIC) else None
                    if cube_nodes is not None:
                        return [*cube_nodes, term, add, scaled, tanh]
        return None


@dataclass(frozen=True)
class FuseGelu(Pass):
    """Fuse decomposed GELU (Erf form, tanh approximation) into Gelu."""

    name = "fuse-gelu"

    bump_opset: bool = field(
        default=False,
        metadata={"help": "raise the opset to 20 when it is lower and every other op means the same there"},
    )

    def call(self, graph: gs.Graph) -> PassResult:
        return run_fusion(graph, lambda refusal: [GeluErfPattern(refusal), GeluTanhPattern(refusal)], "Gelu",
                          GELU_OPSET, bump_opset=self.bump_opset, stats_key="gelus_fused")

    def ensures(self, graph: gs.Graph) -> None:
        if graph.opset < GELU_OPSET and any(n.op == "Gelu" for n in graph.nodes):
            raise self.violation(f"emitted Gelu at opset {graph.opset}")
