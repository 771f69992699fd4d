"""`fold-constants`: evaluate nodes whose inputs are all constants, and shape queries of static dims.

    op(c1, c2, ...) -> constant                  (deterministic default-domain ops, numpy or onnx.reference)
    Shape(x){start, end} -> constant             (when dims start..end of x are static; negative and
                                                  out-of-range start/end clamp as the ONNX spec says)
    Size(x) -> constant                          (when every dim of x is static)
    Constant node -> initializer

A size cap keeps folding from blowing a model up: an output larger than `max_bytes` is folded only
when it is no larger than the constant inputs it replaces (a Transpose or Cast of a weight folds; a
ConstantOfShape that would materialise a large tensor does not). Nodes are visited in topological
order, so whole constant chains fold in one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.core._evaluate import EvaluationUnsupported, evaluate_node
from passes.infra._pass import Pass, PassResult, Refusal

MAX_ROUNDS = 32


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate constant subgraphs and static shape queries; turn Constant nodes into initializers."""

    name = "fold-constants"
    blind_to_dead_code = True
    lifts_constant_nodes = True
    max_bytes: int = field(
        default=2**20, metadata={"min": 0, "help": "largest folded output (bytes) unless no larger than its inputs"}
    )
    fold_shapes: bool = field(default=True, metadata={"help": "fold Shape/Size of tensors with static dims"})

    def call(self, graph: gs.Graph) -> PassResult:
        stats = {"nodes_folded": 0, "shapes_folded": 0, "constant_nodes_lifted": 0}
        refusals: dict[int, Refusal] = {}  # by node: the last sweep that looked at the node says
        modified = False
        only: set[int] | None = None  # after the first sweep: the nodes new types may let fold
        for _ in range(MAX_ROUNDS):
            computed: list[gs.Tensor] = []  # computed tensors that became constants this round
            if not self._fold_round(graph, stats, computed, refusals, only):
                break
            modified = True
            if not self.fold_shapes or not _shape_queries_may_improve(graph):
                break
            # new constants can make more shapes static (a Reshape target, a Range limit): re-infer what
            # reads them, so one run reaches the state a fresh import would see and a second run changes nothing
            retyped: list[gs.Tensor] = []
            ir.refresh_shapes(graph, computed, news=retyped)
            only = _shape_queries_of(retyped)
        else:
            raise self.violation(f"folding did not settle in {MAX_ROUNDS} rounds")
        alive = [id(node) for node in graph.nodes]
        return PassResult(graph, modified, stats, [refusals[key] for key in alive if key in refusals])

    def _fold_round(self, graph: gs.Graph, stats: dict[str, int], computed: list[gs.Tensor],
                    refusals: dict[int, Refusal], only: set[int] | None) -> bool:
        """One topological sweep over every node, or over the nodes in `only` and whatever reads what
        folds in the sweep; returns whether anything folded. The constants that replaced computed tensors
        go to `computed` (lifted Constant nodes change no type); each node looked at updates `refusals`.

        Between sweeps only types change (inference), and of what a node's folding depends on only the
        shape queries read types: everything else that can fold folded in the first sweep, which sees
        each new constant before its readers."""
        outputs = ir.graph_output_ids(graph)
        opset = ir.opset_version(graph)
        folded: list[gs.Node] = []
        replacements: dict[int, list[gs.Node]] = {}
        for node in graph.nodes:
            if only is not None:
                if id(node) not in only:
                    continue
                only.update(id(reader) for tensor in node.outputs for reader in tensor.outputs)  # if it folds
            refusals.pop(id(node), None)
            if node.op == "Constant" and ir.is_default_domain(node):
                if _lift_constant_node(node, outputs):
                    folded.append(node)
                    stats["constant_nodes_lifted"] += 1
                continue
            values, reason = self._evaluate(node, opset)
            if values is None:
                if reason:
                    refusals[id(node)] = Refusal(node.name or node.op, reason)
                continue
            shape_query = node.op in ("Shape", "Size") or _reads_shape(node)
            replacements[id(node)] = _replace_with_constants(node, values, outputs, computed)
            folded.append(node)
            stats["shapes_folded" if shape_query else "nodes_folded"] += 1
        if folded:
            gone = {id(n) for n in folded}
            graph.nodes = [r for n in graph.nodes for r in (replacements.get(id(n), []) if id(n) in gone else [n])]
        return bool(folded)

    def _evaluate(self, node: gs.Node, opset: int) -> tuple[list[np.ndarray] | None, str]:
        """The node's output values, or None and a refusal reason ("" when simply not constant)."""
        if not ir.is_default_domain(node) or not node.outputs:
            return None, ""
        if node.op in ("Shape", "Size") and node.inputs and not isinstance(node.inputs[0], gs.Constant):
            if self.fold_shapes and ir.constant_value(node.inputs[0]) is None:
                return _static_shape_query(node), ""
        if node.op == "Gather" and self.fold_shapes and len(node.inputs) == 2:
            picked = _static_dims_gathered(node)
            if picked is not None:
                return [picked], ""
        if not node.inputs:
            return None, ""
        for tensor in node.inputs:  # most nodes read a computed tensor: say so before loading anything
            if type(tensor) is not gs.Constant and tensor.name:
                made_by = tensor.inputs
                if not made_by or made_by[0].op != "Constant":
                    return None, ""
        if node.op == "DequantizeLinear":
            return None, "DequantizeLinear keeps its weight quantized (folding would store it as float again)"
        inputs: list[np.ndarray | None] = []
        for tensor in node.inputs:
            if not tensor.name and isinstance(tensor, gs.Variable):
                inputs.append(None)
                continue
            value = ir.constant_value(tensor)
            if value is None:
                return None, ""
            inputs.append(value)
        try:
            values = evaluate_node(
                node.op, node.domain or "", inputs, node.attrs, opset=opset, num_outputs=len(node.outputs)
            )
        except EvaluationUnsupported as err:
            return None, f"cannot evaluate: {err}"
        except Exception as err:  # the node would fail at run time too; leave it for the runtime to report
            return None, f"evaluation failed: {type(err).__name__}: {err}"
        return self._within_cap(values, inputs)

    def _within_cap(
        self, values: list[np.ndarray], inputs: Sequence[np.ndarray | None]
    ) -> tuple[list[np.ndarray] | None, str]:
        out_bytes = sum(v.nbytes for v in values)
        in_bytes = sum(v.nbytes for v in inputs if v is not None)
        if out_bytes > self.max_bytes and out_bytes > in_bytes:
            return None, f"folding would grow {in_bytes} B of constants into {out_bytes} B (max_bytes={self.max_bytes})"
        return values, ""


def _static_shape_query(node: gs.Node) -> list[np.ndarray] | None:
    """Fold Shape{start,end}/Size when the dims it reads are statically known."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    if node.op == "Size":
        if all(_is_static(d) for d in shape):
            return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
        return None
    dims = _shape_slice(node)
    if dims is not None and all(_is_static(d) for d in dims):
        return [np.array(dims, dtype=np.int64)]
    return None


def _static_dims_gathered(node: gs.Node) -> np.ndarray | None:
    """Gather(Shape(x), const indices) when the gathered dims of x are static, even if others are not."""
    source = ir.producer(node.inputs[0])
    if source is None or source.op != "Shape" or not ir.is_default_domain(source):
        return None
    dims = _shape_slice(source)
    if not dims or not any(_is_static(d) for d in dims):  # nothing it gathers can be static
        return None
    indices = ir.constant_value(node.inputs[1])
    if indices is None or indices.dtype.kind not in "iu":
        return None
    wanted = indices.reshape(-1).tolist()  # a few ints: Python's own, not numpy's per-call overhead
    if any(i < -len(dims) or i >= len(dims) for i in wanted):
        return None  # out of range: leave the error to the runtime
    picked = [dims[i] for i in wanted]
    if not all(_is_static(d) for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(indices.shape)


def _shape_queries_may_improve(graph: gs.Graph) -> bool:
    """Whether re-running shape inference could let a remaining shape query fold.

    A query folds when the dims it reads are static. Dims named by a graph input's symbol (`batch`,
    `seq`) stay symbolic whatever inference learns (only binding the input fixes them); an unknown
    dim, a rank not yet known or an inference-made name (`unk__3`) might turn into a number."""
    symbols = {d for t in graph.inputs if t.shape is not None for d in t.shape if isinstance(d, str)}
    for node in graph.nodes:
        if node.op not in ("Shape", "Size") or not node.inputs:
            continue
        dims = node.inputs[0].shape if node.op == "Size" else _shape_slice(node)
        if dims is None or any(not _is_static(d) and d not in symbols for d in dims):
            return True
    return False


def _shape_queries_of(retyped: list[gs.Tensor]) -> set[int]:
    """The nodes a type change can let fold: the Shape and Size nodes reading a retyped tensor, and the
    Gathers of what those Shape nodes compute."""
    queries: set[int] = set()
    for tensor in retyped:
        for reader in tensor.outputs:
            if reader.op in ("Shape", "Size"):
                queries.add(id(reader))
                queries.update(id(gather) for out in reader.outputs for gather in out.outputs if gather.op == "Gather")
    return queries


def _reads_shape(node: gs.Node) -> bool:
    source = ir.producer(node.inputs[0]) if node.inputs else None
    return node.op == "Gather" and source is not None and source.op == "Shape"


def _shape_slice(shape_node: gs.Node) -> list[object] | None:
    """The dims a Shape node returns (static ints or symbols), or None if the rank is unknown."""
    shape = shape_node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start = _clamp_axis(int(shape_node.attrs.get("start", 0)), rank)
    end = _clamp_axis(int(shape_node.attrs.get("end", rank)), rank)
    return list(shape[start:end]) if start < end else []


def _is_static(dim: object) -> bool:
    return isinstance(dim, (int, np.integer)) and int(dim) >= 0


def _clamp_axis(axis: int, rank: int) -> int:
    """ONNX Shape semantics: negative counts from the end, then clamp into [0, rank]."""
    if axis < 0:
        axis += rank
    return min(max(axis, 0), rank)


def _lift_constant_node(node: gs.Node, outputs: set[int]) -> bool:
    """Constant node -> initializer (kept as a node when it produces a graph output)."""
    out = node.outputs[0]
    if id(out) in outputs:
        return False
    value = node.attrs.get("value")  # (the sweep hands over default-domain Constant nodes only)
    if not isinstance(value, gs.Constant):  # sparse_value, value_ints and kin, an attribute reference: leave it
        return False
    # the attribute's values as they are, unloaded (the initializer is the attribute's TensorProto renamed)
    ir.replace_all_uses(out, ir.new_constant(out.name, value._values, export_dtype=value.__dict__.get("_export_dtype")))
    ir.detach_node(node)
    return True


def _replace_with_constants(node: gs.Node, values: list[np.ndarray], outputs: set[int],
                            computed: list[gs.Tensor]) -> list[gs.Node]:
    """Swap the node's outputs for constants (each goes to `computed`); return the Constant nodes that
    take its place, if any."""
    kept_as_nodes: list[tuple[gs.Tensor, np.ndarray]] = []
    for tensor, value in zip(list(node.outputs), values):
        value = np.asarray(value)
        if id(tensor) in outputs:  # a graph output cannot be an initializer: produce it with a Constant node
            kept_as_nodes.append((tensor, value))
        else:
            constant = ir.new_constant(tensor.name, value)
            ir.replace_all_uses(tensor, constant)
            computed.append(constant)
    ir.detach_node(node)
    replacements = []
    for tensor, value in kept_as_nodes:
        tensor.dtype, tensor.shape = value.dtype, list(value.shape)
        attrs = {"value": gs.Constant(f"{tensor.name}/value", value)}
        replacements.append(gs.Node("Constant", name=f"{tensor.name}/folded", attrs=attrs, outputs=[tensor]))
    return replacements
