"""Two gaps in onnx-graphsurgeon 0.5/0.6's exporter, closed where it is imported (`passes.core.ir`):

- a tensor of type `optional(...)` (a graph or subgraph input/output) has no exporter: graphsurgeon
  imports it with `type == "optional_type"` and the element's TypeProto as its dtype, then fails on export
  with an UnboundLocalError;
- a string constant that was loaded (a pass read its values) is exported as raw bytes, which ONNX
  forbids for strings (`TypeError: Can not use raw_data to store string type`);
- TYPE_PROTO attributes (`Optional`'s `type`, `SequenceEmpty`-like ops) are dropped on import with a
  warning, so an empty `Optional` loses its type and the model no longer loads. They are kept as
  TypeProto values, which `onnx.helper.make_attribute` exports as they were.

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
from onnx import numpy_helper
from onnx_graphsurgeon.exporters import onnx_exporter
from onnx_graphsurgeon.importers import onnx_importer

_PATCHED = "_passes_compat"
_TYPE_ATTRIBUTES = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)


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
