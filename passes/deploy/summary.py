"""What `passes inspect` reports about a model: ops, parameters, weight bytes, dynamic dims, opsets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from passes.core import ir

#: bytes per parameter when stored at each precision (int4 packs two per byte).
PRECISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass
class TensorSummary:
    name: str
    dtype: str
    shape: list[int | str | None]


@dataclass
class ModelSummary:
    """Facts about one model; `to_dict()` is what `passes inspect --json` prints."""

    path: str | None
    ir_version: int
    opsets: dict[str, int]
    producer: str
    nodes: int
    ops: dict[str, int]
    inputs: list[TensorSummary]
    outputs: list[TensorSummary]
    dynamic_dims: list[dict[str, Any]]
    parameters: int
    weight_bytes: dict[str, int]
    stored_weight_bytes: int
    external_data_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    model: onnx.ModelProto, path: str | Path | None = None, *, external_data_files: Sequence[str] = ()
) -> ModelSummary:
    """Summarise `model` (external data loaded, as `load_model` does; name the files it came from)."""
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = [_tensor_summary(v) for v in graph.input if v.name not in initializer_names]
    parameters, stored = _count_parameters(model)
    return ModelSummary(
        path=str(path) if path is not None else None,
        ir_version=model.ir_version,
        opsets={entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        nodes=len(graph.node),
        ops=ir.op_histogram(model),
        inputs=inputs,
        outputs=[_tensor_summary(v) for v in graph.output],
        dynamic_dims=[
            {"input": t.name, "axis": axis, "dim": dim}
            for t in inputs
            for axis, dim in enumerate(t.shape)
            if not isinstance(dim, int)
        ],
        parameters=parameters,
        weight_bytes={k: math.ceil(parameters * v) for k, v in PRECISION_BYTES.items()},
        stored_weight_bytes=stored,
        external_data_files=list(external_data_files),
    )


def _tensor_summary(value: onnx.ValueInfoProto) -> TensorSummary:
    tensor_type = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type else "unknown"
    shape: list[int | str | None] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
    ]
    return TensorSummary(value.name, dtype, shape)


def _count_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(floating-point weight elements, bytes all initializers take as stored).

    Parameters are floating-point initializers and Constant-node tensors with more than one element;
    integer constants (shapes, indices) are not weights."""
    parameters = stored = 0
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value" and a.HasField("t")]
    for tensor in tensors:
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        stored += count * dtype.itemsize
        if np.issubdtype(dtype, np.floating) and count > 1:
            parameters += count
    return parameters, stored

