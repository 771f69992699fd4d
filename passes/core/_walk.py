"""Walks over a graphsurgeon graph that every pass run needs, written for speed. Re-exported by `ir`."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """Name -> tensor for the top-level graph (graph inputs, node inputs and outputs, graph outputs;
    empty optional inputs left out), in graphsurgeon's `Graph.tensors()` order and with its last-wins
    rule for a name held twice. `Graph.tensors()` builds a list per node and costs several times more."""
    found: dict[str, gs.Tensor] = {}
    for tensor in graph.inputs:
        if tensor.name:
            found[tensor.name] = tensor
    for node in graph.nodes:
        for tensor in node.inputs:
            if tensor.name:
                found[tensor.name] = tensor
        for tensor in node.outputs:
            if tensor.name:
                found[tensor.name] = tensor
    for tensor in graph.outputs:
        if tensor.name:
            found[tensor.name] = tensor
    return found


def has_subgraph(node: gs.Node) -> bool:
    """Whether an attribute of the node holds a graph (If branches, Loop/Scan bodies): a test every walk
    makes for every node, so no generator."""
    attrs = node.attrs
    if not attrs:
        return False
    for value in attrs.values():
        if isinstance(value, gs.Graph):
            return True
        if isinstance(value, (list, tuple)) and any(isinstance(v, gs.Graph) for v in value):
            return True
    return False
