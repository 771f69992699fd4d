"""Hashes of a graph for the pass manager's unchanged-graph checks: `fingerprint` (structure: nodes, wiring,
attributes, tensor types and shapes) and `node_identity` (which node objects, in which order: a hundred
times cheaper, what a pipeline run checks unless full contract checks are on). Re-exported by
`passes.core.ir`."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def fingerprint(graph: gs.Graph) -> int:
    """A structural hash of the top-level graph: nodes, wiring, attributes, tensor types and shapes.

    Constants are identified by object, name, dtype and shape, never loaded or hashed byte by byte
    (so a pass that overwrites a constant's values in place with same-shaped data goes unseen): the
    fingerprint catches passes that change the graph and say they did not, on every run, so it has
    to be cheap: each tensor's properties are read once, wiring is recorded by object identity.
    """
    parts: list[object] = []
    add = parts.append
    tensors: dict[int, gs.Tensor] = {}
    for tensor in graph.inputs:
        tensors[id(tensor)] = tensor
        add(id(tensor))
    for node in graph.nodes:
        add(node.op)
        add(node.name)
        add(node.domain)
        for tensor in node.inputs:
            tensors[id(tensor)] = tensor
            add(id(tensor))
        add(None)
        for tensor in node.outputs:
            tensors[id(tensor)] = tensor
            add(id(tensor))
        if node.attrs:
            add(tuple((k, _attr_key(v)) for k, v in node.attrs.items()))
    for tensor in graph.outputs:
        tensors[id(tensor)] = tensor
        add(id(tensor))
    for key, tensor in tensors.items():
        add(key)
        add(tensor.name)
        if isinstance(tensor, gs.Constant):  # lazily loaded values change identity on first use: skip it
            values = tensor._values
            add((values.dtype, tuple(values.shape)))
        else:
            shape = tensor.shape
            add((_type_key(tensor.dtype), tuple(shape) if shape is not None else None))
    return hash(tuple(parts))


def _type_key(dtype: object) -> object:
    """A tensor's dtype, hashable: graphsurgeon keeps optional and other non-tensor types as TypeProtos."""
    serialize = getattr(dtype, "SerializeToString", None)
    return ("type", serialize(deterministic=True)) if serialize is not None else dtype


def _attr_key(value: object) -> object:
    if isinstance(value, gs.Graph):
        return ("graph", fingerprint(value))
    if isinstance(value, gs.Constant):
        return ("tensor", id(value), value.dtype, tuple(value.shape))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list):
        return tuple(_attr_key(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def node_identity(graph: gs.Graph) -> int:
    """A hash of which node, input and output objects the graph holds, in order: changes when a pass adds,
    removes, reorders or replaces nodes or graph inputs/outputs (not when it rewires or edits one)."""
    return hash((tuple(map(id, graph.nodes)), tuple(map(id, graph.inputs)), tuple(map(id, graph.outputs))))


def node_count(graph: gs.Graph) -> int:
    return len(graph.nodes)


#: initializers larger than this are handed to shape inference as typed inputs, without their bytes.
