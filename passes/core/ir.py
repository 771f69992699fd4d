"""Thin helpers over the onnx-graphsurgeon `Graph`, the mutable IR every pass rewrites.

A model is converted to a `gs.Graph` once per pipeline (`import_graph`) and back once at the end
(`export_model`); passes mutate the graph in place. Helpers here are the few queries every pass needs:
opset versions, op histograms, producer/consumer lookups, node removal that keeps the use lists
consistent, and a cheap structural fingerprint for contract checks.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.core import _gs_compat
from passes.core._validate import densify_sparse_initializers
from passes.core._skeleton import (  # noqa: F401 (part of ir's surface)
    _PIECE, INLINE_BYTES, check_graph, contracts_checked, graph_skeleton, import_skeleton, keep_piece, model_skeleton, touch,
)
from passes.core._walk import has_subgraph, tensor_map  # noqa: F401 (ditto)
from passes.core._fingerprint import fingerprint, node_count, node_identity  # noqa: F401 (part of ir's surface)
from passes.core._opsets import DEFAULT_DOMAINS, opset_version, set_opset_version  # noqa: F401 (ditto)


_gs_compat.install()
logger = logging.getLogger(__name__)

Graph = gs.Graph
Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable



def import_graph(model: onnx.ModelProto, *, infer_shapes: bool = True,
                 weights: Mapping[str, np.ndarray] | None = None) -> gs.Graph:
    """Convert a model to a graphsurgeon graph and annotate it with ONNX shape inference.

    Inference runs on a copy of the model without its large weights, so it costs the same for a
    100 KB and a 10 GB model and never hits protobuf's 2 GB limit. The model is not modified.
    Sparse initializers become the dense constants they stand for (as `load_model` makes them).
    `weights` gives the values of hollow initializers (`hollow_export`) by name; the graph holds those
    arrays themselves.
    """
    if model.graph.sparse_initializer:
        dense = onnx.ModelProto()
        dense.CopyFrom(model)
        densify_sparse_initializers(dense, label=f"model '{model.graph.name}'")
        model = dense
    graph = gs.import_onnx(model)
    if weights:
        for tensor in tensor_map(graph).values():
            if type(tensor) is gs.Constant and tensor.name in weights:
                tensor.values = weights[tensor.name]
    graph._passes_model_meta = _model_meta(model)  # carried through to export_model
    skeleton = import_skeleton(graph, model)
    # runs of our inference that named the model's dims (a scan of the bytes: the names sit in its value_info)
    graph.__dict__[_DIM_RUN] = max((int(n) for n in _OUR_DIM_BYTES.findall(skeleton)), default=0)
    if infer_shapes:
        _infer_into(graph, skeleton)
    return graph


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """Convert a graph back to a model, restoring the model-level fields graphsurgeon drops."""
    model = _gs_compat.export_onnx(graph)
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


def as_np_dtype(dtype: object) -> np.dtype:
    """A numpy dtype from what graphsurgeon stores: a numpy type, or an ONNX enum for types numpy
    lacks (bfloat16, float8) which maps to ml_dtypes' numpy types."""
    if isinstance(dtype, (int, np.integer)):
        return onnx.helper.tensor_dtype_to_np_dtype(int(dtype))
    return np.dtype(dtype)  # type: ignore[arg-type]


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
        counts = Counter((n.domain, n.op) for n in graph.nodes)
    merged: Counter[str] = Counter()
    for (domain, op), count in counts.items():
        merged[_qualified(domain, op)] += count
    return dict(merged.most_common())


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
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if isinstance(tensor, gs.Constant):
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
    """node.inputs[index] = tensor, keeping both tensors' consumer lists exact (by identity)."""
    touch(node)
    _remove_by_identity(node.inputs[index].outputs, node)
    list.__setitem__(node.inputs, index, tensor)
    list.append(tensor.outputs, node)


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
    """Point every consumer of `old` at `new` (graph outputs are not consumers: see `graph_outputs`). A
    consumer's encoded piece names its inputs: when `new` has `old`'s name (a folded output's constant) it holds."""
    same_name = old.name == new.name
    for consumer in list(old.outputs):
        piece = consumer.__dict__.get(_PIECE) if same_name else None
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                set_input(consumer, index, new)
        if piece is not None:
            keep_piece(consumer, piece)


def graph_output_ids(graph: gs.Graph) -> set[int]:
    return {id(t) for t in graph.outputs}


def refresh_shapes(graph: gs.Graph) -> int:
    """Re-run ONNX shape inference (with data propagation) and write the results into the graph.

    Inference sees the graph without the bytes of its large constants (they become typed inputs),
    so this costs the same at any model size. Returns how many tensors got a new shape or dtype.
    """
    return _infer_into(graph, graph_skeleton(graph))


def _infer_into(graph: gs.Graph, skeleton: bytes) -> int:
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as err:
        logger.warning("shape inference failed, continuing without it: %s", str(err).splitlines()[0])
        return 0
    tensors = tensor_map(graph)
    fresh = _fresh_dims(graph)
    # what each tensor was last given, as bytes: a re-inference mostly repeats itself, and comparing
    # bytes costs a tenth of applying the type again
    applied: dict[str, tuple[gs.Tensor, bytes, object, object]] = graph.__dict__.setdefault("_passes_applied_types", {})
    converted: dict[bytes, tuple[np.dtype | None, list[object] | None]] = {}  # many tensors share a type
    changed = 0
    for info in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = tensors.get(info.name)
        if tensor is None or type(tensor) is gs.Constant:
            continue
        kind = info.type
        raw = kind.SerializeToString()
        last = applied.get(info.name)
        if last is not None and last[0] is tensor and last[1] == raw and last[2] is tensor.dtype and last[3] == tensor.shape:
            continue
        typed = converted.get(raw)
        if typed is None:
            if not kind.HasField("tensor_type"):
                continue
            typed = converted[raw] = _convert_type(kind.tensor_type, fresh)
        changed += _apply_type(tensor, *typed)
        applied[info.name] = (tensor, raw, tensor.dtype, list(tensor.shape) if tensor.shape is not None else None)
    return changed


_INFERRED_DIM = re.compile(r"unk__\d+")
_OUR_DIM = re.compile(r"passes_dim(\d+)_")
_OUR_DIM_BYTES = re.compile(rb"passes_dim(\d+)_")
#: the graph's last inference run number (see `_fresh_dims`), kept on the graph
_DIM_RUN = "_passes_dim_run"


def _fresh_dims(graph: gs.Graph) -> Callable[[str], str]:
    """Renames for the dims one inference run invents (`unk__N`): every run numbers them from 0, so a
    name kept from an earlier run would claim equal dims that are not (onnxruntime's memory planner
    trusts dim_params and reuses buffers on that claim). A run's names become `passes_dim<run>_<N>`:
    equal within the run, where inference made them equal, and distinct from every other run's (the run
number is past any the graph already holds, so re-imported and reloaded models are safe too)."""
    declared = {dim for tensor in (*graph.inputs, *graph.outputs) for dim in (tensor.shape or ()) if isinstance(dim, str)}
    run: list[int] = []  # found on the first invented name: most runs invent none

    def rename(name: str) -> str:
        if name in declared or not _INFERRED_DIM.fullmatch(name):
            return name
        if not run:  # past every run whose names the graph (or the model it came from) holds
            last = graph.__dict__.get(_DIM_RUN)
            if last is None:  # a graph import_graph did not make: look at its names once
                last = max((int(match.group(1)) for tensor in tensor_map(graph).values()
                            for dim in (tensor.shape or ())
                            if isinstance(dim, str) and (match := _OUR_DIM.match(dim))), default=0)
            run.append(last + 1)
            graph.__dict__[_DIM_RUN] = run[0]
        return f"passes_dim{run[0]}_{name.removeprefix('unk__')}"

    return rename


_NP_DTYPES: dict[int, np.dtype] = {}


def _convert_type(info: onnx.TypeProto.Tensor, rename: Callable[[str], str]) -> tuple[np.dtype | None, list[object] | None]:
    """An inferred tensor type as graphsurgeon keeps it: numpy dtype (None if unset), shape (None if unknown)."""
    dtype = None
    if info.elem_type:
        dtype = _NP_DTYPES.get(info.elem_type)
        if dtype is None:
            dtype = _NP_DTYPES[info.elem_type] = onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)
    shape = None
    if info.HasField("shape"):
        shape = [d.dim_value if kind == "dim_value" else rename(d.dim_param) if kind == "dim_param" and d.dim_param else None
                 for d in info.shape.dim for kind in (d.WhichOneof("value"),)]
    return dtype, shape


def _apply_type(tensor: gs.Tensor, dtype: np.dtype | None, shape: list[object] | None) -> int:
    """Give the tensor an inferred dtype, and the inferred shape when it knows more; 1 if anything changed."""
    changed = 0
    if dtype is not None:
        current = tensor.dtype
        if current is None or current == 0 or (current is not dtype and as_np_dtype(current) != dtype):
            tensor.dtype = dtype
            changed = 1
    if shape is not None:
        old = list(tensor.shape) if tensor.shape is not None else None
        if old != shape and (old is None or _more_static(shape, old)):
            tensor.shape = list(shape)  # a copy: tensors of one type must not share a list
            changed = 1
    return changed


def _more_static(new: list[object], old: list[object]) -> bool:
    """Accept an inferred shape only when it knows more than the graph does (a rank, or more fixed
    dims): inference names unknown dims afresh (`unk__3`) on every run, and renaming them is no news."""
    if len(new) != len(old):
        return True
    return sum(isinstance(d, int) for d in new) > sum(isinstance(d, (int, np.integer)) for d in old)
