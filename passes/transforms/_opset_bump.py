"""Raising a graph's opset so a fused op exists, only when every other node keeps its meaning.

Fused ops need a recent opset (LayerNormalization 17, Gelu 20, RMSNormalization 23). `run_fusion`
refuses below it, or with `bump_opset` raises the graph's default-domain opset, but only when every
node left after fusion means the same at the new opset (checked on a trial copy): each schema version
in between must be in `COMPATIBLE_CHANGES`, a reviewed list of changes that only add types or add an
attribute or optional input whose default keeps the old meaning (Shape-15 start/end, Reshape-14
allowzero=0, Cast-19 saturate, which only affects float8), or the node must pass `NODE_COMPATIBLE`
(Split-18 with an explicit `split` input, Reduce*-18 without an `axes` attribute). Anything else
(ReduceMean-18 with axes as an attribute, GroupNormalization-21, Resize, quantisation ops, local
functions) blocks the bump.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import onnx
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import PassResult
from passes.infra.rewrite import RewriteRule, run_rules

# -- opsets --------------------------------------------------------------------------------------
_TYPES_21_23 = frozenset({21, 23})
_TYPES_22 = frozenset({22})
#: op -> schema versions whose change keeps every older graph's meaning (reviewed by hand; see above).
COMPATIBLE_CHANGES: dict[str, frozenset[int]] = {
    **{op: frozenset({14}) for op in ("Add", "Sub", "Mul", "Div", "Relu", "CumSum")},
    "Pow": frozenset({15}),
    **{op: frozenset({16}) for op in ("Where", "GreaterOrEqual", "LessOrEqual", "LeakyRelu", "PRelu")},
    "Equal": frozenset({19}),
    **{op: frozenset({20}) for op in ("IsNaN", "IsInf", "ReduceMax", "ReduceMin")},
    "Constant": frozenset({19, 21, 23}),
    "ConstantOfShape": frozenset({20, 21, 23}),
    "Shape": frozenset({15, 19, 21, 23}),
    "Size": frozenset({19, 21, 23}),
    "Reshape": frozenset({14, 19, 21, 23}),
    **{op: _TYPES_21_23 for op in ("Transpose", "Unsqueeze", "Squeeze", "Flatten")},
    **{op: frozenset({19, 21, 23}) for op in ("Cast", "CastLike")},
    "Identity": frozenset({14, 16, 19, 21, 23}),
    **{op: frozenset({16, 19, 21, 23}) for op in ("If", "Loop", "Scan")},
    "Pad": frozenset({18, 19, 21, 23}),
    "AveragePool": frozenset({19, 22}),
    **{op: frozenset({16, 18}) for op in ("ScatterND", "ScatterElements")},
    **{op: _TYPES_22 for op in ("Dropout", "Softplus", "Cos", "Sin", "Tan", "Asin", "Acos", "Atan",
                                "Sinh", "Cosh", "Round", "Elu", "Selu", "HardSigmoid", "HardSwish",
                                "Mish", "ThresholdedRelu", "InstanceNormalization", "Conv",
                                "ConvTranspose", "MaxPool", "GlobalAveragePool", "EyeLike")},
}


_REDUCE_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")
#: (op, version) -> which nodes keep their meaning across that change: Split-18 needs `split` or
#: num_outputs (an explicit `split` input is the same), Reduce*-18 takes axes as an input (none = all).
NODE_COMPATIBLE: dict[tuple[str, int], Callable[[gs.Node], bool]] = {
    ("Split", 18): lambda node: len(node.inputs) > 1 and bool(node.inputs[1].name),
    **{(op, 18): (lambda node: "axes" not in node.attrs) for op in _REDUCE_18},
}


def _nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    for node in graph.nodes:
        yield node
        for sub in ir.subgraphs(node):
            yield from _nodes(sub)


def _changes(op: str, old: int, new: int) -> list[int] | None:
    """The schema versions of `op` in (old, new], or None when ONNX has no schema for it at `old`."""
    versions: list[int] = []
    try:
        version = onnx.defs.get_schema(op, new).since_version
        while version > old:
            versions.append(version)
            version = onnx.defs.get_schema(op, version - 1).since_version
    except onnx.defs.SchemaError:
        return None
    return versions


def _never(node: gs.Node) -> bool:
    return False


def opset_blockers(graph: gs.Graph, old: int, new: int, fused_op: str) -> list[str]:
    """Ops of `graph` (other than the `fused_op` just introduced) whose meaning may differ between
    default-domain opsets `old` and `new`."""
    blockers = {"local functions"} if getattr(graph, "functions", None) else set()
    for node in _nodes(graph):
        if not ir.is_default_domain(node) or node.op == fused_op or node.op in blockers:
            continue
        versions = _changes(node.op, old, new)
        if versions is None or any(
            v not in COMPATIBLE_CHANGES.get(node.op, ()) and not NODE_COMPATIBLE.get((node.op, v), _never)(node)
            for v in versions
        ):
            blockers.add(node.op)
    return sorted(blockers)


def run_fusion(
    graph: gs.Graph,
    make_rules: Callable[[str | None], Sequence[RewriteRule]],
    fused_op: str,
    required: int,
    *,
    bump_opset: bool,
    stats_key: str,
) -> PassResult:
    """Run the rules when the opset has `fused_op`; else refuse every match, or (`bump_opset`) raise
    the opset first when a trial run on a copy shows that every op left means the same there."""
    opset = ir.opset_version(graph)
    if opset >= required:
        return run_rules(graph, make_rules(None), stats_key)
    reason = f"opset {opset} has no {fused_op} (needs {required})"
    if bump_opset:
        trial = graph.copy()
        ir.set_opset_version(trial, required)
        if run_rules(trial, make_rules(None), stats_key).modified:
            blockers = opset_blockers(trial, opset, required, fused_op)
            if not blockers:
                ir.set_opset_version(graph, required)
                result = run_rules(graph, make_rules(None), stats_key)
                result.stats["opset_raised_to"] = required
                return result
            reason += f"; cannot raise it: {', '.join(blockers)} changed between opset {opset} and {required}"
    return run_rules(graph, make_rules(reason), stats_key)
