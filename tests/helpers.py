"""Small builders for hand-written test graphs."""

from __future__ import annotations

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
