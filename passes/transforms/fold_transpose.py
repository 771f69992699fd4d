"""`fold-transpose`: fold Transposes into matmul weights and merge consecutive Transposes.

    Transpose(Transpose(x, p1), p2) -> Transpose(x, [p1[i] for i in p2])   (-> x when that is the identity)
    MatMul(a, Transpose(W, perm swapping the last two axes)) -> MatMul(a, W')    (W constant, W' = W^T)
    Gemm(Transpose(a), Transpose(b)){transA, transB} -> Gemm(a, b){1 - transA, 1 - transB}   (2-D)

A Transpose whose output is read elsewhere too stays (the driver refuses with that reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules


def _perm(node: gs.Node) -> list[int] | None:
    """The node's permutation; the default (reversed axes) needs the input's rank."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    shape = node.inputs[0].shape
    return list(reversed(range(len(shape)))) if shape is not None else None


class MergeTransposes(RewriteRule):
    anchor_ops = ("Transpose",)
    math = "Transpose(Transpose(x, p1), p2) -> Transpose(x, p1[p2])"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        inner = ctx.producer(anchor.inputs[0], "Transpose")
        if inner is None:
            return None
        return Match(anchor, [inner, anchor], {"x": inner.inputs[0], "p1": _perm(inner), "p2": _perm(anchor)})

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        if match["p1"] is None or match["p2"] is None:
            return "default perm on an input of unknown rank"
        return None

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        p1, p2 = match["p1"], match["p2"]
        perm = [p1[i] for i in p2]
        if perm == sorted(perm):
            return Replacement([], [match["x"]])
        out = ctx.variable("transpose", match.anchor.outputs[0].dtype)
        return Replacement([ctx.node("Transpose", [match["x"]], [out], base="merged_transpose", perm=perm)], [out])


class PretransposeMatMulWeight(RewriteRule):
    anchor_ops = ("MatMul",)
    math = "MatMul(a, Transpose(W)) -> MatMul(a, W^T) for constant W"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        transpose = ctx.producer(anchor.inputs[1], "Transpose")
        if transpose is None:
            return None
        weight = ctx.constant(transpose.inputs[0])
        if weight is None:
            return None
        return Match(anchor, [transpose, anchor], {"weight": weight, "perm": _perm(transpose)})

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        weight = np.ascontiguousarray(np.transpose(match["weight"], match["perm"]))
        out = ctx.variable("matmul", match.anchor.outputs[0].dtype)
        inputs = [match.anchor.inputs[0], ctx.const("pretransposed_weight", weight)]
        return Replacement([ctx.node("MatMul", inputs, [out], base="matmul")], [out])


class TransposeIntoGemm(RewriteRule):
    anchor_ops = ("Gemm",)
    math = "Gemm(Transpose(a), Transpose(b)){tA, tB} -> Gemm(a, b){1 - tA, 1 - tB}"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        flips = [ctx.producer(anchor.inputs[i], "Transpose") for i in (0, 1)]
        flips = [t if t is not None and _perm(t) == [1, 0] else None for t in flips]
        if not any(flips):
            return None
        return Match(anchor, [t for t in flips if t is not None] + [anchor], {"flips": flips})

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        anchor = match.anchor
        inputs = list(anchor.inputs)
        attrs = dict(anchor.attrs)
        for index, (flip, key) in enumerate(zip(match["flips"], ("transA", "transB"))):
            if flip is not None:
                inputs[index] = flip.inputs[0]
                attrs[key] = 1 - int(attrs.get(key, 0))
        out = ctx.variable("gemm", anchor.outputs[0].dtype)
        return Replacement([ctx.node("Gemm", inputs, [out], base="gemm", **attrs)], [out])


RULES = (MergeTransposes(), PretransposeMatMulWeight(), TransposeIntoGemm())


@dataclass(frozen=True)
class FoldTranspose(Pass):
    """Fold Transposes into matmul weights or Gemm flags; merge or drop consecutive Transposes."""

    name = "fold-transpose"

    def call(self, graph: gs.Graph) -> PassResult:
        return run_rules(graph, RULES, "transposes_folded")
