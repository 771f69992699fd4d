"""Field-level validation of a loaded (or about to be written) model, beyond what the ONNX checker asks.

The checker accepts models whose data cannot be read the way their fields say (68 bytes of raw_data for a
4x4 float tensor, 17 floats for 16, `Cast to=99`, opset 99, an output listed twice) and models our code
would then trip over. `validate_model` turns each such field into one `ModelLoadError` naming the tensor,
node or value and the field. It reads no tensor data: lengths are compared, never decoded, so it costs
the same for a 1 MB and a 10 GB model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import EncodeError, Message
from onnx import TensorProto, helper

from passes.core.errors import ModelLoadError

#: every data type this onnx knows (UNDEFINED excluded)
KNOWN_DTYPES = frozenset(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)
#: keys an external-data entry may carry (onnx.external_data_helper.ExternalDataInfo)
EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})
#: integer attributes that hold a tensor data type, by op (default domain)
_DTYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                     "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype",
                     "Bernoulli": "dtype"}
_FOUR_BIT = frozenset(getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n))
_COMPLEX = frozenset({TensorProto.COMPLEX64, TensorProto.COMPLEX128})
#: message fields that hold no text: not walked
_PAYLOAD_FIELDS = frozenset({"segment"})
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


#: the largest message protobuf serialises (2 GiB - 1)
PROTOBUF_LIMIT = 2**31 - 1


def proto_size(message: Message) -> int:
    """`message.ByteSize()`, or `PROTOBUF_LIMIT` when the message is too large for protobuf to size
    (upb raises EncodeError past 2 GiB)."""
    try:
        return message.ByteSize()
    except EncodeError:
        return PROTOBUF_LIMIT


def validate_model(model: onnx.ModelProto, *, label: str) -> None:
    """Raise `ModelLoadError` for the first field that cannot be what it says."""
    _check_text(model, label)
    _check_opsets(model, label)
    graph = model.graph
    if not graph.output:
        raise ModelLoadError(f"{label}: the graph has no outputs")
    seen: set[str] = set()
    for out in graph.output:
        if out.name in seen:
            raise ModelLoadError(f"{label}: graph output '{out.name}' is listed twice")
        seen.add(out.name)
    for graph_proto in _graphs(graph):
        for role, values in (("input", graph_proto.input), ("output", graph_proto.output),
                             ("value_info", graph_proto.value_info)):
            for value in values:
                _check_value_type(value.type, f"{label}: graph {role} '{value.name}'", role == "input")
        for tensor in graph_proto.initializer:
            check_tensor(tensor, f"{label}: initializer '{tensor.name}'")
        for sparse in graph_proto.sparse_initializer:
            check_tensor(sparse.values, f"{label}: sparse initializer '{sparse.values.name}' values")
            check_tensor(sparse.indices, f"{label}: sparse initializer '{sparse.values.name}' indices")
        for node in graph_proto.node:
            _check_node(node, label)


def _check_text(message: Message, label: str) -> None:
    """Every string field of the model is text: protobuf hands back `bytes` for a string field that is
    not valid UTF-8 (a tensor name, the graph's name, a doc string), and every later copy trips on it.
    Walks the messages iteratively; tensor payloads are bytes or numbers and are not descended into."""
    stack: list[Message] = [message]
    while stack:
        current = stack.pop()
        if isinstance(current, TensorProto):  # ListFields would copy raw_data: read the text fields only
            texts = (("name", current.name), ("doc_string", current.doc_string),
                     *(("external data key", entry.key) for entry in current.external_data),
                     *(("external data value", entry.value) for entry in current.external_data))
            for what, text in texts:
                if not isinstance(text, str):
                    raise ModelLoadError(f"{label}: tensor {what} {text!r} is not valid UTF-8")
            continue
        for field, value in current.ListFields():
            if field.type == FieldDescriptor.TYPE_STRING:
                for text in (value if _repeated(field) else (value,)):
                    if not isinstance(text, str):
                        owner = getattr(current, "name", "") if field.name != "name" else ""
                        inside = f" of '{owner}'" if isinstance(owner, str) and owner else ""
                        raise ModelLoadError(f"{label}: {type(current).__name__.removesuffix('Proto').lower()} "
                                             f"{field.name}{inside} {text!r} is not valid UTF-8")
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.name not in _PAYLOAD_FIELDS:
                stack.extend(value if _repeated(field) else (value,))


def _repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; `label` before
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), iteratively."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield current
        for node in current.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _check_opsets(model: onnx.ModelProto, label: str) -> None:
    known = onnx.defs.C.schema_version_map()
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if domain in known:
            low, high = known[domain]
            if not low <= opset.version <= high:
                name = opset.domain or "ai.onnx"
                raise ModelLoadError(f"{label}: opset {name} version {opset.version} is not one this onnx "
                                     f"{onnx.__version__} knows ({low} to {high})")
        elif opset.version < 1:
            raise ModelLoadError(f"{label}: opset {opset.domain} version {opset.version} is not positive")


def _check_value_type(type_proto: onnx.TypeProto, where: str, is_input: bool) -> None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        elem = type_proto.tensor_type.elem_type
        if elem not in KNOWN_DTYPES and not (elem == TensorProto.UNDEFINED and not is_input):
            raise ModelLoadError(f"{where} has element type {elem}, not an ONNX data type")
        for dim in type_proto.tensor_type.shape.dim:
            if dim.WhichOneof("value") == "dim_value" and dim.dim_value < 0:
                raise ModelLoadError(f"{where} has a negative dimension ({dim.dim_value})")
    elif kind in ("sequence_type", "optional_type"):
        inner = getattr(type_proto, kind).elem_type
        _check_value_type(inner, where, is_input)


def _check_node(node: onnx.NodeProto, label: str) -> None:
    where = f"{label}: node '{node.name or node.op_type}' ({node.op_type})"
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            check_tensor(attr.t, f"{where} attribute '{attr.name}'")
        elif attr.type == onnx.AttributeProto.TENSORS:
            for tensor in attr.tensors:
                check_tensor(tensor, f"{where} attribute '{attr.name}'")
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            check_tensor(attr.sparse_tensor.values, f"{where} attribute '{attr.name}' values")
    if node.domain in ("", "ai.onnx"):
        dtype_attr = _DTYPE_ATTRIBUTES.get(node.op_type)
        for attr in node.attribute:
            if attr.name == dtype_attr and attr.type == onnx.AttributeProto.INT and attr.i not in KNOWN_DTYPES:
                raise ModelLoadError(f"{where} attribute '{attr.name}' is {attr.i}, not an ONNX data type")


def element_count(tensor: TensorProto, where: str) -> int:
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise ModelLoadError(f"{where} has a negative dimension ({dim})")
        count *= dim
    return count


#: ONNX element types whose raw_data are the numpy array's bytes (little-endian, as ONNX stores them)
RAW_DTYPES: dict[int, np.dtype] = {helper.np_dtype_to_tensor_dtype(np.dtype(t)): np.dtype(t) for t in (
    np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.bool_)} if np.little_endian else {}


def tensor_nbytes(tensor: TensorProto, where: str = "tensor") -> int:
    """Bytes the tensor's data takes by its type and dims (4-bit types packed two to a byte)."""
    return (element_count(tensor, where) * element_bits(tensor.data_type) + 7) // 8


def plain_nbytes(tensor: TensorProto) -> int | None:
    """`tensor_nbytes` of a tensor of a plain numeric type (`RAW_DTYPES`) with valid dims: item size times
    element count; None for any other."""
    dtype = RAW_DTYPES.get(tensor.data_type)
    dims = tensor.dims
    if dtype is None or min(dims, default=0) < 0:
        return None
    return math.prod(dims) * dtype.itemsize


def declared_nbytes(tensor: TensorProto) -> int:
    """`tensor_nbytes`, fast for plain numeric types, and 0 for a tensor whose type or dims are invalid
    (the checker reports those)."""
    plain = plain_nbytes(tensor)
    if plain is not None:
        return plain
    try:
        return tensor_nbytes(tensor)
    except (ModelLoadError, KeyError, TypeError, ValueError):
        return 0


def element_bits(data_type: int) -> int:
    if data_type in _FOUR_BIT:
        return 4
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8


def check_tensor(tensor: TensorProto, where: str) -> None:
    """The tensor's type is an ONNX data type, its dims are non-negative, and its data (inline, typed
    or external) has as many bytes or values as type and dims say. External data is checked for its keys
    and numbers here; its bytes are checked where they are read."""
    if tensor.data_type not in KNOWN_DTYPES:
        raise ModelLoadError(f"{where} has data type {tensor.data_type}, not an ONNX data type")
    count = element_count(tensor, where)
    if tensor.data_location == TensorProto.EXTERNAL:
        external_info(tensor, where)
        return
    if tensor.data_type == TensorProto.STRING:
        present = len(tensor.string_data)
        if present != count:
            raise ModelLoadError(f"{where} holds {present} strings, its shape needs {count}")
        return
    if tensor.HasField("raw_data"):
        expected = tensor_nbytes(tensor, where)
        if len(tensor.raw_data) != expected:
            raise ModelLoadError(f"{where} has {len(tensor.raw_data)} bytes of raw_data, "
                                 f"its type and shape need {expected}")
        return
    field = helper.tensor_dtype_to_field(tensor.data_type)
    present = len(getattr(tensor, field))
    others = [name for name in _TYPED_FIELDS if name != field and len(getattr(tensor, name))]
    if others:
        raise ModelLoadError(f"{where} stores its data in '{others[0]}', a {helper.tensor_dtype_to_string(tensor.data_type)} "
                             f"tensor keeps it in '{field}'")
    if tensor.data_type in _FOUR_BIT:
        expected = (count + 1) // 2
    elif tensor.data_type in _COMPLEX:
        expected = 2 * count
    else:
        expected = count
    if present != expected:
        raise ModelLoadError(f"{where} holds {present} values in '{field}', its shape needs {expected}")


def external_info(tensor: TensorProto, where: str) -> tuple[str, int, int | None]:
    """(location, offset, length) of an external tensor, each checked: known keys, a location, numbers
    that are non-negative integers."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    unknown = sorted(set(entries) - EXTERNAL_KEYS)
    if unknown:
        raise ModelLoadError(f"{where}: unknown external data key '{unknown[0]}' "
                             f"(known: {', '.join(sorted(EXTERNAL_KEYS))})")
    location = entries.get("location", "")
    if not location:
        raise ModelLoadError(f"{where}: external data has no location")
    numbers: dict[str, int | None] = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is None or text == "":
            numbers[key] = None
            continue
        if not text.isdigit():
            raise ModelLoadError(f"{where}: external data {key} '{text}' is not a non-negative integer")
        numbers[key] = int(text)
    return location, numbers["offset"] or 0, numbers["length"]


def densify_sparse_initializers(model: onnx.ModelProto, *, label: str) -> int:
    """Replace the main graph's sparse initializers by dense ones, in place; return how many.

    The passes and onnxruntime's optimizers work on dense tensors; a sparse initializer becomes the
    dense tensor it stands for (zeros where no value is given), under the same name. Indices are checked:
    linear ([NNZ]) or coordinates ([NNZ, rank]), in range, strictly increasing, one per value."""
    from onnx import numpy_helper

    graph = model.graph
    if not graph.sparse_initializer:
        return 0
    dense = []
    for sparse in graph.sparse_initializer:
        name = sparse.values.name
        where = f"{label}: sparse initializer '{name}'"
        shape = tuple(int(d) for d in sparse.dims)
        if any(d < 0 for d in shape):
            raise ModelLoadError(f"{where} has a negative dimension")
        values = numpy_helper.to_array(sparse.values).reshape(-1)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64) if sparse.indices.dims else np.zeros(0, np.int64)
        size = int(np.prod(shape, dtype=np.int64))
        if indices.ndim == 2 and indices.shape[1] == len(shape) and len(shape) > 0:
            if (indices < 0).any() or (indices >= np.array(shape)).any():
                raise ModelLoadError(f"{where} has an index outside its shape {list(shape)}")
            indices = np.ravel_multi_index(indices.T, shape) if len(indices) else indices.reshape(-1)
        elif indices.ndim != 1:
            raise ModelLoadError(f"{where} has indices of shape {list(indices.shape)}: [NNZ] or [NNZ, {len(shape)}]")
        if len(indices) != len(values):
            raise ModelLoadError(f"{where} has {len(indices)} indices for {len(values)} values")
        if len(indices) and (indices.min() < 0 or indices.max() >= size):
            raise ModelLoadError(f"{where} has an index outside its {size} elements")
        if len(indices) > 1 and not (np.diff(indices) > 0).all():
            raise ModelLoadError(f"{where} has indices that are not strictly increasing "
                                 "(ONNX wants them sorted, each once)")
        flat = np.zeros(size, dtype=values.dtype)
        flat[indices] = values
        dense.append(numpy_helper.from_array(flat.reshape(shape), name))
    del graph.sparse_initializer[:]
    graph.initializer.extend(dense)
    return len(dense)
