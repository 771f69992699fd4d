"""Roofline bounds for a model on a target, from the target's stated bandwidth and peaks.

    decode  (one token at a time): every weight is read once per token, so
            tokens/s <= bandwidth / weight bytes read per token
    prefill (a whole prompt):      the matmuls are compute-bound, so
            tokens/s <= peak ops/s / matmul ops per token

Weight bytes per token count every matmul weight at the stored precision, but only one row of an
embedding table read by a Gather (a token reads its own row, not the table): a 7B decoder is ~7 GB per
token at INT8, not the whole file. Bounds are upper limits from data-sheet figures, never measurements;
a figure the target does not state gives no bound (None), not a guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from passes.core import ir
from passes.deploy.summary import PRECISION_BYTES


@dataclass
class WeightTraffic:
    """Floating-point weight elements: all of them, and those read per decoded token."""

    parameters: int
    read_per_token: int
    embedding_rows_only: list[str] = field(default_factory=list)


@dataclass
class Roofline:
    """Upper bounds on tokens/s; None where the target states no figure."""

    bandwidth_gbps: float | None
    weight_bytes_per_token: dict[str, int]
    decode_tokens_per_s: dict[str, float | None]
    matmul_ops_per_token: float | None
    prefill_peak: str | None
    prefill_tokens_per_s: float | None
    notes: list[str] = field(default_factory=list)
    #: a generator's KV cache read per decoded token (the whole cache at its capacity), included above
    kv_cache_bytes_per_token: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_traffic(model: onnx.ModelProto) -> WeightTraffic:
    """Count float weights; a table only ever gathered from contributes one row per token."""
    gathered_only = _gather_tables(model)
    total = per_token = 0
    rows_only = []
    for tensor in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if not np.issubdtype(dtype, np.floating) or count <= 1:
            continue
        total += count
        if tensor.name in gathered_only and len(tensor.dims) >= 2:
            per_token += count // int(tensor.dims[0])
            rows_only.append(tensor.name)
        else:
            per_token += count
    return WeightTraffic(total, per_token, rows_only)


def _gather_tables(model: onnx.ModelProto) -> set[str]:
    """Initializers whose every use is as the data (axis 0) of a Gather."""
    uses: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            uses.setdefault(name, set()).add(node.op_type == "Gather" and position == 0 and axis == 0)
    return {name for name, kinds in uses.items() if kinds == {True}}


def matmul_ops_per_token(model: onnx.ModelProto, tokens: int) -> float | None:
    """2 * (output elements) * K summed over the matmuls, per token, from static shapes (after
    freezing); None when a matmul's shapes are not all known."""
    shapes = _static_shapes(model)
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "MatMulInteger"):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or out is None:
            return None
        trans_a = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
        k = a[0] if trans_a else a[-1]
        total += 2.0 * int(np.prod(out, dtype=np.int64)) * k
    return total / tokens if tokens > 0 else None


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(ir.model_skeleton(model), data_prop=True)
    shapes: dict[str, list[int]] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def estimate(model: onnx.ModelProto, target: Any, *, tokens: int, kv_cache_bytes: int = 0) -> Roofline:
    """Bounds for `model` (shapes frozen, `tokens` tokens per inference) on `target`; a generator's decode
    also reads its KV cache, `kv_cache_bytes` per token (the cache at the context length)."""
    traffic = weight_traffic(model)
    bandwidth = target.memory.bandwidth_gbps
    per_token = {name: int(np.ceil(traffic.read_per_token * size)) + kv_cache_bytes
                 for name, size in PRECISION_BYTES.items()}
    decode = {name: (bandwidth * 1e9 / b if bandwidth and b else None) for name, b in per_token.items()}
    ops = matmul_ops_per_token(model, tokens)
    compute = target.compute
    scheme = target.capabilities.quantization
    if scheme == "w8a8" and compute.int8_tops:
        peak_name, peak = "int8", compute.int8_tops * 1e12
    elif compute.fp16_tflops:
        peak_name, peak = "fp16", compute.fp16_tflops * 1e12
    else:
        peak_name, peak = None, None
    notes = []
    if bandwidth is None:
        notes.append(f"{target.name} states no memory bandwidth: no decode bound")
    if peak is None:
        notes.append(f"{target.name} states no {'int8' if scheme == 'w8a8' else 'fp16'} peak: no prefill bound")
    if traffic.embedding_rows_only:
        notes.append(f"embedding tables read one row per token: {', '.join(traffic.embedding_rows_only)}")
    prefill = peak / ops if peak and ops else None
    if kv_cache_bytes:
        notes.append(f"decode reads the KV cache too: {kv_cache_bytes / 1e6:.1f} MB per token at the full context")
    return Roofline(bandwidth, per_token, decode, ops, peak_name, prefill, notes, kv_cache_bytes)
