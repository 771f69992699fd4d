"""Thin helpers over the onnx-graphsurgeon `Graph`, the mutable IR every pass rewrites.

A model is converted to a `gs.Graph` once per pipeline (`import_graph`) and back once at the end
(`export_model`); passes mutate the graph in place. Helpers here are the few queries every pass needs:
opset versions, op histograms, producer/consumer lookups, node removal that keeps the use lists
consistent, and a cheap structural fingerprint for contract checks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from operator import attrgetter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from passes.core import _export, _gs_compat, _lift
from passes.core._lift import lifted_count  # noqa: F401 (part of ir's surface)
from passes.core._validate import declared_nbytes, densify_sparse_initializers
from passes.core._skeleton import (  # noqa: F401 (part of ir's surface)
    INLINE_BYTES, cached_entry, contracts_checked, graph_skeleton, import_skeleton, keep_piece, model_skeleton, touch,
)
from passes.core._check import check_graph, remember_import  # noqa: F401 (ditto)
from passes.core._walk import has_subgraph, tensor_map  # noqa: F401 (ditto)
from passes.core._infer import DIM_RUN, OUR_DIM_BYTES, as_np_dtype, infer_into, refresh_shapes  # noqa: F401 (ditto)
from passes.core._fingerprint import fingerprint, node_count, node_identity  # noqa: F401 (part of ir's surface)
from passes.core._opsets import DEFAULT_DOMAINS, opset_version, set_opset_version  # noqa: F401 (ditto)


_gs_compat.install()

Graph = gs.Graph
Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable



def import_graph(model: onnx.ModelProto, *, infer_shapes: bool = True,
                 weights: Mapping[str, np.ndarray] | None = None, lift_constants: bool = False) -> gs.Graph:
    """Convert a model to a graphsurgeon graph and annotate it with ONNX shape inference.

    Inference runs on a copy of the model without its large weights, so it costs the same for a
    100 KB and a 10 GB model and never hits protobuf's 2 GB limit. The model is not modified.
    Sparse initializers become the dense constants they stand for (as `load_model` makes them).
    `weights` gives the values of hollow initializers (`hollow_export`) by name; the graph holds those
    arrays themselves. `lift_constants` imports the main graph's Constant nodes as the initializers
    fold-constants would make of them (`passes.core._lift`; `lifted_count` says how many).
    """
    if model.graph.sparse_initializer:
        dense = onnx.ModelProto()
        dense.CopyFrom(model)
        densify_sparse_initializers(dense, label=f"model '{model.graph.name}'")
        model = dense
    names: dict[str, gs.Tensor] | None = None  # the main graph's tensors by name, when the import tells them
    if lift_constants:
        with _lift.lifting_import(model) as lifting:
            graph = gs.import_onnx(model)
        _lift.drop_placeholders(graph, lifting)
        names = lifting.scope
    else:
        graph = gs.import_onnx(model)
    if weights:
        for tensor in tensor_map(graph).values():
            if type(tensor) is gs.Constant and tensor.name in weights:
                tensor.values = weights[tensor.name]
    graph._passes_model_meta = _model_meta(model)  # carried through to export_model
    skeleton = import_skeleton(graph, model)
    # runs of our inference that named the model's dims (a scan of the bytes: the names sit in its value_info)
    graph.__dict__[DIM_RUN] = max((int(n) for n in OUR_DIM_BYTES.findall(skeleton)), default=0)
    if infer_shapes:
        infer_into(graph, skeleton, names)
    remember_import(graph, skeleton)
    return graph


def weights_past(model: onnx.ModelProto, graph: gs.Graph, limit: int) -> bool:
    """Whether the weights of `model`, imported as `graph`, take more than `limit` bytes by type and dims
    (stored, external or hollow alike): its initializers and the Constant nodes its import lifted (a
    subgraph's own constants are not counted). Reads the protos, not every tensor of the graph."""
    total = _lift.lifted_bytes(graph)
    for tensor in (*model.graph.initializer, *(sparse.values for sparse in model.graph.sparse_initializer)):
        total += declared_nbytes(tensor)
        if total > limit:
            return True
    return total > limit


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """Convert a graph back to a model, restoring the model-level fields graphsurgeon drops."""
    model = _export.export_onnx(graph)
    meta: onnx.ModelProto | None = graph.__dict__.get("_passes_model_meta")
    if meta is not None:
        model.ir_version = meta.ir_version or model.ir_version
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            if meta.HasField(field) and not model.HasField(field):
                setattr(model, field, getattr(meta, field))
        del model.metadata_props[:]
        model.metadata_props.extend(meta.metadata_props)
    return model


def hollow_export(graph: gs.Graph) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph as a model to *run*, without a copy of its weights: constants past `INLINE_BYTES` are
    hollow initializers (name, dims and type, no bytes), and their values come back by name, the graph's
    own arrays (`passes.numerics.verify.ModelRunner(model, weights=values)`). A graph with subgraphs or
    functions is exported whole (no values)."""
    if graph.functions or any(has_subgraph(node) for node in graph.nodes):
        return export_model(graph), {}
    model = onnx.ModelProto.FromString(graph_skeleton(graph))
    meta: onnx.ModelProto | None = graph.__dict__.get("_passes_model_meta")
    if meta is not None:
        model.metadata_props.extend(meta.metadata_props)
    tensors = tensor_map(graph)
    inputs = list(model.graph.input)
    hollow = [info for info in inputs if type(tensors.get(info.name)) is gs.Constant]
    if not hollow:
        return model, {}
    del model.graph.input[:]
    model.graph.input.extend(info for info in inputs if type(tensors.get(info.name)) is not gs.Constant)
    for info in hollow:
        typed = info.type.tensor_type
        model.graph.initializer.add(name=info.name, data_type=typed.elem_type, dims=[d.dim_value for d in typed.shape.dim])
    return model, {info.name: np.asarray(tensors[info.name].values) for info in hollow}


def _model_meta(model: onnx.ModelProto) -> onnx.ModelProto:
    meta = onnx.ModelProto()
    meta.ir_version = model.ir_version
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(field):
            setattr(meta, field, getattr(model, field))
    meta.metadata_props.extend(model.metadata_props)
    return meta


def elem_type(tensor: gs.Tensor) -> int | None:
    """The ONNX element type (TensorProto enum) of a tensor, constants included; None when unknown.
    graphsurgeon keeps types numpy lacks (bfloat16, float8) as the enum itself."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, ValueError, KeyError):
        return None


def op_histogram(graph: gs.Graph | onnx.ModelProto) -> dict[str, int]:
    """Op type -> count for the top-level graph, most frequent first (domain-qualified if custom)."""
    if isinstance(graph, onnx.ModelProto):
        counts = Counter((n.domain, n.op_type) for n in graph.graph.node)
    else:
        nodes = graph.nodes
        domains = set(map(_DOMAIN, nodes))
        if all(not domain or domain in DEFAULT_DOMAINS for domain in domains):  # counting strings alone: 3x faster
            return dict(Counter(map(_OP, nodes)).most_common())
        counts = Counter(zip(map(_DOMAIN, nodes), map(_OP, nodes)))
    merged: Counter[str] = Counter()
    for (domain, op), count in counts.items():
        merged[_qualified(domain, op)] += count
    return dict(merged.most_common())


_DOMAIN, _OP = attrgetter("domain"), attrgetter("op")


def _qualified(domain: str | None, op: str) -> str:
    return op if not domain or domain in DEFAULT_DOMAINS else f"{domain}.{op}"


def is_default_domain(node: gs.Node) -> bool:
    return not node.domain or node.domain in DEFAULT_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that produces `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


#: bytes of a constant's values; a constant not loaded yet stays unloaded
constant_nbytes = _gs_compat.stored_bytes
#: `gs.Constant(name, values)`, built faster
new_constant = _gs_compat.new_constant


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None. An unloaded weight
    past `SMALL_RAW_BYTES` comes as a read-only view over one copy of its bytes, and stays unloaded in the
    graph (a pass that reads every weight of a 600 MB model does not leave a second copy of it behind)."""
    if isinstance(tensor, gs.Constant):
        stored = tensor._values
        if type(stored) is LazyValues:
            value = _gs_compat.small_raw_values(stored)
            if value is None:
                value = _gs_compat.raw_view(stored)
            if value is not None:
                return value
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and is_default_domain(node) and "value" in node.attrs:
        value = node.attrs["value"]
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    """Graph-valued attributes of a node (If branches, Loop/Scan bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, gs.Graph))


def outer_scope_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Tensors of enclosing graphs that a node's subgraphs read (implicit inputs)."""
    if not has_subgraph(node):
        return []
    found: dict[int, gs.Tensor] = {}
    for sub in subgraphs(node):
        local: set[int] = {id(t) for t in sub.inputs}
        for inner in sub.nodes:
            local.update(id(t) for t in inner.outputs)
        for inner in sub.nodes:
            candidates = list(inner.inputs) + outer_scope_inputs(inner)
            for tensor in candidates:
                if id(tensor) not in local and not (isinstance(tensor, gs.Constant) and tensor.name == ""):
                    found.setdefault(id(tensor), tensor)
        for out in sub.outputs:
            if id(out) not in local:
                found.setdefault(id(out), out)
    return list(found.values())


def detach_node(node: gs.Node) -> None:
    """Disconnect a node from its tensors so use lists stay exact (removal from graph.nodes is separate).

    graphsurgeon's own list sync finds the node to unlink by equality, which is slow (Node.__eq__
    compares whole nodes) and can unlink an *equal* twin; this works by identity.
    """
    touch(node)
    for tensor in node.inputs:
        _remove_by_identity(tensor.outputs, node)
    for tensor in node.outputs:
        _remove_by_identity(tensor.inputs, node)
    list.clear(node.inputs)
    list.clear(node.outputs)


def remove_nodes(graph: gs.Graph, nodes: list[gs.Node]) -> None:
    """Detach `nodes` and drop them from the graph's node list, in one sweep of the list."""
    if not nodes:
        return
    for node in nodes:
        detach_node(node)
    gone = {id(n) for n in nodes}
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """node.inputs[index] = tensor, keeping both tensors' consumer lists exact (by identity). The node's
    encoded piece names its inputs: a tensor of the same name (a folded output's constant) keeps it."""
    kept = cached_entry(node) if node.inputs[index].name == tensor.name else None
    touch(node)
    _remove_by_identity(node.inputs[index].outputs, node)
    list.__setitem__(node.inputs, index, tensor)
    list.append(tensor.outputs, node)
    if kept is not None:
        keep_piece(node, kept)


def set_output(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """node.outputs[index] = tensor, keeping both tensors' producer lists exact (by identity)."""
    touch(node)
    _remove_by_identity(node.outputs[index].inputs, node)
    list.__setitem__(node.outputs, index, tensor)
    list.append(tensor.inputs, node)


def set_inputs(node: gs.Node, tensors: list[gs.Tensor]) -> None:
    """node.inputs = tensors, keeping every tensor's consumer list exact (by identity)."""
    touch(node)
    for tensor in node.inputs:
        _remove_by_identity(tensor.outputs, node)
    list.clear(node.inputs)
    for tensor in tensors:
        list.append(node.inputs, tensor)
        list.append(tensor.outputs, node)


def _remove_by_identity(items: list[object], item: object) -> None:
    for index, candidate in enumerate(items):
        if candidate is item:
            list.__delitem__(items, index)
            return


def replace_all_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of `old` at `new` (graph outputs are not consumers: see `graph_outputs`)."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                set_input(consumer, index, new)


def graph_output_ids(graph: gs.Graph) -> set[int]:
    return {id(t) for t in graph.outputs}
