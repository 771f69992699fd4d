"""The exact reference for quantized graphs (`passes.numerics.exact`, used by `passes.numerics.verify.run_model`).

Integer results are judged by numpy's int64 matmul and convolution, never by a kernel that may saturate.
The saturating cases (u8 255 x s8 -128: every pair of products is -65280, past int16) are the ones on
which onnxruntime's own u8 x s8 kernels go wrong on x86 CPUs without VNNI; the rewritten graph holds no
integer matmul for onnxruntime to get wrong, on whichever CPU this runs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.core.errors import VerificationError
from passes.numerics.exact import exact_integer_model, needs_reference_evaluator
from passes.numerics.verify import run_model

S8, U8 = TensorProto.INT8, TensorProto.UINT8
NP = {S8: np.int8, U8: np.uint8}


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "exact", list(inputs), list(outputs), list(initializers))
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    made.ir_version = 8
    onnx.checker.check_model(made)
    return made


def matmul_integer(a: np.ndarray, b: np.ndarray, a_zero: np.ndarray | None = None,
                   b_zero: np.ndarray | None = None) -> onnx.ModelProto:
    """y = MatMulInteger(a (input), b, a_zero?, b_zero?) with b and the zero points as initializers."""
    names, inits = ["a", "b"], [numpy_helper.from_array(b, "b")]
    if a_zero is not None or b_zero is not None:
        a_zero = a_zero if a_zero is not None else np.array(0, a.dtype)
        b_zero = b_zero if b_zero is not None else np.array(0, b.dtype)
        names += ["a_zero", "b_zero"]
        inits += [numpy_helper.from_array(a_zero, "a_zero"), numpy_helper.from_array(b_zero, "b_zero")]
    a_type = helper.np_dtype_to_tensor_dtype(a.dtype)
    node = helper.make_node("MatMulInteger", names, ["y"], name="mmi")
    return _model([node], [helper.make_tensor_value_info("a", a_type, list(a.shape))],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, [*a.shape[:-1], b.shape[1]])], inits)


def exact_product(a: np.ndarray, b: np.ndarray, a_zero: np.ndarray | None = None,
                  b_zero: np.ndarray | None = None) -> np.ndarray:
    a64 = a.astype(np.int64) - (0 if a_zero is None else (a_zero.astype(np.int64).reshape(-1, 1)
                                                            if a_zero.ndim == 1 and a_zero.size > 1
                                                            else a_zero.astype(np.int64)))
    b64 = b.astype(np.int64) - (0 if b_zero is None else b_zero.astype(np.int64))
    return (a64 @ b64).astype(np.int32)


def test_structure_no_integer_matmul_is_left_for_onnxruntime() -> None:
    made = matmul_integer(np.zeros((4, 8), np.uint8), np.zeros((8, 3), np.int8), np.array(3, np.uint8))
    exact = exact_integer_model(made)
    assert [n.op_type for n in exact.graph.node] == ["Cast", "Cast", "Sub", "Cast", "Cast", "Sub", "MatMul", "Cast"]
    assert [n.op_type for n in made.graph.node] == ["MatMulInteger"]  # the input model is left as it was
    onnx.checker.check_model(exact)
    plain = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", 1, [2])],
                   [helper.make_tensor_value_info("y", 1, [2])])
    assert exact_integer_model(plain) is plain


@pytest.mark.parametrize(("a_value", "b_value"), [(255, -128), (255, 127), (0, -128)])
def test_saturating_products_are_exact(a_value: int, b_value: int) -> None:
    """255 * -128 * 2 = -65280 per pair: a `vpmaddubsw` kernel would give -32768 per pair."""
    a = np.full((8, 512), a_value, np.uint8)
    b = np.full((512, 64), b_value, np.int8)
    got = run_model(matmul_integer(a[None], b), {"a": a[None]})["y"]
    np.testing.assert_array_equal(got[0], np.full((8, 64), a_value * b_value * 512, np.int32))


def test_zero_points_per_tensor_per_row_and_per_column() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 33), dtype=np.uint8)
    b = rng.integers(-128, 128, (33, 7), dtype=np.int8)
    for a_zero, b_zero in [(np.array(131, np.uint8), None), (np.array([128], np.uint8), np.array(-3, np.int8)),
                           (rng.integers(0, 256, 5, dtype=np.uint8), rng.integers(-128, 128, 7, dtype=np.int8))]:
        got = run_model(matmul_integer(a, b, a_zero, b_zero), {"a": a})["y"]
        np.testing.assert_array_equal(got, exact_product(a, b, a_zero, b_zero))


@settings(max_examples=40)
@given(st.sampled_from([(U8, S8), (U8, U8), (S8, S8), (S8, U8)]), st.integers(1, 6), st.integers(1, 300),
       st.integers(1, 40), st.booleans(), st.integers(0, 2**16))
def test_property_matmul_integer_equals_int64_matmul(types: tuple[int, int], m: int, k: int, n: int,
                                                      batched: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    info_a, info_b = np.iinfo(NP[types[0]]), np.iinfo(NP[types[1]])
    a = rng.integers(info_a.min, info_a.max, (2, m, k) if batched else (m, k), endpoint=True).astype(NP[types[0]])
    b = rng.integers(info_b.min, info_b.max, (k, n), endpoint=True).astype(NP[types[1]])
    a_zero = np.array(rng.integers(info_a.min, info_a.max, endpoint=True)).astype(NP[types[0]])
    b_zero = rng.integers(info_b.min, info_b.max, n, endpoint=True).astype(NP[types[1]])
    got = run_model(matmul_integer(a, b, a_zero, b_zero), {"a": a})["y"]
    np.testing.assert_array_equal(got, exact_product(a, b, a_zero, b_zero))


def test_conv_integer_runs_under_the_reference_evaluator() -> None:
    """ConvInteger has no float64 form in onnxruntime: the model runs under onnx.reference (int32)."""
    x = np.full((1, 64, 3, 3), 255, np.uint8)
    w = np.full((2, 64, 1, 1), -128, np.int8)
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"])
    made = _model([node], [helper.make_tensor_value_info("x", U8, list(x.shape))],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2, 3, 3])], [numpy_helper.from_array(w, "w")])
    assert needs_reference_evaluator(made)
    np.testing.assert_array_equal(run_model(made, {"x": x})["y"], np.full((1, 2, 3, 3), 255 * -128 * 64, np.int32))


def dynamic_quantize_spec(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """DynamicQuantizeLinear as the ONNX spec defines it (range widened to include 0, round half to even)."""
    low, high = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = np.float32((high - low) / np.float32(255)) if high > low else np.float32(1)
    zero = np.uint8(np.clip(np.rint(np.float32(0) - low / scale), 0, 255))
    y = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    return y, scale, zero


@pytest.mark.parametrize("case", ["normal", "ties", "positive", "zeros", "outlier"])
def test_dynamic_quantize_linear_of_onnxruntime_is_the_spec(case: str) -> None:
    """DynamicQuantizeLinear stays with onnxruntime (no integer sums): its bits equal the spec's."""
    rng = np.random.default_rng(5)
    x = {"normal": rng.normal(0, 3, (16, 64)), "ties": (np.arange(-255, 256) / 2.0).reshape(1, -1),
         "positive": rng.uniform(0.5, 2, (4, 100)), "zeros": np.zeros((2, 8)),
         "outlier": np.concatenate([rng.normal(0, 1, 999), [300.0]]).reshape(1, -1)}[case].astype(np.float32)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero"])
    made = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                  [helper.make_tensor_value_info("y", U8, list(x.shape)), helper.make_tensor_value_info("scale", 1, []),
                   helper.make_tensor_value_info("zero", U8, [])])
    got = run_model(made, {"x": x})
    y, scale, zero = dynamic_quantize_spec(x)
    assert got["scale"] == scale and got["zero"] == zero
    np.testing.assert_array_equal(got["y"], y)


def test_qlinear_matmul_with_float16_scales_is_refused_with_a_reason() -> None:
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("a_scale", np.array(0.5, np.float16)), ("a_zero", np.array(0, np.int8)), ("w", np.ones((4, 3), np.int8)),
        ("b_scale", np.array(0.5, np.float16)), ("b_zero", np.array(0, np.int8)),
        ("y_scale", np.array(0.5, np.float16)), ("y_zero", np.array(0, np.int8))]]
    node = helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zero", "w", "b_scale", "b_zero", "y_scale", "y_zero"],
                            ["y"], name="qmm")
    made = _model([node], [helper.make_tensor_value_info("a", S8, [2, 4])],
                  [helper.make_tensor_value_info("y", S8, [2, 3])], inits, opset=21)
    with pytest.raises(VerificationError, match="scale 'a_scale' is float16; only float32 scales"):
        run_model(made, {"a": np.ones((2, 4), np.int8)})
