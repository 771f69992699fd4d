"""Weightless copies of a model or graph ("skeletons"), for shape inference and the ONNX checker.

A skeleton keeps nodes, graph inputs and outputs and small constants; constants past `INLINE_BYTES`
become typed graph inputs, so a skeleton costs the same for a 100 KB and a 10 GB model and never meets
protobuf's 2 GiB limit. The pass manager builds one after every modifying pass (checker) and fold-
constants one per round (inference), so a graph's skeleton is built as *serialized bytes* joined from
per-node and per-constant pieces cached on the graph: a piece is re-encoded only when its node or constant
changed, and no message is copied (protobuf's `extend` copies each message through serialisation, which
was most of the cost). The onnx checker and shape inference take the bytes as they are.

A node's piece is kept on the node itself until the node changes. Changes are seen as they happen, not by
comparing every node on every walk (which cost 12 ms per walk on a 6,500-node graph, eight walks a
pipeline run): `passes.core._gs_compat` hooks graphsurgeon's mutators (Node attribute writes, the
synchronized input/output lists on either side, a tensor's rename or change of kind) to call `touch`,
and `passes.core.ir`'s own list surgery does the same. Attribute dicts are the exception (passes write
`node.attrs[key] = value`): their values are compared by identity on every walk. With
PASSES_CHECK_CONTRACTS=1 (the test suite) every clean node is also compared field by field, and a piece
kept past a change raises: a mutation path that forgets to `touch` fails the tests instead of writing a
stale node. Re-exported by `passes.core.ir`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters import onnx_exporter
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from passes.core._lift import take_lifted
from passes.core._opsets import DEFAULT_DOMAINS
from passes.core._validate import RAW_DTYPES, proto_size, tensor_nbytes
from passes.core._walk import has_subgraph

#: constants larger than this are handed to inference and the checker as typed inputs, without their bytes.
#: Inference reads values only where they decide a shape (Reshape targets, Slice starts, Range limits: a
#: few int64s); inlining every small weight made the skeleton of a 32-layer model with 64-wide layers 30 MB
#: that the checker and inference parsed after every pass.
INLINE_BYTES = 4 * 1024

_CACHE = "_passes_protos"
#: numpy types whose raw bytes are the ONNX raw_data as they are (the exporter's general path is 5x slower)
_PLAIN = frozenset(RAW_DTYPES.values())
#: a node's cached piece, kept in the node's __dict__ under `_PIECE` until `touch` drops it: the serialized
#: piece, the constants the node reads, the ids of its attribute names and values, those objects (held so that no
#: id can be reused while the entry lives) and, when contracts are checked, its full key
_Entry = tuple[bytes, tuple[gs.Constant, ...], list[int], list[object], "tuple[object, ...] | None"]
_PIECE = "_passes_piece"
#: per imported graph: its nodes' pieces as the import encoded them (the seeded entries hold the same bytes)
IMPORTED_PIECES = "_passes_imported_pieces"
#: per graph: constant id -> (constant, values object, name, piece); variable id ->
#: (variable, name, dtype, shape, type, value_info piece)
_Cache = tuple[dict[int, tuple[object, ...]], dict[int, tuple[object, ...]]]
# GraphProto and ModelProto field numbers
_NODE, _INITIALIZER, _INPUT, _OUTPUT, _VALUE_INFO, _GRAPH = 1, 5, 11, 12, 13, 7
_TENSOR_NAME = 8  # TensorProto.name
_VI_NAME, _VI_TYPE = 1, 2  # ValueInfoProto.name, .type


def model_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without large initializer bytes: those become typed graph inputs."""
    return onnx.ModelProto.FromString(_model_skeleton(model, None))


def graph_skeleton(graph: gs.Graph) -> bytes:
    """The serialized skeleton of a graph: nodes, inputs, outputs and small constants."""
    cache = _protos(graph)
    body = onnx.GraphProto(name=graph.name or "graph").SerializeToString()
    pieces = [body]
    constants: dict[str, gs.Constant] = {}
    pieces.extend(_walk_nodes(graph, constants))
    for tensor in graph.outputs:
        if isinstance(tensor, gs.Constant) and tensor.name:
            constants[tensor.name] = tensor
    pieces.extend(_field(_INPUT, value_info_bytes(t)) for t in graph.inputs)
    pieces.extend(_field(_OUTPUT, value_info_bytes(t)) for t in graph.outputs)
    pieces.extend(_constant_piece(t, cache) for t in constants.values() if not isinstance(t._values, SparseValues))
    _forget_the_dead(graph, cache, constants)
    return _empty_header(graph) + _field(_GRAPH, b"".join(pieces))


def _empty_header(graph: gs.Graph) -> bytes:
    """A serialized ModelProto with the graph's IR version and opsets and no graph."""
    meta = graph.__dict__.get("_passes_model_meta")
    opsets = [onnx.helper.make_opsetid("", int(graph.opset))]
    opsets += [e for e in getattr(graph, "import_domains", None) or () if e.domain not in DEFAULT_DOMAINS]
    return _empty_like(meta.ir_version if meta is not None else 8, opsets, [], "").SerializeToString()


def _forget_the_dead(graph: gs.Graph, cache: _Cache, constants: dict[str, gs.Constant]) -> None:
    """Drop the cache entries of constants the graph no longer has: an entry pins its object, and a replaced
    weight (loaded by the pass that replaced it) would stay in memory with the graph. (A node's piece lives
    on the node and goes with it.)"""
    live_constants = {id(t) for t in constants.values()}
    for key in [key for key in cache[0] if key not in live_constants]:
        del cache[0][key]


def node_pieces(graph: gs.Graph) -> bytes:
    """The graph's nodes as serialized GraphProto `node` fields (parse them with `MergeFromString`)."""
    return b"".join(_walk_nodes(graph, None))


def _walk_nodes(graph: gs.Graph, constants: dict[str, gs.Constant] | None) -> list[bytes]:
    """Each node's piece, in order; the constants the nodes read are gathered into `constants`."""
    entries = node_entries(graph.nodes)
    if constants is not None:
        for entry in entries:
            for tensor in entry[1]:
                constants[tensor.name] = tensor
    return [entry[0] for entry in entries]


def node_entries(nodes: Iterable[gs.Node]) -> list[_Entry]:
    """Each node's cache entry (piece first), in order, re-encoding the nodes that changed."""
    entries: list[_Entry] = []
    append = entries.append
    verify = contracts_checked()
    for node in nodes:  # the hot loop: a clean node costs two lookups and its attributes' ids
        fields = node.__dict__
        entry = fields.get(_PIECE)
        attrs = fields["attrs"]
        if entry is None or ((attrs or entry[2]) and [*map(id, attrs), *map(id, attrs.values())] != entry[2]):
            entry = _node_entry(node, verify)
        elif verify:
            _verify_clean(node, entry)
        append(entry)
    return entries


def region_skeleton(graph: gs.Graph, nodes: list[gs.Node], outputs: dict[str, gs.Tensor]) -> bytes:
    """A skeleton of `nodes` alone (in order; `outputs`: the tensors they make, by name): what they read
    from elsewhere becomes typed inputs, constants as in any skeleton."""
    cache = _protos(graph)
    pieces = [onnx.GraphProto(name=graph.name or "graph").SerializeToString()]
    boundary: dict[str, gs.Tensor] = {}
    for node, entry in zip(nodes, node_entries(nodes)):
        pieces.append(entry[0])
        for tensor in node.inputs:
            if tensor.name and tensor.name not in outputs:
                boundary[tensor.name] = tensor
    for tensor in boundary.values():
        if type(tensor) is gs.Constant:
            pieces.append(_constant_piece(tensor, cache))
        else:
            pieces.append(_field(_INPUT, value_info_bytes(tensor)))
    return _empty_header(graph) + _field(_GRAPH, b"".join(pieces))


#: serialized TypeProtos of plain tensor types by (ONNX element type, dims): a 32-layer model's ~3,000 typed
#: tensors have a few hundred types, and onnx.helper builds each message field by field
_TENSOR_TYPES: dict[tuple[object, ...], bytes] = {}
_PLAIN_DIMS = (int, str, type(None))


def value_info_bytes(tensor: gs.Tensor) -> bytes:
    """`OnnxExporter.export_value_info_proto(tensor, False).SerializeToString()`, a plain tensor type encoded
    once per distinct type (the bytes are the same: tests/core/test_skeleton.py)."""
    fields = tensor.__dict__
    dtype, shape = fields.get("dtype"), fields.get("shape")
    if (type(tensor) is not gs.Variable or dtype is None or fields.get("type") != "tensor_type"
            or (shape is not None and not all(type(d) in _PLAIN_DIMS for d in shape))):
        return OnnxExporter.export_value_info_proto(tensor, False).SerializeToString()  # as graphsurgeon does
    return _typed(tensor.name, onnx_exporter.dtype_to_onnx(dtype), None if shape is None else tuple(shape))


def _typed(name: str, elem: int, dims: tuple[object, ...] | None) -> bytes:
    """`make_tensor_value_info(name, elem, dims).SerializeToString()`, the type encoded once per distinct type
    (a large constant's typed input in a skeleton, a typed tensor's value_info)."""
    key = (elem, dims)
    encoded = _TENSOR_TYPES.get(key)
    if encoded is None:
        if len(_TENSOR_TYPES) > 1 << 16:
            _TENSOR_TYPES.clear()
        encoded = _TENSOR_TYPES[key] = onnx.helper.make_tensor_type_proto(elem, dims).SerializeToString()
    return _field(_VI_NAME, name.encode()) + _field(_VI_TYPE, encoded)


def value_info_pieces(graph: gs.Graph, tensors: Iterable[gs.Variable]) -> bytes:
    """The tensors as serialized GraphProto `value_info` fields, each re-encoded only when its name, dtype,
    shape or type changed (an export writes one per typed tensor: thousands in a dynamo export)."""
    variables = _protos(graph)[1]
    pieces = []
    for tensor in tensors:
        fields = tensor.__dict__
        name, dtype, shape, kind = fields.get("name"), fields.get("dtype"), fields.get("shape"), fields.get("type")
        entry = variables.get(id(tensor))
        if (entry is None or entry[0] is not tensor or entry[1] != name or entry[2] is not dtype
                or entry[3] != shape or entry[4] != kind):
            entry = variables[id(tensor)] = (tensor, name, dtype, list(shape) if shape is not None else None, kind,
                                             _field(_VALUE_INFO, value_info_bytes(tensor)))
        pieces.append(entry[5])
    return b"".join(pieces)


def import_skeleton(graph: gs.Graph, model: onnx.ModelProto) -> bytes:
    """The serialized `model_skeleton` of `model`, the model `graph` was just imported from (value_info and
    functions kept, for inference at import); its pieces seed the cache of `graph`: the model's own
    serialized nodes serve later skeletons and exports while the nodes stay unchanged."""
    return _model_skeleton(model, graph)


def _model_skeleton(model: onnx.ModelProto, graph: gs.Graph | None) -> bytes:
    header = _empty_like(model.ir_version, model.opset_import, model.functions, "")
    source = model.graph
    pieces = [onnx.GraphProto(name=source.name).SerializeToString()]
    lifted = take_lifted(graph) if graph is not None else {}  # Constant nodes imported as constants
    nodes = graph.nodes if graph is not None and len(graph.nodes) + len(lifted) == len(source.node) else None
    verify = contracts_checked()
    position = 0
    for index, proto in enumerate(source.node):
        if lifted and index in lifted:
            continue
        piece = _field(_NODE, proto.SerializeToString())
        pieces.append(piece)
        node = nodes[position] if nodes is not None else None
        position += 1
        if node is not None and node.op == proto.op_type and not has_subgraph(node):
            node.__dict__[_PIECE] = _new_entry(node, piece, verify)
    if graph is not None:  # the nodes as imported, for the graph's first check (`passes.core._check`)
        graph.__dict__[IMPORTED_PIECES] = pieces[1:]
    for number, values in ((_INPUT, source.input), (_OUTPUT, source.output), (_VALUE_INFO, source.value_info)):
        pieces.extend(_field(number, value.SerializeToString()) for value in values)
    for init in source.initializer:
        if proto_size(init) > INLINE_BYTES or _hollow_and_large(init):
            pieces.append(_field(_INPUT, _typed(init.name, init.data_type, tuple(init.dims))))
        else:
            pieces.append(_field(_INITIALIZER, init.SerializeToString()))
    if lifted:
        cache = _protos(graph)  # type: ignore[arg-type]
        pieces.extend(_constant_piece(constant, cache) for constant in lifted.values())
    return header.SerializeToString() + _field(_GRAPH, b"".join(pieces))


def _hollow_and_large(tensor: onnx.TensorProto) -> bool:
    """A hollow initializer (dims and type, no bytes: `ir.hollow_export`) whose values would be large."""
    if tensor.ByteSize() > INLINE_BYTES or tensor.raw_data or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    try:
        return tensor_nbytes(tensor) > INLINE_BYTES
    except (KeyError, TypeError, ValueError):
        return False


def _protos(graph: gs.Graph) -> _Cache:
    cache = graph.__dict__.get(_CACHE)
    if cache is None:
        cache = graph.__dict__[_CACHE] = ({}, {})
    return cache


def touch(item: object) -> None:
    """Forget the cached piece of a node that is about to change (anything else: nothing to forget)."""
    item.__dict__.pop(_PIECE, None)


def cached_entry(node: gs.Node) -> _Entry | None:
    """The node's cache entry as it stands (None once `touch` took it)."""
    return node.__dict__.get(_PIECE)


def keep_piece(node: gs.Node, entry: _Entry) -> None:
    """Give back a node the piece `touch` took when an input was swapped for a tensor of the same name (a
    variable for its constant): the bytes hold; what the node reads is looked up again."""
    node.__dict__[_PIECE] = (entry[0], tuple(t for t in node.inputs if type(t) is gs.Constant and t.name),
                             entry[2], entry[3], _node_key(node) if entry[4] is not None else None)


def contracts_checked() -> bool:
    """Whether the environment asks for the expensive contract checks (PASSES_CHECK_CONTRACTS=1: the test
    suite sets it; `PassManager.check_contracts` defaults to it)."""
    return os.environ.get("PASSES_CHECK_CONTRACTS", "") not in ("", "0")


def _new_entry(node: gs.Node, piece: bytes, verify: bool) -> _Entry:
    held = [*node.attrs, *node.attrs.values()]
    return (piece, tuple(t for t in node.inputs if type(t) is gs.Constant and t.name),
            [*map(id, held)], held, _node_key(node) if verify else None)


def _node_entry(node: gs.Node, verify: bool) -> _Entry:
    """The node's entry, its piece encoded; kept on the node unless it has a subgraph (a change inside a
    subgraph does not touch the node), so those are exported afresh every time."""
    entry = _new_entry(node, _field(_NODE, OnnxExporter.export_node(node).SerializeToString()), verify)
    if not has_subgraph(node):
        node.__dict__[_PIECE] = entry
    else:
        node.__dict__.pop(_PIECE, None)
    return entry


def _verify_clean(node: gs.Node, entry: _Entry) -> None:
    """Contract mode: a node whose piece is kept must be what it was when the piece was encoded."""
    if entry[4] is not None and entry[4] != _node_key(node):
        raise AssertionError(
            f"node {node.name!r} ({node.op}) changed without `_skeleton.touch`: its cached piece is stale "
            f"(was {entry[4]!r}, now {_node_key(node)!r}); a mutation path bypasses the hooks in _gs_compat"
        )


def _constant_piece(tensor: gs.Constant, cache: _Cache) -> bytes:
    """A small constant as an initializer, a large one as a typed input; cached while the constant
    holds the same values object under the same name."""
    constants = cache[0]
    values = tensor._values
    entry = constants.get(id(tensor))
    if entry is not None and entry[0] is tensor and entry[1] is values and entry[2] == tensor.name:
        return entry[3]  # type: ignore[return-value]
    if type(values) is LazyValues and values.nbytes <= INLINE_BYTES:  # (its size by type and dims)
        piece = _unloaded_piece(tensor.name, values.tensor)  # the common case (lifted Constant nodes), in short
        if piece is not None:
            constants[id(tensor)] = (tensor, values, tensor.name, piece)
            return piece
    if isinstance(values.dtype, (int, np.integer)):  # types numpy lacks: graphsurgeon keeps the enum
        elem, dtype = int(values.dtype), onnx.helper.tensor_dtype_to_np_dtype(int(values.dtype))
    else:
        dtype = np.dtype(values.dtype)
        elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    if math.prod(values.shape) * dtype.itemsize > INLINE_BYTES:
        piece = _field(_INPUT, _typed(tensor.name, elem, tuple(values.shape)))
    elif type(values) is np.ndarray and dtype in _PLAIN and tensor.__dict__.get("_export_dtype") is None:
        proto = onnx.TensorProto(name=tensor.name, data_type=elem, dims=values.shape, raw_data=values.tobytes())
        piece = _field(_INITIALIZER, proto.SerializeToString())
    else:
        piece = _field(_INITIALIZER, OnnxExporter.export_tensor_proto(tensor).SerializeToString())
    constants[id(tensor)] = (tensor, values, tensor.name, piece)
    return piece


def _unloaded_piece(name: str, proto: onnx.TensorProto) -> bytes | None:
    """An unloaded TensorProto (an initializer, a lifted Constant node's value) as an initializer piece: its
    bytes, renamed by a later `name` field; None for external data."""
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        return None
    renamed = b"" if proto.name == name else _field(_TENSOR_NAME, name.encode())
    return _field(_INITIALIZER, proto.SerializeToString() + renamed)


def _node_key(node: gs.Node) -> tuple[object, ...]:
    """Everything a node's piece is made from (contract checks compare it; the walk does not)."""
    attrs = node.attrs
    return (node.op, node.domain, node.name, [t.name for t in node.inputs], [t.name for t in node.outputs],
            [*attrs], [*map(id, attrs.values())], [type(t) for t in node.inputs])


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: tag, length, payload (the hot path: ~14,000 a pipeline run
    on the 32-layer sample; most lengths take one or two bytes)."""
    size = len(payload)
    if size < 0x80:
        return _TAGS[number] + _ONE_BYTE[size] + payload
    if size < 0x4000:
        return _TAGS[number] + bytes((size & 0x7F | 0x80, size >> 7)) + payload
    return _TAGS[number] + _varint(size) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]
#: the tag of a length-delimited field, by field number (GraphProto's and ModelProto's fields are all < 16)
_TAGS = [_varint(number << 3 | 2) for number in range(16)]


def _empty_like(ir_version: int, opsets: Iterable[onnx.OperatorSetIdProto], functions: Iterable[onnx.FunctionProto],
                name: str) -> onnx.ModelProto:
    skeleton = onnx.ModelProto(ir_version=ir_version)
    skeleton.opset_import.extend(opsets)
    skeleton.functions.extend(functions)
    if name:
        skeleton.graph.name = name
    return skeleton
