"""`fuse-rms-norm`: recognise decomposed RMSNorm and replace it by one RMSNormalization (opset 23).

    Mul(scale, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))
        -> RMSNormalization(x, scale){axis=-k, epsilon=eps}          (mean over the last k axes)

Every exporter spelling is read: `Pow(x, 2)` or `Mul(x, x)`; `Div(x, std)`, `Mul(x, Reciprocal(std))`
or `Mul(x, Div(1, std))`; axes as attribute or input; either operand order; a missing scale becomes
ones; and the dynamo/fp16 idiom `Cast(x, float32) -> ... -> Cast(back) -> Mul(weight)`, fused with
stash_type=1 on the uncast input (exactly the op's two-stage definition).

A normalisation of a centred tensor (`x - mean(x)`) is a LayerNorm and is left to fuse-layer-norm.
The checks (trailing axes, keepdims, constant epsilon, exponent 2, float32 computation, scale that
broadcasts onto the normalised dims only) and the opset handling are those of fuse-layer-norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import RewriteContext
from passes.transforms._norm_patterns import NormCore, NormRule, match_standardized
from passes.transforms._opset_bump import run_fusion

RMS_NORM_OPSET = 23


def _is_centred(tensor: gs.Tensor, ctx: RewriteContext) -> bool:
    """`tensor = Sub(a, ReduceMean(a))`, maybe Cast: normalising it is a LayerNorm."""
    cast = ctx.producer(tensor, "Cast")
    sub = ctx.producer(cast.inputs[0] if cast is not None else tensor, "Sub")
    mean = ctx.producer(sub.inputs[1], "ReduceMean") if sub is not None else None
    return mean is not None and mean.inputs[0] is sub.inputs[0]  # type: ignore[union-attr]


class RmsNormPattern(NormRule):
    anchor_ops = ("Mul", "Div", "Cast")
    math = "x / sqrt(mean(x^2) + eps) * scale -> RMSNormalization(x, scale)"
    fused_op = "RMSNormalization"
    with_bias = False

    def parse_core(self, tensor: gs.Tensor, ctx: RewriteContext) -> NormCore | None:
        std = match_standardized(tensor, ctx)
        if std is None or std.squared is not std.numerator or _is_centred(std.numerator, ctx):
            return None
        return NormCore(std.numerator, std, [std.reduce], list(std.nodes))


@dataclass(frozen=True)
class FuseRmsNorm(Pass):
    """Fuse decomposed RMSNorm (TorchScript and dynamo spellings) into RMSNormalization."""

    name = "fuse-rms-norm"

    bump_opset: bool = field(
        default=False,
        metadata={"help": "raise the opset to 23 when it is lower and every other op means the same there"},
    )

    def call(self, graph: gs.Graph) -> PassResult:
        return run_fusion(graph, lambda refusal: [RmsNormPattern(refusal)], "RMSNormalization",
                          RMS_NORM_OPSET, bump_opset=self.bump_opset, stats_key="rms_norms_fused")

    def ensures(self, graph: gs.Graph) -> None:
        if graph.opset < RMS_NORM_OPSET and any(n.op == "RMSNormalization" for n in graph.nodes):
            raise self.violation(f"emitted RMSNormalization at opset {graph.opset}")
