"""Writing a model with its weights in an external data file, without copying the model in memory.

onnx's own path (`convert_model_to_external_data` + `save_model`) mutates its argument, so a caller that
keeps the model must copy it whole first: one more copy of every weight, and for a tensor past 2 GiB a
protobuf copy that can fail. Here a new ModelProto gets every field but the initializers, and each large
initializer is written from the original straight into the data file.
"""

from __future__ import annotations

from typing import BinaryIO

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


#: offsets of tensors in a data file are multiples of this (pages: a runtime can map each tensor)
EXTERNAL_DATA_ALIGNMENT = 4096


def with_external_data(model: onnx.ModelProto, data: BinaryIO, location: str, *, min_bytes: int) -> onnx.ModelProto:
    """A copy of `model` whose initializers of `min_bytes` or more are references into
    `data` (written here, page-aligned). The weights are written straight from the model: no second
    in-memory copy of the whole model, and no message past protobuf's 2 GiB limit is ever copied."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for tensor in model.graph.initializer:
        slot = out.graph.initializer.add()
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
            slot.CopyFrom(tensor)  # typed fields (float_data, strings, packed 4-bit) stay as they are
            continue
        payload = tensor.raw_data
        if len(payload) < min_bytes:
            slot.CopyFrom(tensor)
            continue
        offset = -data.tell() % EXTERNAL_DATA_ALIGNMENT + data.tell()
        data.seek(offset)
        data.write(payload)
        slot.name, slot.data_type, slot.doc_string = tensor.name, tensor.data_type, tensor.doc_string
        slot.dims.extend(tensor.dims)
        slot.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(payload)))):
            entry = slot.external_data.add()
            entry.key, entry.value = key, value
        del payload
    return out


def _copy_fields(source: Message, target: Message, *, skip: str) -> None:
    """Every set field of `source` but `skip`, into `target` (the same message type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(value, Message):
                getattr(target, field.name).CopyFrom(value)
            else:
                getattr(target, field.name).extend(value)
        elif isinstance(value, (str, bytes, int, float, bool)):
            setattr(target, field.name, value)
        else:
            getattr(target, field.name).extend(value)
