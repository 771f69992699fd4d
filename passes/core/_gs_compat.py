"""Gaps in onnx-graphsurgeon 0.5/0.6's exporter, closed where it is imported (`passes.core.ir`):

- a tensor of type `optional(...)` (a graph or subgraph input/output) has no exporter: graphsurgeon
  imports it with `type == "optional_type"` and the element's TypeProto as its dtype, then fails on export
  with an UnboundLocalError;
- a string constant that was loaded (a pass read its values) is exported as raw bytes, which ONNX
  forbids for strings (`TypeError: Can not use raw_data to store string type`);
- TYPE_PROTO attributes (`Optional`'s `type`, `SequenceEmpty`-like ops) are dropped on import with a
  warning, so an empty `Optional` loses its type and the model no longer loads. They are kept as
  TypeProto values, which `onnx.helper.make_attribute` exports as they were.

- the exporter builds the graph with `initializer.extend(...)`, which copies each TensorProto through
  serialisation: a constant past protobuf's 2 GiB limit fails with `EncodeError`. `_export.export_onnx`
  exports the top-level graph itself and copies initializers in with CopyFrom, which has no limit.

- speed: graphsurgeon's `import_node` and `import_tensor` build each Node, Variable and Constant through
  constructors whose `__setattr__` hooks and list syncing cost ~25 us a node (a third of a 6,500-node
  pipeline run). `_import_node` and `_import_tensor` do the same work with the objects' fields set
  directly; `tests/core/test_gs_compat.py` holds them equal to graphsurgeon's own on the node suite.

graphsurgeon's own warnings (printed to stdout: "Model does not contain ONNX domain opset information",
"colored module is not installed", skipped attributes) are raised to errors only: they are not the user's
business, and what they flagged is handled here.

The wrappers hand every other case to graphsurgeon unchanged. The ONNX node suite
(`tests/node_suite`) holds the cases that need them (test_if_opt, test_identity_opt,
test_loop16_seq_none, test_ai_onnx_ml_label_encoder_tensor_mapping).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters import onnx_exporter
from onnx_graphsurgeon.importers import onnx_importer
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.util.misc import SynchronizedList

from passes.core._lift import LIFTING
from passes.core._skeleton import touch
from passes.core._validate import RAW_DTYPES, plain_nbytes, tensor_nbytes
from passes.core._walk import has_subgraph

_PATCHED = "_passes_compat"
#: graphsurgeon's own `import_node`, `import_tensor` and `import_attributes`, replaced by faster twins (kept for the test that
#: holds them equal)
STOCK_IMPORT_NODE: Any = None
STOCK_IMPORT_TENSOR: Any = None
STOCK_IMPORT_ATTRIBUTES: Any = None


#: the most bytes `small_raw_values` reads
SMALL_RAW_BYTES = 4096


_LAYOUT = "_passes_raw_layout"


def raw_layout(values: LazyValues, max_bytes: int) -> tuple[np.dtype, tuple[int, ...], bytes] | None:
    """(numpy dtype, shape, raw bytes) of an unloaded constant of at most `max_bytes` (<= SMALL_RAW_BYTES)
    stored inline as the raw bytes of a plain numpy type; None for anything else. Read once per constant and
    kept on its LazyValues (the TensorProto is the input model's, which nothing writes); a large one's bytes
    are never read (reading a bytes field copies all of it)."""
    known = values.__dict__.get(_LAYOUT, values)
    if known is values:
        known = values.__dict__[_LAYOUT] = _inline_raw(values.tensor, SMALL_RAW_BYTES)
    if known is None or len(known[2]) > max_bytes:
        return None
    return known


def raw_view(values: LazyValues) -> np.ndarray | None:
    """A read-only view of an unloaded constant of any size stored inline as the raw bytes of a plain numpy
    type, over one copy of its bytes (graphsurgeon's `load` makes two, and `.values` keeps the array on the
    constant for as long as the constant lives); None for anything else."""
    layout = _inline_raw(values.tensor, None)
    return None if layout is None else np.frombuffer(layout[2], layout[0]).reshape(layout[1])


def _inline_raw(proto: onnx.TensorProto, max_bytes: int | None) -> tuple[np.dtype, tuple[int, ...], bytes] | None:
    """(numpy dtype, shape, raw bytes) of a non-empty TensorProto (of at most `max_bytes`) stored inline as the
    raw bytes of a plain numpy type; None for anything else, without reading the bytes of one too large."""
    nbytes = plain_nbytes(proto)
    if not nbytes or (max_bytes is not None and nbytes > max_bytes) or proto.data_location == onnx.TensorProto.EXTERNAL:
        return None
    raw = proto.raw_data
    return (RAW_DTYPES[proto.data_type], tuple(proto.dims), raw) if len(raw) == nbytes else None


def small_raw_values(values: LazyValues) -> np.ndarray | None:
    """The values of a small unloaded constant stored as raw bytes of a plain numpy type (shape vectors,
    axes, scalars), read straight from the bytes; None for anything else (numpy_helper's general reader
    costs 10 us, and graphsurgeon keeps what it loaded, which re-encodes the constant's skeleton piece)."""
    layout = raw_layout(values, SMALL_RAW_BYTES)
    if layout is None:
        return None
    dtype, shape, raw = layout
    return np.frombuffer(raw, dtype).reshape(shape).copy()


def stored_bytes(tensor: gs.Constant) -> int:
    """Bytes a constant's values take, without loading them when they are still lazy."""
    values = tensor._values
    if isinstance(values, LazyValues):
        plain = plain_nbytes(values.tensor)  # plain numeric types: dims and item size say it
        return plain if plain is not None else tensor_nbytes(values.tensor, tensor.name)
    return int(getattr(values, "nbytes", 0))


def install() -> None:
    if getattr(onnx_exporter, _PATCHED, False):
        return
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = max(G_LOGGER.severity, G_LOGGER.ERROR)
    value_info = onnx_exporter.OnnxExporter.export_value_info_proto
    to_tensor = onnx_exporter.constant_to_onnx_tensor

    def export_value_info_proto(tensor: Any, do_type_check: bool) -> onnx.ValueInfoProto:
        if getattr(tensor, "type", None) == "optional_type" and isinstance(tensor.dtype, onnx.TypeProto):
            return onnx.helper.make_value_info(tensor.name, onnx.helper.make_optional_type_proto(tensor.dtype))
        return value_info(tensor, do_type_check)

    def constant_to_onnx_tensor(tensor: Any) -> onnx.TensorProto:
        values = tensor.values
        if isinstance(values, np.ndarray) and values.dtype.kind in "OSU":
            return numpy_helper.from_array(values.astype(object), tensor.name)
        return to_tensor(tensor)

    import_attributes = onnx_importer.OnnxImporter.import_attributes
    kind = onnx.AttributeProto
    # graphsurgeon's reading of each attribute type (its closure per attribute cost 8 us, a third of a
    # 6,500-node import), plus the type attributes it skips (Optional's `type`, a Cast's in a function)
    plain: dict[int, Callable[[onnx.AttributeProto], Any]] = {
        kind.INT: lambda a: a.i, kind.FLOAT: lambda a: a.f, kind.STRING: lambda a: a.s.decode(),
        kind.INTS: lambda a: list(a.ints), kind.FLOATS: lambda a: list(a.floats),
        kind.STRINGS: lambda a: [s.decode() for s in a.strings],
        kind.TENSOR: lambda a: onnx_importer.OnnxImporter.import_tensor(a.t),
        kind.TYPE_PROTO: lambda a: a.tp, kind.TYPE_PROTOS: lambda a: list(a.type_protos),
    }

    def import_attributes_with_types(onnx_attributes: Any, *args: Any, **kwargs: Any) -> Any:
        attrs = OrderedDict()
        for attribute in onnx_attributes:
            read = plain.get(attribute.type)
            if read is not None and not attribute.ref_attr_name:
                attrs[attribute.name] = read(attribute)
            else:  # graphs, attribute references, types graphsurgeon warns about and skips
                attrs.update(import_attributes([attribute], *args, **kwargs))
        return attrs

    global STOCK_IMPORT_NODE, STOCK_IMPORT_TENSOR, STOCK_IMPORT_ATTRIBUTES
    STOCK_IMPORT_ATTRIBUTES = import_attributes
    STOCK_IMPORT_NODE = onnx_importer.OnnxImporter.import_node
    STOCK_IMPORT_TENSOR = onnx_importer.OnnxImporter.import_tensor
    onnx_importer.OnnxImporter.import_tensor = staticmethod(_import_tensor(STOCK_IMPORT_TENSOR))  # type: ignore[method-assign]
    onnx_importer.OnnxImporter.import_node = staticmethod(_import_node)  # type: ignore[method-assign]
    onnx_importer.OnnxImporter.import_attributes = staticmethod(import_attributes_with_types)  # type: ignore[method-assign]
    onnx_exporter.dtype_to_onnx = _cached_dtype_to_onnx(onnx_exporter.dtype_to_onnx)
    onnx_exporter.OnnxExporter.export_value_info_proto = staticmethod(export_value_info_proto)  # type: ignore[method-assign]
    onnx_exporter.constant_to_onnx_tensor = constant_to_onnx_tensor
    stock_tensor_proto = onnx_exporter.OnnxExporter.export_tensor_proto

    def export_tensor_proto(tensor: gs.Constant) -> onnx.TensorProto:
        # graphsurgeon names an unloaded constant's TensorProto in place: that proto is the input model's
        # (an initializer, a Constant node's value), which is never to be written, not even with the name
        # it has (a Constant node's unnamed value would gain an empty name field)
        values = tensor._values
        if isinstance(values, LazyValues) and (values.tensor.name != tensor.name or not values.tensor.HasField("name")):
            renamed = onnx.TensorProto()
            renamed.CopyFrom(values.tensor)
            if tensor.name:
                renamed.name = tensor.name
            return renamed
        return stock_tensor_proto(tensor)

    onnx_exporter.OnnxExporter.export_tensor_proto = staticmethod(export_tensor_proto)  # type: ignore[method-assign]
    _track_changes()
    stock_subgraphs = gs.Node.subgraphs

    def subgraphs(self: gs.Node, recursive: bool = False) -> Any:
        # graphsurgeon's generator costs ~2 us a node even with no attributes, and a Graph is built
        # (every import) by asking it of every node
        return stock_subgraphs(self, recursive) if has_subgraph(self) else iter(())

    gs.Node.subgraphs = subgraphs  # type: ignore[method-assign]
    setattr(onnx_exporter, _PATCHED, True)


def _track_changes() -> None:
    """Make every graphsurgeon mutator `touch` the nodes it changes, so that the skeleton cache
    (`passes.core._skeleton`) re-encodes exactly those: a write to a node's field (op, name, domain, attrs,
    inputs or outputs reassigned), any change to a synchronized list on either side (`node.inputs[i] = t`
    changes the tensor's consumer list too, and `tensor.outputs.append(node)` the node's inputs: both
    sides go through `_add_to_elem` / `_remove_from_elem`), a tensor's rename (its producers' and
    consumers' pieces spell the name) and a tensor turned constant or variable in place."""
    node_setattr = gs.Node.__setattr__
    tensor_setattr = gs.Tensor.__setattr__
    add, remove = SynchronizedList._add_to_elem, SynchronizedList._remove_from_elem

    def node_field(self: gs.Node, name: str, value: Any) -> None:
        touch(self)
        node_setattr(self, name, value)

    def tensor_field(self: gs.Tensor, name: str, value: Any) -> None:
        if name == "name":
            _touch_users(self)
        tensor_setattr(self, name, value)

    def added(self: SynchronizedList, elem: Any) -> None:
        touch(self.parent_obj)
        touch(elem)
        add(self, elem)

    def removed(self: SynchronizedList, elem: Any) -> None:
        touch(self.parent_obj)
        touch(elem)
        remove(self, elem)

    def kind_change(method: Any) -> Any:
        def changed(self: gs.Tensor, *args: Any, **kwargs: Any) -> Any:
            _touch_users(self)
            return method(self, *args, **kwargs)
        return changed

    gs.Node.__setattr__ = node_field  # type: ignore[method-assign]
    gs.Tensor.__setattr__ = tensor_field  # type: ignore[method-assign]
    SynchronizedList._add_to_elem = added  # type: ignore[method-assign]
    SynchronizedList._remove_from_elem = removed  # type: ignore[method-assign]
    gs.Tensor.to_constant = kind_change(gs.Tensor.to_constant)  # type: ignore[method-assign]
    gs.Tensor.to_variable = kind_change(gs.Tensor.to_variable)  # type: ignore[method-assign]


def _touch_users(tensor: gs.Tensor) -> None:
    fields = tensor.__dict__
    for node in (*fields.get("inputs", ()), *fields.get("outputs", ())):
        touch(node)


def _cached_dtype_to_onnx(convert: Any) -> Any:
    """graphsurgeon's `dtype_to_onnx` builds a table of ml_dtypes on every call (once per exported
    tensor); the answer for a dtype never changes."""
    known: dict[object, int] = {}

    def dtype_to_onnx(dtype: Any) -> int:
        try:
            return known[dtype]
        except KeyError:
            known[dtype] = result = convert(dtype)
            return result
        except TypeError:  # unhashable
            return convert(dtype)

    return dtype_to_onnx


def _synchronized(parent: object, field_name: str, items: list[Any]) -> SynchronizedList:
    """`SynchronizedList(parent, field_name, items)` with the back-references appended directly."""
    synced = SynchronizedList.__new__(SynchronizedList)
    synced.__dict__.update(parent_obj=parent, field_name=field_name)
    if items:
        list.extend(synced, items)
        for item in items:
            list.append(item.__dict__[field_name], parent)
    return synced


def new_constant(name: str, values: np.ndarray | LazyValues, export_dtype: Any = None) -> gs.Constant:
    """`gs.Constant(name, values, export_dtype=...)`, its fields set directly (folding makes thousands)."""
    return _new_tensor(gs.Constant, name, {"_values": values, "data_location": None, "_export_dtype": export_dtype})


def _new_tensor(kind: type[Any], name: str, fields: dict[str, Any]) -> Any:
    """A graphsurgeon tensor of class `kind` with no users yet, its fields set without the constructor."""
    tensor = kind.__new__(kind)
    tensor.__dict__.update(name=name, inputs=_synchronized(tensor, "outputs", []),
                           outputs=_synchronized(tensor, "inputs", []), **fields)
    return tensor


def _import_tensor(stock: Any) -> Any:
    """graphsurgeon's `OnnxImporter.import_tensor`, with a TensorProto's Constant and a tensor-typed
    ValueInfoProto's Variable built field by field."""

    def stock_dtype(elem: int) -> Any:
        numpy_type = onnx_importer.get_numpy_type(elem)
        return numpy_type if numpy_type is not None else elem

    dtypes: dict[int, Any] = {}

    lazy_types: dict[int, tuple[Any, int]] = {}  # data type -> (graphsurgeon's dtype, item size)
    types: dict[bytes, tuple[Any, list[object] | None]] = {}  # a tensor TypeProto's bytes -> (dtype, shape)

    def lazy_values(proto: onnx.TensorProto) -> LazyValues:
        """`LazyValues(proto)`, its fields set directly (its constructor cost 7 us: 2,500 a 32-layer import)."""
        known = lazy_types.get(proto.data_type)
        if known is None:
            made = LazyValues(proto)
            size = onnx_importer.get_itemsize(made.dtype) if onnx_importer.get_numpy_type(made.dtype) is not None else None
            if size is not None:
                lazy_types[proto.data_type] = (made.dtype, size)
            return made
        lazy = LazyValues.__new__(LazyValues)
        dims = proto.dims
        lazy.__dict__.update(tensor=proto, shape=dims, dtype=known[0], nbytes=math.prod(dims) * known[1])
        return lazy

    def import_tensor(onnx_tensor: Any) -> gs.Tensor:
        kind = type(onnx_tensor)
        if kind is onnx.TensorProto:
            constant = new_constant(onnx_tensor.name, lazy_values(onnx_tensor))
            if onnx_tensor.HasField("data_location"):
                constant.__dict__["data_location"] = int(onnx_tensor.data_location)
            return constant
        if kind is not onnx.ValueInfoProto or onnx_tensor.type.WhichOneof("value") != "tensor_type":
            return stock(onnx_tensor)
        type_proto = onnx_tensor.type
        raw = type_proto.SerializeToString()  # a dynamo export types every tensor: a few hundred distinct types
        known = types.get(raw)
        if known is None:
            if len(types) > 1 << 16:
                types.clear()
            typed = type_proto.tensor_type
            elem = typed.elem_type
            dtype = dtypes.get(elem)
            if dtype is None:  # what graphsurgeon keeps: the numpy type, or the enum for types numpy lacks
                dtype = dtypes[elem] = stock_dtype(elem)
            shape = ([d.dim_param if w == "dim_param" else d.dim_value if w == "dim_value" else None
                      for d in typed.shape.dim for w in (d.WhichOneof("value"),)] if typed.HasField("shape") else None)
            known = types[raw] = (dtype, shape)
        tensor = _variable(onnx_tensor.name)
        fields = tensor.__dict__
        fields["dtype"] = known[0]
        if known[1] is not None:
            fields["shape"] = list(known[1])  # a list of its own: tensors of one type must not share one
        return tensor

    return import_tensor


def _variable(name: str) -> gs.Variable:
    """`gs.Variable(name)`, its fields set directly."""
    return _new_tensor(gs.Variable, name, {"dtype": None, "shape": None, "type": "tensor_type"})


def _import_node(onnx_node: onnx.NodeProto, tensor_map: Any, subgraph_tensor_map: Any, opset: Any,
                 import_domains: Any) -> gs.Node:
    """graphsurgeon's `OnnxImporter.import_node`, with the Node and new Variables built field by field."""
    lifting = LIFTING.get()
    if lifting is not None and lifting.take(onnx_node, subgraph_tensor_map):
        return lifting.PLACEHOLDER

    def get_tensor(name: str, check_outer_graph: bool = True) -> gs.Tensor:
        tensor = subgraph_tensor_map.get(name)
        if tensor is not None:
            return tensor
        if check_outer_graph and name in tensor_map:
            return tensor_map[name]
        if not name:
            return _variable("")
        tensor = subgraph_tensor_map[name] = _variable(name)
        return tensor

    attrs = (onnx_importer.OnnxImporter.import_attributes(
        onnx_node.attribute, tensor_map, subgraph_tensor_map, opset, import_domains)
        if len(onnx_node.attribute) else OrderedDict())
    inputs = [get_tensor(name) for name in onnx_node.input]
    outputs = [get_tensor(name, check_outer_graph=False) for name in onnx_node.output]
    node = gs.Node.__new__(gs.Node)
    fields = node.__dict__
    fields["op"] = onnx_node.op_type
    fields["name"] = onnx_node.name
    fields["attrs"] = attrs
    fields["inputs"] = _synchronized(node, "outputs", inputs)
    fields["outputs"] = _synchronized(node, "inputs", outputs)
    fields["domain"] = onnx_node.domain if onnx_node.HasField("domain") else None
    return node
