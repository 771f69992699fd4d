"""A 32-layer dynamic Llama (tiny width, GQA 4 / 2 heads) from each PyTorch exporter, through the default
pipeline with its dims left dynamic, run by onnxruntime with all its optimizations (its memory planner
reuses buffers whose dim_params match) at two shapes, against the export itself.

Before the pipeline named each shape-inference run's dims apart, the TorchScript export failed at
layer 11's rotary Concat: a 2-head key and a 4-head query shared one invented dim (issue 14).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import passes
from tests.real_models.export import EXPORTERS, Exporter

pytestmark = pytest.mark.slow

SHAPES = ((1, 7), (2, 12))
#: float32 over 32 layers; the pipeline folds constants with numpy: relative to the logits' magnitude.
RTOL = 1e-5


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_deep_dynamic_export_runs_in_onnxruntime_after_the_pipeline(
        exporter: Exporter, real_export: Callable[[str, Exporter], Path]) -> None:
    original = passes.load_model(real_export("llama-deep", exporter))
    optimized = passes.optimize(original)
    dynamic = [d.dim_param for d in optimized.graph.input[0].type.tensor_type.shape.dim]
    assert all(dynamic), dynamic  # batch and seq stay symbolic
    assert sum(1 for n in optimized.graph.node if n.op_type == "Softmax") == 32
    reference = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(optimized.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in SHAPES:
        ids = np.random.default_rng(list(shape)).integers(0, 256, shape, dtype=np.int64)
        expected = reference.run(None, {"input_ids": ids})[0]
        got = candidate.run(None, {"input_ids": ids})[0]
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale, err_msg=f"{exporter} {shape}")


def test_value_info_names_no_dim_twice_for_different_sizes(real_export: Callable[[str, Exporter], Path]) -> None:
    """Every dim_param the optimized model declares means one size at a given input shape."""
    optimized = passes.optimize(passes.load_model(real_export("llama-deep", "torchscript")))
    exposed = onnx.ModelProto()
    exposed.CopyFrom(optimized)
    declared = {v.name: v for v in optimized.graph.value_info}
    assert len(declared) > 500  # the pipeline writes the shapes it inferred
    del exposed.graph.output[:]
    exposed.graph.output.extend(declared.values())
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.zeros((2, 12), dtype=np.int64)
    sizes: dict[str, set[int]] = {}
    for value, result in zip(declared.values(), session.run(None, {"input_ids": ids})):
        for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(result)):
            if dim.dim_param:
                sizes.setdefault(dim.dim_param, set()).add(size)
    assert {name: s for name, s in sizes.items() if len(s) > 1} == {}
