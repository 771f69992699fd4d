"""Constant nodes lifted to initializers while a model is imported (`ir.import_graph(lift_constants=True)`).

TorchScript exports hold a Constant node for every literal: 2,471 of the 6,548 nodes of the 32-layer
sample. fold-constants turns each into an initializer on its first run, after the import built it as a
node (a Node, its output Variable, its attribute), encoded it for inference and the checker, inferred
its type and checked it, all to remove it again. The pass manager imports with lifting when its pipeline
folds constants: the graph then starts where fold-constants' lifting would have left it.

The rule is fold-constants' own (`passes.transforms.fold_constants._lift_constant_node`): a default-domain
Constant node whose `value` is a tensor and whose output is not a graph output becomes a constant of that
name holding the attribute's TensorProto, unloaded. Only nodes of the main graph are lifted (a subgraph is
imported as it is), and only where the import has not met the name yet except in `value_info` (a model
whose nodes are out of order, or that assigns a name twice, keeps its Constant nodes: the checker then
judges it as it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers import onnx_importer

from passes.core._opsets import DEFAULT_DOMAINS

#: per graph made by a lifting import: node index in the model -> the constant that took the node's place
#: (until the import's skeleton takes it), how many nodes were lifted and the bytes their values take
LIFTED, LIFTED_COUNT, LIFTED_BYTES = "_passes_lifted", "_passes_lifted_count", "_passes_lifted_bytes"
#: the lifting of the import under way in this thread, if any: graphsurgeon's node import
#: (`passes.core._gs_compat._import_node`) asks it about every node
LIFTING: ContextVar[Lifting | None] = ContextVar("passes_lifting", default=None)


class Lifting:
    """The state of one lifting import; graphsurgeon's node import asks `take` about every node."""

    #: what `take`'s caller returns for a lifted node: graphsurgeon appends it to the graph's node list (and
    #: walks it for subgraphs: it has no attributes), and `drop_placeholders` takes it out again
    PLACEHOLDER = gs.Node.__new__(gs.Node)
    PLACEHOLDER.__dict__.update(op="", name="", domain=None, attrs={}, inputs=[], outputs=[])

    def __init__(self, outputs: set[str]) -> None:
        self.outputs = outputs
        self.scope: dict[str, gs.Tensor] | None = None  # the main graph's tensors, by name
        self.index = -1
        self.lifted: dict[int, gs.Constant] = {}
        self.nbytes = 0

    def take(self, proto: onnx.NodeProto, scope: dict[str, gs.Tensor]) -> bool:
        """Whether the node was lifted (its constant is in `scope` under the output's name)."""
        if self.scope is None:  # the first node imported is the main graph's (subgraphs come inside nodes)
            self.scope = scope
        elif scope is not self.scope:
            return False
        self.index += 1
        if (proto.op_type != "Constant" or proto.domain not in DEFAULT_DOMAINS or len(proto.output) != 1
                or len(proto.attribute) != 1 or proto.input):
            return False
        attribute = proto.attribute[0]
        if attribute.name != "value" or attribute.type != onnx.AttributeProto.TENSOR or attribute.ref_attr_name:
            return False
        name = proto.output[0]
        if not name or name in self.outputs:
            return False
        known = scope.get(name)  # a Variable of value_info's may stand there; one already in use may not
        if known is not None and (type(known) is not gs.Variable or known.inputs or known.outputs):
            return False
        constant = onnx_importer.OnnxImporter.import_tensor(attribute.t)
        constant.__dict__["name"] = name  # a fresh constant nothing reads yet: no hook needs to see it
        scope[name] = constant
        self.lifted[self.index] = constant
        self.nbytes += constant._values.nbytes  # an unloaded value's size by type and dims
        return True


@contextmanager
def lifting_import(model: onnx.ModelProto) -> Iterator[Lifting]:
    """Lift the model's Constant nodes during the graphsurgeon import run inside the block."""
    lifting = Lifting({output.name for output in model.graph.output})
    token = LIFTING.set(lifting)
    try:
        yield lifting
    finally:
        LIFTING.reset(token)


def drop_placeholders(graph: gs.Graph, lifting: Lifting) -> None:
    """Take the lifted nodes' placeholders out of the imported graph; remember what was lifted."""
    if lifting.lifted:
        placeholder = Lifting.PLACEHOLDER
        graph.nodes = [node for node in graph.nodes if node is not placeholder]
    graph.__dict__[LIFTED] = lifting.lifted
    graph.__dict__[LIFTED_COUNT] = len(lifting.lifted)
    graph.__dict__[LIFTED_BYTES] = lifting.nbytes


def take_lifted(graph: gs.Graph) -> dict[int, Any]:
    """What the import lifted (node index in the model -> constant), handed over once (the graph does not
    pin the constants past their replacement); empty for any other graph."""
    return graph.__dict__.pop(LIFTED, None) or {}


def lifted_count(graph: gs.Graph) -> int:
    """How many Constant nodes the graph's import lifted."""
    return graph.__dict__.get(LIFTED_COUNT, 0)


def lifted_bytes(graph: gs.Graph) -> int:
    """The bytes the values of the Constant nodes the graph's import lifted take."""
    return graph.__dict__.get(LIFTED_BYTES, 0)
