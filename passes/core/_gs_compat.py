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
  serialisation: a constant past protobuf's 2 GiB limit fails with `EncodeError`. `export_onnx` exports
  such constants as placeholders and copies them in with CopyFrom, which has no limit.

graphsurgeon's own warnings (printed to stdout: "Model does not contain ONNX domain opset information",
"colored module is not installed", skipped attributes) are raised to errors only: they are not the user's
business, and what they flagged is handled here.

The wrappers hand every other case to graphsurgeon unchanged. The ONNX node suite
(`tests/node_suite`) holds the cases that need them (test_if_opt, test_identity_opt,
test_loop16_seq_none, test_ai_onnx_ml_label_encoder_tensor_mapping).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters import onnx_exporter
from onnx_graphsurgeon.importers import onnx_importer
from onnx_graphsurgeon.ir.tensor import LazyValues

from passes.core._validate import tensor_nbytes

_PATCHED = "_passes_compat"
_TYPE_ATTRIBUTES = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)


#: constants at least this large bypass the exporter's `extend` (see the module docstring)
EXTEND_LIMIT = 2**30


def export_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """`gs.export_onnx(graph)` (types unchecked) for graphs with constants of any size."""
    held = [(tensor, tensor._values) for tensor in graph.tensors().values()
            if isinstance(tensor, gs.Constant) and stored_bytes(tensor) >= EXTEND_LIMIT]
    try:
        for tensor, _ in held:
            tensor._values = np.zeros(0, np.float32)  # a placeholder initializer, replaced below
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in held:
            tensor._values = values
    slots = {t.name: t for t in model.graph.initializer} if held else {}
    for tensor, values in held:
        slots[tensor.name].CopyFrom(values.tensor if isinstance(values, LazyValues) else numpy_helper.from_array(values))
        slots[tensor.name].name = tensor.name
    return model


def stored_bytes(tensor: gs.Constant) -> int:
    """Bytes a constant's values take, without loading them when they are still lazy."""
    values = tensor._values
    if isinstance(values, LazyValues):
        return tensor_nbytes(values.tensor, tensor.name)
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

    def import_attributes_with_types(onnx_attributes: Any, *args: Any, **kwargs: Any) -> Any:
        kept = [a for a in onnx_attributes if a.type not in _TYPE_ATTRIBUTES or a.ref_attr_name]
        attrs = import_attributes(kept, *args, **kwargs)
        for attribute in onnx_attributes:
            if attribute.type == onnx.AttributeProto.TYPE_PROTO and not attribute.ref_attr_name:
                attrs[attribute.name] = attribute.tp
            elif attribute.type == onnx.AttributeProto.TYPE_PROTOS and not attribute.ref_attr_name:
                attrs[attribute.name] = list(attribute.type_protos)
        return attrs

    onnx_importer.OnnxImporter.import_attributes = staticmethod(import_attributes_with_types)  # type: ignore[method-assign]
    onnx_exporter.OnnxExporter.export_value_info_proto = staticmethod(export_value_info_proto)  # type: ignore[method-assign]
    onnx_exporter.constant_to_onnx_tensor = constant_to_onnx_tensor
    setattr(onnx_exporter, _PATCHED, True)
