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

from passes import ir
from passes._evaluate import EvaluationUnsupported, evaluate_node
from passes._pass import Pass, PassResult, Refusal


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate constant subgraphs and static shape queries; turn Constant nodes into initializers."""

    name = "fold-constants"
    max_bytes: int = field(
        default=2**20, metadata={"help": "largest folded output (bytes) unless no larger than its inputs"}
    )
    fold_shapes: bool = field(default=True, metadata={"help": "fold Shape/Size of tensors with static dims"})

    def call(self, graph: gs.Graph) -> PassResult:
        outputs = ir.graph_output_ids(graph)
        opset = ir.opset_version(graph)
        folded: list[gs.Node] = []
        replacements: dict[int, list[gs.Node]] = {}
        refusals: list[Refusal] = []
        stats = {"nodes_folded": 0, "shapes_folded": 0, "constant_nodes_lifted": 0}
        for node in graph.nodes:
            if node.op == "Constant" and ir.is_default_domain(node):
                if _lift_constant_node(node, outputs):
                    folded.append(node)
                    stats["constant_nodes_lifted"] += 1
                continue
            values, reason = self._evaluate(node, opset)
            if values is None:
                if reason:
                    refusals.append(Refusal(node.name or node.op, reason))
                continue
            replacements[id(node)] = _replace_with_constants(node, values, outputs)
            folded.append(node)
            stats["shapes_folded" if node.op in ("Shape", "Size") else "nodes_folded"] += 1
        if folded:
            gone = {id(n) for n in folded}
            graph.nodes = [r for n in graph.nodes for r in (replacements.get(id(n), []) if id(n) in gone else [n])]
        return PassResult(graph, bool(folded), stats, refusals)

    def _evaluate(self, node: gs.Node, opset: int) -> tuple[list[np.ndarray] | None, str]:
        """The node's output values, or None and a refusal reason ("" when simply not constant)."""
        if not ir.is_default_domain(node) or not node.outputs:
            return None, ""
        if node.op in ("Shape", "Size") and node.inputs and not isinstance(node.inputs[0], gs.Constant):
            if self.fold_shapes and ir.constant_value(node.inputs[0]) is None:
                return _static_shape_query(node), ""
        if not node.inputs:
            return None, ""
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
        if all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
        return None
    rank = len(shape)
    start = _clamp_axis(int(node.attrs.get("start", 0)), rank)
    end = _clamp_axis(int(node.attrs.get("end", rank)), rank)
    dims = list(shape[start:end]) if start < end else []
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        return [np.array(dims, dtype=np.int64)]
    return None


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
    value = ir.constant_value(out)
    if value is None:  # sparse_value or an attribute reference: leave it
        return False
    constant = gs.Constant(out.name, np.asarray(value))
    ir.replace_all_uses(out, constant)
    ir.detach_node(node)
    return True


def _replace_with_constants(node: gs.Node, values: list[np.ndarray], outputs: set[int]) -> list[gs.Node]:
    """Swap the node's outputs for constants; return the Constant nodes that take its place, if any."""
    kept_as_nodes: list[tuple[gs.Tensor, np.ndarray]] = []
    for tensor, value in zip(list(node.outputs), values):
        value = np.asarray(value)
        if id(tensor) in outputs:  # a graph output cannot be an initializer: produce it with a Constant node
            kept_as_nodes.append((tensor, value))
        else:
            ir.replace_all_uses(tensor, gs.Constant(tensor.name, value))
    ir.detach_node(node)
    replacements = []
    for tensor, value in kept_as_nodes:
        tensor.dtype, tensor.shape = value.dtype, list(value.shape)
        attrs = {"value": gs.Constant(f"{tensor.name}/value", value)}
        replacements.append(gs.Node("Constant", name=f"{tensor.name}/folded", attrs=attrs, outputs=[tensor]))
    return replacements
