"""The model export (`passes.core._export`): plain arrays a pass made are written straight into their
initializers, byte for byte what graphsurgeon's exporter writes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from passes.core import ir
from passes.core._validate import RAW_DTYPES

_ARRAYS = [(np.arange(12).reshape(3, 4) % 3).astype(dtype) for dtype in RAW_DTYPES.values()]


@pytest.mark.parametrize("values", [*_ARRAYS, np.array(2.5, np.float32), np.zeros((0, 3), np.int64),
                                    np.arange(12, dtype=np.float32).reshape(3, 4).T],  # not C-contiguous
                         ids=lambda v: f"{v.dtype}{list(v.shape)}{'' if v.flags.c_contiguous else '-view'}")
def test_plain_arrays_export_as_graphsurgeon_writes_them(values: np.ndarray) -> None:
    x = gs.Variable("x", dtype=values.dtype, shape=list(values.shape))
    y = gs.Variable("y", dtype=values.dtype, shape=list(values.shape))
    weight = gs.Constant("w", values)
    nodes = [gs.Node("Identity", inputs=[weight], outputs=[y]), gs.Node("Identity", inputs=[x], outputs=[gs.Variable("z")])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)
    (written,) = ir.export_model(graph).graph.initializer
    assert written.SerializeToString() == OnnxExporter.export_tensor_proto(weight).SerializeToString()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(written), values)


@pytest.mark.parametrize("location", [None, onnx.TensorProto.DEFAULT])
def test_a_data_location_the_constant_was_imported_with_is_written_too(location: int | None) -> None:
    """A folded or rewritten weight keeps the data_location its TensorProto stated (graphsurgeon writes it)."""
    weight = gs.Constant("w", np.ones((2,), np.float32), data_location=location)
    y = gs.Variable("y", dtype=np.float32, shape=[2])
    graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[weight], outputs=[y])], outputs=[y], opset=17)
    (written,) = ir.export_model(graph).graph.initializer
    assert written.HasField("data_location") == (location is not None)
    assert written.SerializeToString() == OnnxExporter.export_tensor_proto(weight).SerializeToString()


def test_other_constants_take_graphsurgeons_path() -> None:
    """Strings are no plain array's bytes (ONNX keeps them in string_data)."""
    weight = gs.Constant("w", np.array(["a", "bc"], dtype=object))
    y = gs.Variable("y", dtype=object, shape=[2])
    graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[weight], outputs=[y])], outputs=[y], opset=17)
    (written,) = ir.export_model(graph).graph.initializer
    assert written.data_type == onnx.TensorProto.STRING and list(written.string_data) == [b"a", b"bc"]
    assert not written.raw_data


def test_constant_value_of_an_unloaded_weight_is_a_read_only_view_and_the_weight_stays_unloaded() -> None:
    from onnx_graphsurgeon.ir.tensor import LazyValues

    weights = np.arange(4096, dtype=np.float32).reshape(64, 64)  # past the small-constant size
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(weights, "w")]))
    graph = ir.import_graph(model)
    weight = graph.nodes[0].inputs[1]
    value = ir.constant_value(weight)
    np.testing.assert_array_equal(value, weights)
    assert not value.flags.writeable  # nobody writes a weight through it
    assert type(weight._values) is LazyValues  # and the graph keeps it unloaded: no second copy
    with pytest.raises(ValueError):
        value[0, 0] = 1.0
