"""ONNX-side checks before TVM's importer: static shapes, importable ops, importer failures named by
node, and the QLinearMatMul decomposition (bit-exact with its definition, evaluated exactly)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.lowering import LoweringError
from passes.lowering._onnx import (
    check_importable,
    check_static_inputs,
    rewrite_qlinear_matmul,
)
from tests.lowering import INT8_TYPES, onnx_model, qlinear_matmul_model, qlinear_spec_of, run_reference

_NP = INT8_TYPES


def _value(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def test_dynamic_inputs_are_refused_naming_each() -> None:
    made = onnx_model([helper.make_node("Add", ["ids", "mask"], ["y"])],
                      [_value("ids", TensorProto.FLOAT, [1, "seq"]), _value("mask", TensorProto.FLOAT, [1, 4]),
                       _value("extra", TensorProto.FLOAT, ["batch", None])],
                      [_value("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(LoweringError) as caught:
        check_static_inputs(made)
    assert str(caught.value) == ("lowering needs static input shapes: input 'ids' has dynamic shape [1, seq]; "
                                 "input 'extra' has dynamic shape [batch, ?]; bind them first "
                                 "(passes.optimize(model, input_shapes={...}) or `passes run --shape`)")


def test_unknown_rank_is_refused() -> None:
    made = onnx_model([helper.make_node("Relu", ["x"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                      [_value("y", TensorProto.FLOAT, [2])], check=False)
    with pytest.raises(LoweringError, match="input 'x' has unknown rank"):
        check_static_inputs(made)


def test_initializers_listed_as_inputs_need_no_static_shape() -> None:
    made = onnx_model([helper.make_node("Add", ["x", "w"], ["y"])],
                      [_value("x", TensorProto.FLOAT, [2]), _value("w", TensorProto.FLOAT, ["n"])],
                      [_value("y", TensorProto.FLOAT, [2])], [numpy_helper.from_array(np.ones(2, np.float32), "w")])
    check_static_inputs(made)


def test_ops_without_converter_are_named_with_their_nodes() -> None:
    nodes = [helper.make_node("ConvInteger", ["x", "w"], ["c"], name="conv_int"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Foo", ["r"], ["y"], name="custom", domain="my.ops")]
    made = onnx_model(nodes, [_value("x", TensorProto.UINT8, [1, 1, 4, 4]), _value("w", TensorProto.UINT8, [1, 1, 1, 1])],
                      [_value("y", TensorProto.INT32, [1, 1, 4, 4])], check=False)
    with pytest.raises(LoweringError) as caught:
        check_importable(made)
    assert str(caught.value) == ("TVM's ONNX importer has no converter for ConvInteger (node 'conv_int'); "
                                 "my.ops::Foo (node 'custom'); decompose or replace these ops before lowering")


def test_importer_failure_names_the_node_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from passes.lowering._relax import import_onnx

    made = onnx_model([helper.make_node("Pad", ["x", "pads"], ["y"], name="pad_dyn")],
                      [_value("x", TensorProto.FLOAT, [2, 3]), _value("pads", TensorProto.INT64, [4])],
                      [_value("y", TensorProto.FLOAT, ["a", "b"])])
    with pytest.raises(LoweringError) as caught:
        import_onnx(made)
    assert str(caught.value) == ("TVM's ONNX importer failed on node 'pad_dyn' (Pad): "
                                 "ValueError: Dynamic pads are not supported yet.")
    assert capsys.readouterr().out == ""  # from_onnx prints the failing op; the library must not


def test_qlinear_matmul_decomposes_into_integer_matmul_and_requantize() -> None:
    original = qlinear_matmul_model(4, 8, 6, TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT8, per_column=False,
                              scales=(0.05, 0.004, 0.07), zeros=(5, 3, 120))
    rewritten, count = rewrite_qlinear_matmul(original)
    assert count == 1
    assert [node.op_type for node in rewritten.graph.node] == ["MatMulInteger", "Cast", "Mul", "QuantizeLinear"]
    initializers = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert not {"a_scale", "b_scale", "y_scale"} & set(initializers)  # folded into the multiplier
    expected = (np.float32(0.05) * np.float32(0.004)) / np.float32(0.07)
    assert initializers["qmm/multiplier"].dtype == np.float32
    assert initializers["qmm/multiplier"] == expected
    assert initializers["qmm/unit_scale"] == np.float32(1.0)
    assert rewritten.graph.node[-1].output[0] == "y"
    onnx.checker.check_model(rewritten, full_check=True)
    assert rewrite_qlinear_matmul(rewritten) == (rewritten, 0)


def test_qlinear_matmul_with_scale_inputs_multiplies_at_run_time() -> None:
    original = qlinear_matmul_model(3, 16, 5, TensorProto.INT8, TensorProto.INT8, TensorProto.INT8, per_column=False,
                              scales=(0.02, 0.01, 0.03), zeros=(0, 0, 0), dynamic_scales=True)
    rewritten, _ = rewrite_qlinear_matmul(original)
    assert [node.op_type for node in rewritten.graph.node] == ["MatMulInteger", "Cast", "Mul", "Div", "Mul",
                                                               "QuantizeLinear"]
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(-128, 128, (1, 3, 16)).astype(np.int8), "a_scale": np.array(0.02, np.float32),
             "b_scale": np.array(0.01, np.float32), "y_scale": np.array(0.03, np.float32)}
    np.testing.assert_array_equal(run_reference(rewritten, feeds)["y"], qlinear_spec_of(original, feeds))


def test_qlinear_matmul_with_float16_scales_is_refused() -> None:
    original = qlinear_matmul_model(2, 4, 3, TensorProto.INT8, TensorProto.INT8, TensorProto.INT8, per_column=False,
                              scales=(0.5, 0.5, 0.5), zeros=(0, 0, 0))
    for tensor in original.graph.initializer:
        if tensor.name == "a_scale":
            tensor.CopyFrom(numpy_helper.from_array(np.array(0.5, np.float16), "a_scale"))
    with pytest.raises(LoweringError, match="scale 'a_scale' is float16; only float32 scales"):
        rewrite_qlinear_matmul(original)


#: (a, b) element types onnxruntime implements QLinearMatMul for; y has a's type
_ORT_QLINEAR_TYPES = st.sampled_from([(TensorProto.UINT8, TensorProto.UINT8), (TensorProto.UINT8, TensorProto.INT8),
                                      (TensorProto.INT8, TensorProto.INT8)])


@st.composite
def qlinear_cases(draw: st.DrawFn) -> dict:
    a_type, b_type = draw(_ORT_QLINEAR_TYPES)
    y_type = a_type
    zero = {t: st.integers(int(np.iinfo(_NP[t]).min), int(np.iinfo(_NP[t]).max)) for t in _NP}
    return {"m": draw(st.integers(1, 8)), "k": draw(st.integers(1, 48)), "n": draw(st.integers(1, 12)),
            "a_type": a_type, "b_type": b_type, "y_type": y_type, "per_column": draw(st.booleans()),
            "scales": tuple(draw(st.floats(0.0001220703125, 2.0, width=32)) for _ in range(3)),
            "zeros": (draw(zero[a_type]), draw(zero[b_type]), draw(zero[y_type])),
            "seed": draw(st.integers(0, 2**16))}


# ties: multiplier 0.5 on odd accumulators must round half to even, as MLAS does
@example({"m": 4, "k": 16, "n": 8, "a_type": TensorProto.INT8, "b_type": TensorProto.INT8,
          "y_type": TensorProto.INT8, "per_column": False, "scales": (1.0, 0.5, 1.0), "zeros": (0, 0, 0), "seed": 3})
@given(qlinear_cases())
def test_property_qlinear_decomposition_is_bit_exact_with_the_spec(case: dict) -> None:
    """The decomposition, evaluated exactly, equals QLinearMatMul's definition (numpy, int64 accumulator)."""
    original = qlinear_matmul_model(**case)
    rewritten, count = rewrite_qlinear_matmul(original)
    assert count == 1 and "QLinearMatMul" not in [node.op_type for node in rewritten.graph.node]
    onnx.checker.check_model(rewritten, full_check=True)
    info = np.iinfo(_NP[case["a_type"]])
    feeds = {"a": np.random.default_rng(case["seed"]).integers(info.min, info.max, (1, case["m"], case["k"]),
                                                               endpoint=True).astype(_NP[case["a_type"]])}
    np.testing.assert_array_equal(run_reference(rewritten, feeds)["y"], qlinear_spec_of(original, feeds))
