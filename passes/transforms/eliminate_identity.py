"""`eliminate-identity`: remove ops that return their input unchanged.

    Identity(x) -> x
    Dropout(x) -> x                       (inference: no training_mode input or a constant false, mask unused)
    Cast(x, to=type(x)) -> x

Consumers are rewired to the input. When the op's output is a graph output the output name must
survive: the producer of the input is renamed to produce it instead, which is only possible when the
input is an inner tensor used by nothing else; otherwise the op stays, with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, Refusal


@dataclass(frozen=True)
class EliminateIdentity(Pass):
    """Remove Identity, inference-mode Dropout and same-type Cast nodes."""

    name = "eliminate-identity"

    def call(self, graph: gs.Graph) -> PassResult:
        outputs = ir.graph_output_ids(graph)
        removed: list[gs.Node] = []
        refusals: list[Refusal] = []
        feeding_outputs: list[gs.Node] = []
        for node in graph.nodes:
            if _not_an_identity(node) is not None:
                continue
            if id(node.outputs[0]) in outputs:  # after the others: their removal frees the input
                feeding_outputs.append(node)
                continue
            ir.replace_all_uses(node.outputs[0], node.inputs[0])
            ir.detach_node(node)  # now, so later identities in a chain see exact consumer lists
            removed.append(node)
        for node in feeding_outputs:
            refusal = _rename_into_output(node, node.inputs[0], node.outputs[0], outputs)
            if refusal is not None:
                refusals.append(Refusal(node.name or node.op, refusal))
                continue
            ir.detach_node(node)
            removed.append(node)
        ir.remove_nodes(graph, removed)
        return PassResult(graph, bool(removed), {"nodes_removed": len(removed)}, refusals)


def _not_an_identity(node: gs.Node) -> str | None:
    """None when `node` returns its first input unchanged, else why not."""
    if not ir.is_default_domain(node) or not node.inputs or not node.outputs:
        return "not a default-domain op with an input"
    if node.op == "Identity":
        return None
    if node.op == "Dropout":
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return "Dropout mask is used"
        if len(node.inputs) > 2 and node.inputs[2].name:
            training = ir.constant_value(node.inputs[2])
            if training is None or bool(np.asarray(training).reshape(-1)[0]):
                return "Dropout may run in training mode"
        return None
    if node.op == "Cast":
        source_dtype = node.inputs[0].dtype
        target = node.attrs.get("to")
        if source_dtype is None or target is None:
            return "Cast source type unknown"
        return None if _same_dtype(source_dtype, target) else "Cast changes the type"
    return "not an identity op"


def _same_dtype(source: object, target: object) -> bool:
    try:
        return ir.as_np_dtype(source) == ir.as_np_dtype(target)
    except (TypeError, KeyError):
        return False


def _rename_into_output(node: gs.Node, source: gs.Tensor, result: gs.Tensor, outputs: set[int]) -> str | None:
    """Make the producer of `source` write the graph output `result` directly, or say why not."""
    producer = ir.producer(source)
    if producer is None:
        return "output is a graph input or constant passed through"
    if id(source) in outputs:
        return "input is itself a graph output"
    if any(consumer is not node for consumer in source.outputs):
        return "input has other consumers"
    index = next(i for i, t in enumerate(producer.outputs) if t is source)
    ir.detach_node(node)
    ir.set_output(producer, index, result)
    result.dtype = result.dtype or source.dtype
    result.shape = result.shape if result.shape is not None else source.shape
    return None
