"""Symbolic dims the pipeline writes are proven equal or distinct: shape inference numbers the dims it
invents (`unk__N`) from 0 on every run, so `refresh_shapes` renames each run's names apart. Without it a
32-layer dynamic Llama fails in onnxruntime (its memory planner trusts dim_params and reused a 2-head
key buffer for a 4-head query; tests/real_models/test_deep_exports.py runs that export)."""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from passes.core import ir
from tests.helpers import model, tensor


def _nonzero_model(names: list[str]) -> gs.Graph:
    """x -> NonZero -> x_nz (an intermediate: [1, count], the count unknown) -> Identity -> x_out."""
    nodes = [helper.make_node("NonZero", [name], [f"{name}_nz"]) for name in names]
    nodes += [helper.make_node("Identity", [f"{name}_nz"], [f"{name}_out"]) for name in names]
    made = model(nodes, [tensor(name, ["n"]) for name in names],
                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.INT64, [1, None]) for name in names])
    return ir.import_graph(made, infer_shapes=False)


def _dims(graph: gs.Graph, name: str) -> list[object]:
    return list(graph.tensors()[name].shape or [])


def test_every_inference_run_names_its_unknown_dims_apart() -> None:
    graph = _nonzero_model(["a"])
    ir.refresh_shapes(graph)
    first = _dims(graph, "a_nz")[1]
    assert isinstance(first, str) and first.startswith("passes_dim1_")
    # a second node whose count inference also calls unk__0 in its own run
    b = gs.Variable("b", dtype="float32", shape=["n"])
    nz, out = gs.Variable("b_nz", dtype="int64"), gs.Variable("b_out", dtype="int64", shape=[1, None])
    graph.inputs.append(b)
    graph.outputs.append(out)
    graph.nodes.extend([gs.Node("NonZero", inputs=[b], outputs=[nz]), gs.Node("Identity", inputs=[nz], outputs=[out])])
    ir.refresh_shapes(graph)
    second = _dims(graph, "b_nz")[1]
    assert _dims(graph, "a_nz")[1] == first and isinstance(second, str) and second != first


def test_a_reloaded_model_starts_past_the_runs_it_holds() -> None:
    graph = _nonzero_model(["a", "c"])
    ir.refresh_shapes(graph)
    again = ir.import_graph(ir.export_model(graph), infer_shapes=False)
    again.tensors()["c_nz"].shape = None  # forget one, as a rewrite that replaced the tensor would
    ir.refresh_shapes(again)
    assert _dims(again, "c_nz")[1] != _dims(again, "a_nz")[1]
    assert str(_dims(again, "c_nz")[1]).startswith("passes_dim2_")


def test_names_the_model_declares_are_kept() -> None:
    graph = _nonzero_model(["a"])
    graph.inputs[0].shape = ["unk__0"]  # a user's dim that happens to look like inference's
    ir.refresh_shapes(graph)
    assert _dims(graph, "a") == ["unk__0"]
