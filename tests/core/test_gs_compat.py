"""The faster `import_node`, `import_tensor` and `import_attributes` (`passes.core._gs_compat`) build the same graph as graphsurgeon's own: every
node's op, name, domain and attributes, its tensors by name and kind, and the use lists on both sides
(which node objects consume and produce each tensor, in order, repeats included)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper
from onnx_graphsurgeon.importers import onnx_importer

from passes.core import _gs_compat, ir
from passes.samples import build_sample


def _stock_attributes(onnx_attributes: list[onnx.AttributeProto], *args: object, **kwargs: object) -> dict[str, object]:
    """graphsurgeon's attribute import one attribute at a time, and the type attributes it skips as protos."""
    attrs: dict[str, object] = OrderedDict()
    for attribute in onnx_attributes:
        if attribute.type == onnx.AttributeProto.TYPE_PROTO and not attribute.ref_attr_name:
            attrs[attribute.name] = attribute.tp
        elif attribute.type == onnx.AttributeProto.TYPE_PROTOS and not attribute.ref_attr_name:
            attrs[attribute.name] = list(attribute.type_protos)
        else:
            attrs.update(_gs_compat.STOCK_IMPORT_ATTRIBUTES([attribute], *args, **kwargs))
    return attrs


def _stock_import(model: onnx.ModelProto) -> gs.Graph:
    importer = onnx_importer.OnnxImporter
    ours = importer.import_node, importer.import_tensor, importer.import_attributes
    importer.import_node = staticmethod(_gs_compat.STOCK_IMPORT_NODE)
    importer.import_tensor = staticmethod(_gs_compat.STOCK_IMPORT_TENSOR)
    importer.import_attributes = staticmethod(_stock_attributes)
    try:
        return gs.import_onnx(model)
    finally:
        importer.import_node, importer.import_tensor, importer.import_attributes = (staticmethod(f) for f in ours)


def _describe(graph: gs.Graph) -> Iterator[object]:
    """Everything the import decides, with nodes and tensors named by position."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}

    def tensor(t: gs.Tensor) -> object:
        uses = (tuple(index.get(id(n), "outer") for n in t.inputs), tuple(index.get(id(n), "outer") for n in t.outputs))
        extra = ((t.data_location, t.__dict__.get("_export_dtype"), type(t._values).__name__,
                  getattr(t._values, "nbytes", None), list(t._values.shape)) if isinstance(t, gs.Constant) else ())
        return (type(t).__name__, t.name, str(t.dtype), t.shape, getattr(t, "type", None), uses, extra)

    def attr(value: object) -> object:
        if isinstance(value, gs.Graph):
            return ("graph", tuple(_describe(value)))
        if isinstance(value, gs.Constant):
            return ("tensor", value.name, np.asarray(value.values).tobytes())
        return repr(value)

    yield tuple(tensor(t) for t in graph.inputs), tuple(tensor(t) for t in graph.outputs)
    for node in graph.nodes:
        yield (node.op, node.name, node.domain, tuple((k, attr(v)) for k, v in node.attrs.items()),
               tuple(tensor(t) for t in node.inputs), tuple(tensor(t) for t in node.outputs))


def _models() -> Iterator[tuple[str, onnx.ModelProto]]:
    yield "tiny-llama x2", build_sample("tiny-llama", layers=2)
    f = onnx.TensorProto.FLOAT
    # a tensor read twice by one node, an omitted optional input, a name with no value_info, an If whose
    # branches read the outer graph, a custom domain
    then = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", f, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", f, [2])])
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
        helper.make_node("Clip", ["sq", "", "hi"], ["clipped"]),
        helper.make_node("ReduceSum", ["clipped"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["picked"], then_branch=then, else_branch=other),
        helper.make_node("Custom", ["picked"], ["y"], domain="com.example", alpha=0.5, names=["a", "b"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f, [2])], [helper.make_tensor_value_info("y", f, None)],
        [helper.make_tensor("hi", f, [], [6.0]), helper.make_tensor("zero", f, [], [0.0])],
    )
    # value_info as exporters write it: named and unknown dims, no shape, a type numpy lacks, an
    # optional, a tensor listed twice
    graph.value_info.extend([
        helper.make_tensor_value_info("sq", f, ["n"]),
        helper.make_tensor_value_info("clipped", f, [None]),
        helper.make_tensor_value_info("total", f, None),
        helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        helper.make_tensor_value_info("sq", f, [2]),
        helper.make_value_info("picked", helper.make_optional_type_proto(helper.make_tensor_type_proto(f, [2]))),
    ])
    yield "hand-made", helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                              helper.make_opsetid("com.example", 1)])
    bf16 = helper.make_graph([helper.make_node("Cast", ["x"], ["h"], to=onnx.TensorProto.BFLOAT16),
                              helper.make_node("Cast", ["h"], ["y"], to=f)], "bf16",
                             [helper.make_tensor_value_info("x", f, ["n", 3])],
                             [helper.make_tensor_value_info("y", f, ["n", 3])],
                             value_info=[helper.make_tensor_value_info("h", onnx.TensorProto.BFLOAT16, ["n", 3])])
    yield "bfloat16", helper.make_model(bf16, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("label", "model"), list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_import_node_builds_what_graphsurgeon_builds(label: str, model: onnx.ModelProto) -> None:
    ir.import_graph(model)  # installs the compat layer
    assert _gs_compat.STOCK_IMPORT_NODE is not None
    assert list(_describe(gs.import_onnx(model))) == list(_describe(_stock_import(model)))


def test_fast_import_node_matches_on_the_node_suite() -> None:
    from onnx.backend.test.case.node import collect_testcases

    ir.import_graph(build_sample("tiny-llama", layers=1))
    cases = [c for c in collect_testcases(None) if c.model is not None]
    assert len(cases) > 1000
    for case in cases:
        assert list(_describe(gs.import_onnx(case.model))) == list(_describe(_stock_import(case.model))), case.name
