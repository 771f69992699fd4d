"""The model export (`ir.export_model`): graphsurgeon's exporter, faster, and for constants of any size.

Part of the compat layer (`passes.core._gs_compat`, which patches graphsurgeon's per-tensor exporters);
here the top-level graph is written without copying what need not be copied: nodes come from the
skeleton cache's serialized pieces, plain arrays a pass made go straight into their initializers, and the
model is built before its graph (not copied in afterwards).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters import onnx_exporter
from onnx_graphsurgeon.ir.tensor import SparseValues

from passes.core._skeleton import node_pieces, value_info_pieces
from passes.core._validate import RAW_DTYPES
from passes.core._walk import tensor_map


def export_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """`gs.export_onnx(graph, do_type_check=False)`, faster, and for constants of any size.

    The top-level graph is exported here with graphsurgeon's own per-tensor and per-function exporters;
    nodes come from the skeleton cache as serialized pieces, parsed in one call (re-exporting every
    node was most of an export's cost), and initializers are copied in with CopyFrom, which has no size
    limit (`extend` serialises each one and fails past 2 GiB). Subgraphs go through graphsurgeon whole.
    """
    exporter = onnx_exporter.OnnxExporter
    tensors = tensor_map(graph)
    # the model first, then its graph filled in place: `make_model(graph)` copies the whole graph, weights too
    model = onnx.helper.make_model(
        onnx.GraphProto(), functions=[exporter.export_function(f) for f in graph.functions],
        opset_imports=onnx_exporter.update_import_domains(graph),
    )
    out = model.graph
    out.name, out.doc_string = graph.name or "", graph.doc_string or ""
    out.MergeFromString(node_pieces(graph))
    out.input.extend(exporter.export_value_info_proto(t, False) for t in graph.inputs)
    out.output.extend(exporter.export_value_info_proto(t, False) for t in graph.outputs)
    io_names = {t.name for t in (*graph.inputs, *graph.outputs)}
    typed: list[gs.Variable] = []
    for tensor in tensors.values():
        if isinstance(tensor, gs.Constant):
            if isinstance(tensor._values, SparseValues):
                out.sparse_initializer.add().CopyFrom(exporter.export_sparse_tensor_proto(tensor))
            elif not _export_plain_in_place(tensor, out):
                out.initializer.add().CopyFrom(exporter.export_tensor_proto(tensor))
        elif tensor.name not in io_names and (tensor.dtype is not None or tensor.shape is not None):
            typed.append(tensor)
    out.MergeFromString(value_info_pieces(graph, typed))
    model.producer_name = graph.producer_name or ""
    model.producer_version = graph.producer_version or ""
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def _export_plain_in_place(tensor: gs.Constant, out: onnx.GraphProto) -> bool:
    """Write a constant holding a plain numpy array (folded, fused, quantized: a pass made it) straight into
    a new initializer of `out`, as graphsurgeon's `make_tensor(..., raw=True)` writes it, without the copy
    of every byte that building a TensorProto and copying it in costs (a fused weight set of a 135M model is
    280 MB). False for anything else."""
    values = tensor._values
    if type(values) is not np.ndarray or tensor.__dict__.get("_export_dtype") is not None:
        return False
    elem = _PLAIN_ELEM.get(values.dtype)
    if elem is None:
        return False
    proto = out.initializer.add()
    proto.dims.extend(values.shape)
    proto.data_type = elem
    proto.name = tensor.name
    proto.raw_data = values.tobytes()
    if tensor.data_location is not None:  # (as graphsurgeon does: an imported weight's explicit DEFAULT stays)
        proto.data_location = tensor.data_location
    return True


_PLAIN_ELEM = {dtype: elem for elem, dtype in RAW_DTYPES.items()}
