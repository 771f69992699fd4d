"""`to-fp16`: run activations and weights in float16, keeping the numerically sensitive ops float32.

    x: float32 -> x: float16                   for every tensor of an op with a float16 kernel (weights too)
    Softmax(x) -> Cast16(Softmax(Cast32(x)))   float32 islands: Softmax/LogSoftmax, accumulating Reduce*,
                                               CumSum, Exp, Pow(x, p) for p outside [0, 1], int->float Casts
    LayerNorm(x, s, b) -> LayerNorm16(x, s, b){stash_type=1}   fused norms keep float32 statistics
    c == ±FLT_MAX -> ±32752                    mask sentinels (0 * -inf = NaN in float16; exp(-32752 - m) = 0;
                                               half the range, so a masked score stays finite)
    Cast16(Cast32(x16)) -> x16                 no Cast round trip is left (exact: float16 -> float32 is lossless)

An island grows forward through elementwise and data-movement ops fed only by islands (and
constants), so a normalisation's variance stays float32 from `Pow` through `Sqrt`, and every island
has one Cast in and one Cast out per tensor. Graph inputs and outputs keep float32 when
`keep_io_types` (one Cast at the boundary). Integer ops, Shape and Range are untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, Refusal
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules
from passes.transforms._fp16 import (
    F16,
    F32,
    Mode,
    Plan,
    Precision,
    clamp_sentinels,
    dtype_of,
    is_f32,
    plan_graph,
    to_half,
)

_TO = {Precision.HALF: onnx.TensorProto.FLOAT16, Precision.SINGLE: onnx.TensorProto.FLOAT}
_NP = {Precision.HALF: F16, Precision.SINGLE: F32}


class DropCastRoundTrip(RewriteRule):
    anchor_ops = ("Cast",)
    math = "Cast16(Cast32(x16)) -> x16"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        inner = ctx.producer(anchor.inputs[0], "Cast")
        if inner is None or int(anchor.attrs["to"]) != onnx.TensorProto.FLOAT16:
            return None
        if int(inner.attrs["to"]) != onnx.TensorProto.FLOAT or dtype_of(inner.inputs[0]) != F16:
            return None
        middle = inner.outputs[0]
        alone = len(middle.outputs) == 1 and not ctx.is_graph_output(middle)
        return Match(anchor, [inner, anchor] if alone else [anchor], {"x": inner.inputs[0]})

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        return Replacement([], [match["x"]])


class _Converter:
    """Applies a plan: retypes tensors, converts constants, inserts one Cast per tensor and precision."""

    def __init__(self, graph: gs.Graph, plan: Plan, keep_io_types: bool) -> None:
        self.graph, self.plan, self.keep_io_types = graph, plan, keep_io_types
        self.ctx = RewriteContext(graph)
        self.versions: dict[tuple[int, Precision], gs.Tensor] = {}
        self.stats = {"casts_inserted": 0, "constants_converted": 0, "sentinels_clamped": 0, "tensors_retyped": 0}
        self.nodes: list[gs.Node] = []

    def run(self) -> None:
        self._convert_constants()
        for tensor in self.graph.inputs:
            if id(tensor) in self.plan.precision:
                self._graph_input(tensor)
        outputs = ir.graph_output_ids(self.graph)
        for node in list(self.graph.nodes):
            for index, want in enumerate(self.plan.wants[id(node)]):
                if want is not None:
                    ir.set_input(node, index, self._version(node.inputs[index], want))
            self.nodes.append(node)
            if self.plan.modes[id(node)] is Mode.HALF:
                self._retype_half(node)
            for tensor in node.outputs:
                if id(tensor) in self.plan.precision:
                    self._produced(node, tensor, id(tensor) in outputs)
        self.graph.nodes = self.nodes

    # -- variables -----------------------------------------------------------------------------
    def _graph_input(self, tensor: gs.Tensor) -> None:
        if self.keep_io_types:
            self.versions[(id(tensor), Precision.SINGLE)] = tensor
            return
        tensor.dtype = F16
        self.stats["tensors_retyped"] += 1
        self.versions[(id(tensor), Precision.HALF)] = tensor

    def _produced(self, node: gs.Node, tensor: gs.Tensor, is_output: bool) -> None:
        """Record the version a node made; a graph output in the wrong precision is renamed and
        the original tensor written by a Cast right after the node."""
        made = Precision.SINGLE if self.plan.precision[id(tensor)] is not Precision.HALF else Precision.HALF
        needed = Precision.SINGLE if self.keep_io_types else Precision.HALF
        if not is_output or made is needed:
            self.versions[(id(tensor), made)] = tensor
            return
        inner = self.ctx.variable(f"{tensor.name}_{made.value}", _NP[made], tensor.shape)
        index = next(i for i, t in enumerate(node.outputs) if t is tensor)
        ir.set_output(node, index, inner)
        tensor.dtype = _NP[needed]
        self.nodes.append(self.ctx.node("Cast", [inner], [tensor], base="to_fp16/output_cast", to=_TO[needed]))
        self.stats["casts_inserted"] += 1
        self.versions[(id(tensor), made)] = inner
        self.versions[(id(tensor), needed)] = tensor

    def _version(self, tensor: gs.Tensor, want: Precision) -> gs.Tensor:
        """`tensor` in precision `want`: itself, or one shared Cast placed before its first reader."""
        key = (id(tensor), want)
        if key in self.versions:
            return self.versions[key]
        other = Precision.SINGLE if want is Precision.HALF else Precision.HALF
        source = self.versions.get((id(tensor), other))
        if source is None:  # a tensor of another type, or one this plan did not track
            return tensor
        cast = self.ctx.variable(f"{tensor.name}_{want.value}", _NP[want], source.shape)
        self.nodes.append(self.ctx.node("Cast", [source], [cast], base=f"to_fp16/cast_{want.value}", to=_TO[want]))
        self.stats["casts_inserted"] += 1
        self.versions[key] = cast
        return cast

    def _retype_half(self, node: gs.Node) -> None:
        for index in self.plan.half_outputs[id(node)]:
            node.outputs[index].dtype = F16
            self.stats["tensors_retyped"] += 1
        if node.op == "Cast" and int(node.attrs["to"]) == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        elif node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            zero = np.zeros(1, F32) if value is None else np.asarray(value.values)
            node.attrs["value"] = gs.Constant(self.ctx.fresh("value"), to_half(zero)[0])
        elif node.op in ("LayerNormalization", "RMSNormalization") and node.attrs.get("stash_type", 1) != 1:
            node.attrs["stash_type"] = 1

    # -- constants -----------------------------------------------------------------------------
    def _convert_constants(self) -> None:
        """Float32 constants: converted in place when every reader wants float16, copied when some
        want float32 (islands, graph outputs); sentinels clamped in both."""
        wants: dict[int, tuple[gs.Tensor, set[Precision]]] = {}
        for node in self.graph.nodes:
            for tensor, want in zip(node.inputs, self.plan.wants[id(node)]):
                if want is not None and ir.constant_value(tensor) is not None:
                    wants.setdefault(id(tensor), (tensor, set()))[1].add(want)
        for tensor in self.graph.outputs:
            if id(tensor) in wants and self.keep_io_types:
                wants[id(tensor)][1].add(Precision.SINGLE)
        for tensor, kinds in wants.values():
            self._convert_constant(tensor, kinds)

    def _convert_constant(self, tensor: gs.Tensor, kinds: set[Precision]) -> None:
        values = np.asarray(ir.constant_value(tensor))
        if Precision.SINGLE in kinds:
            clamped, count = clamp_sentinels(values)
            if count:
                self._set_constant(tensor, clamped)
                self.stats["sentinels_clamped"] += count
            self.versions[(id(tensor), Precision.SINGLE)] = tensor
        if Precision.HALF not in kinds:
            return
        half, count = to_half(values)
        self.stats["constants_converted"] += 1
        self.stats["sentinels_clamped"] += count if Precision.SINGLE not in kinds else 0
        if Precision.SINGLE in kinds:
            self.versions[(id(tensor), Precision.HALF)] = gs.Constant(self.ctx.fresh(f"{tensor.name}_fp16"), half)
        else:
            self._set_constant(tensor, half)
            self.versions[(id(tensor), Precision.HALF)] = tensor

    @staticmethod
    def _set_constant(tensor: gs.Tensor, values: np.ndarray) -> None:
        if isinstance(tensor, gs.Constant):
            tensor.values = values
            return
        node = ir.producer(tensor)  # a Constant node
        assert node is not None
        node.attrs["value"] = gs.Constant(node.attrs["value"].name, values)
        tensor.dtype = values.dtype


def _is_float(dtype: np.dtype | None) -> bool:
    """numpy floats, and the ml_dtypes ones (bfloat16, float8) numpy does not count as floating."""
    return dtype is not None and (np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat", "float")))


def _graph_refusal(graph: gs.Graph) -> str | None:
    """Why the whole graph is left alone, else None."""
    if any(True for node in graph.nodes for _ in ir.subgraphs(node)):
        return "control flow (If/Loop/Scan) is not converted: subgraph types would have to change too"
    tensors = [t for node in graph.nodes for t in (*node.inputs, *node.outputs) if t.name] + list(graph.inputs)
    untyped = next((t.name for t in tensors if dtype_of(t) is None), None)
    if untyped is not None:
        return f"tensor '{untyped}' has no known type: cannot tell whether it is float32"
    if not any(is_f32(t) for t in tensors):
        kinds = sorted({str(dtype_of(t)) for t in tensors if _is_float(dtype_of(t))})
        found = f" (float types present: {', '.join(kinds)})" if kinds else " (no float tensors)"
        return f"no float32 tensor to convert{found}"
    return None


@dataclass(frozen=True)
class ToFp16(Pass):
    """Convert float32 weights and activations to float16; keep reductions, Softmax and Exp/Pow in float32."""

    name = "to-fp16"
    exact = False  # half precision: tests state rtol=1e-2 and atol scaled to the values

    block: str = field(default="", metadata={"help": "regex of op types kept in float32 (e.g. Softmax|ReduceMean)"})
    keep_io_types: bool = field(default=True, metadata={"help": "graph inputs/outputs stay float32 (Cast at the boundary)"})

    def __post_init__(self) -> None:
        try:
            re.compile(self.block)
        except re.error as err:
            raise ValueError(f"block={self.block!r} is not a regular expression: {err}") from err

    def call(self, graph: gs.Graph) -> PassResult:
        reason = _graph_refusal(graph)
        if reason is not None:
            return PassResult(graph, False, {"nodes_half": 0}, [Refusal(graph.name or "graph", reason)])
        plan = plan_graph(graph, re.compile(self.block) if self.block else None, self.keep_io_types)
        converter = _Converter(graph, plan, self.keep_io_types)
        converter.run()
        cleanup = run_rules(graph, (DropCastRoundTrip(),), "cast_round_trips_dropped")
        stats: dict[str, int | float | str | bool] = dict(converter.stats)
        stats["cast_round_trips_dropped"] = cleanup.stats["cast_round_trips_dropped"]
        stats["nodes_half"] = sum(1 for m in plan.modes.values() if m is Mode.HALF)
        stats["nodes_float32"] = sum(1 for m in plan.modes.values() if m is Mode.SINGLE)
        modified = any(v for k, v in stats.items() if k not in ("nodes_half", "nodes_float32"))
        refusals = [Refusal(n.name or n.op, plan.reasons[id(n)]) for n in graph.nodes if id(n) in plan.reasons]
        return PassResult(graph, modified, stats, refusals + cleanup.refusals)

    def ensures(self, graph: gs.Graph) -> None:
        ctx, rule = RewriteContext(graph), DropCastRoundTrip()
        for node in graph.nodes:
            if node.op == "Cast" and rule.match(node, ctx) is not None:
                raise self.violation(f"Cast round trip float16 -> float32 -> float16 left at '{node.name}'")
