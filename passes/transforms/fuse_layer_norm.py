"""`fuse-layer-norm`: recognise decomposed LayerNorm and replace it by one LayerNormalization.

    Add(Mul(Div(Sub(x, m), Sqrt(Add(ReduceMean(Pow(Sub(x, m), 2)), eps))), scale), bias)
        -> LayerNormalization(x, scale, bias){axis=-k, epsilon=eps}     (m = ReduceMean(x), last k axes)

Every exporter spelling is read: `Pow(d, 2)` or `Mul(d, d)`; `Div(d, std)`, `Mul(d, Reciprocal(std))`
or `Mul(d, Div(1, std))`; one Sub reused or two Subs of the same mean; axes as attribute or input;
either operand order of Add/Mul; scale and bias optional (a missing scale becomes ones); and the fp16
idiom `Cast(x, float32) -> ... -> Cast(back)`, fused with stash_type=1 on the fp16 input.

A match fuses only when provably equal: every ReduceMean keeps dims and reduces the same trailing
axes, epsilon and the exponent 2 are constants, scale and bias broadcast onto the normalised dims
only, and the computation runs in float32. LayerNormalization needs opset 17; below it the pass
refuses, or with `bump_opset=true` raises the opset when every other op means the same there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import RewriteContext
from passes.transforms._opset_bump import run_fusion
from passes.transforms._norm_patterns import (
    NormCore,
    NormRule,
    elem_type,
    match_standardized,
    type_name,
)

LAYER_NORM_OPSET = 17


class LayerNormPattern(NormRule):
    anchor_ops = ("Add", "Mul", "Div", "Cast")
    math = "(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * scale + bias -> LayerNormalization(x, scale, bias)"
    fused_op = "LayerNormalization"
    with_bias = True

    def parse_core(self, tensor: gs.Tensor, ctx: RewriteContext) -> NormCore | None:
        std = match_standardized(tensor, ctx)
        if std is None:
            return None
        cast = ctx.producer(std.numerator, "Cast")  # TorchScript fp16: Sub in fp16, variance in double
        centred = cast.inputs[0] if cast is not None and std.squared is std.numerator else std.numerator
        sub = ctx.producer(centred, "Sub")
        if sub is None:
            return None
        x, mean_out = sub.inputs
        mean = ctx.producer(mean_out, "ReduceMean")
        if mean is None or mean.inputs[0] is not x:
            return None
        nodes = [*std.nodes, sub, mean]
        problem = None
        if centred is not std.numerator:
            nodes.append(cast)
            if elem_type(centred) != cast.attrs.get("to"):
                problem = (f"the mean is subtracted in {type_name(elem_type(centred))}, "
                           f"the variance computed in {type_name(cast.attrs.get('to'))}")
        elif std.squared is not std.numerator:
            other = ctx.producer(std.squared, "Sub")
            if other is None or other.inputs[0] is not x:
                return None
            nodes.append(other)
            if other.inputs[1] is not mean_out:
                problem = "the two Subs subtract different means"
        return NormCore(x, std, [mean, std.reduce], nodes, problem)


@dataclass(frozen=True)
class FuseLayerNorm(Pass):
    """Fuse decomposed LayerNorm (TorchScript and dynamo spellings) into LayerNormalization."""

    name = "fuse-layer-norm"

    bump_opset: bool = field(
        default=False,
        metadata={"help": "raise the opset to 17 when it is lower and every other op means the same there"},
    )

    def call(self, graph: gs.Graph) -> PassResult:
        return run_fusion(graph, lambda refusal: [LayerNormPattern(refusal)], "LayerNormalization",
                          LAYER_NORM_OPSET, bump_opset=self.bump_opset, stats_key="layer_norms_fused")

    def ensures(self, graph: gs.Graph) -> None:
        if graph.opset < LAYER_NORM_OPSET and any(n.op == "LayerNormalization" for n in graph.nodes):
            raise self.violation(f"emitted LayerNormalization at opset {graph.opset}")
