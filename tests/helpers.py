"""Small builders for hand-written test graphs."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tensor(name: str, shape: Sequence[int | str | None], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def init(name: str, value: np.ndarray | Sequence[float] | Sequence[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    domains = {n.domain for n in nodes if n.domain not in ("", "ai.onnx")}
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    made = helper.make_model(graph, opset_imports=opsets)
    made.ir_version = 8
    if check:
        onnx.checker.check_model(made, full_check=True)
    return made


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def greedy_with_growing_cache(path: str | os.PathLike[str], prompt: list[int], new: int) -> list[int]:
    """onnxruntime on the export as exported: the prompt in one call, then a token per call, presents fed back."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    caches = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for n, i in inputs.items() if n.startswith("past")}
    step, position, out = list(prompt), 0, []
    while len(out) < new:
        total = position + len(step)
        feeds = {"input_ids": np.array([step], np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(position, total, dtype=np.int64)[None]} | caches
        results = dict(zip(names, session.run(names, feeds)))
        caches = {n: results[n.replace("past_key_values", "present")] for n in caches}
        out.append(int(np.argmax(results["logits"][0, -1])))
        position, step = total, [out[-1]]
    return out
