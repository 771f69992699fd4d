"""int8 matmuls stay int8: MatMulInteger (and decomposed QLinearMatMul) import as
`matmul(a8, w8, out_dtype=int32)` plus zero-point corrections, bit-exact against the exact reference (`passes.numerics.verify.run_model`) on the host."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.lowering import (
    INT8_TYPES,
    onnx_model,
    qlinear_matmul_model,
    random_int8,
    run_reference,
    target,
)

pytestmark = pytest.mark.slow

S8, U8 = TensorProto.INT8, TensorProto.UINT8


def matmul_integer_model(m: int, k: int, n: int, a_type: int, b_type: int, *, a_zero: int | None = None,
                         b_zero: int | list[int] | None = None, zero_as_input: bool = False,
                         seed: int = 0) -> onnx.ModelProto:
    """y[1, m, n] = MatMulInteger(a[1, m, k], W[k, n] (constant), a_zero?, b_zero?)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(random_int8(rng, b_type, (k, n)), "w")]
    inputs = [helper.make_tensor_value_info("a", a_type, [1, m, k])]
    names = ["a", "w"]
    if a_zero is not None or b_zero is not None:
        names += ["a_zero", "b_zero"]
        zeros = {"a_zero": np.array(a_zero or 0).astype(INT8_TYPES[a_type]),
                 "b_zero": np.array(b_zero if b_zero is not None else 0).astype(INT8_TYPES[b_type])}
        if zero_as_input:
            inputs += [helper.make_tensor_value_info(name, a_type if name == "a_zero" else b_type, list(value.shape))
                       for name, value in zeros.items()]
        else:
            inits += [numpy_helper.from_array(value, name) for name, value in zeros.items()]
    node = helper.make_node("MatMulInteger", names, ["y"], name="mmi")
    return onnx_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.INT32, [1, m, n])], inits)


def _host_matches_reference(made: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Lower + build for the host, run, compare bit for bit with the exact reference; returns int8 matmuls kept."""
    from passes.lowering import build, lower, run_host

    host = target("host")
    lowered = lower(made, host)
    got = run_host(build(lowered, host), feeds)
    expected = run_reference(made, feeds)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)
    return lowered.int8_matmuls


def _a_feed(made: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    a = made.graph.input[0].type.tensor_type
    return {"a": random_int8(np.random.default_rng(seed), a.elem_type, [d.dim_value for d in a.shape.dim])}


def test_structure_widened_matmul_imports_as_int8_matmul() -> None:
    from passes.lowering._relax import import_onnx

    imported = import_onnx(matmul_integer_model(16, 64, 48, S8, S8))
    script = imported.module["main"].script()
    assert imported.int8_matmuls == 1
    assert "R.astype" not in script
    assert 'R.matmul(a, metadata["ir.GenericConst"][0], out_dtype="int32")' in script


def test_structure_weight_stays_int8_through_constant_folding() -> None:
    from passes.lowering import lower

    lowered = lower(matmul_integer_model(16, 64, 48, U8, S8, a_zero=128, b_zero=0), target("sd8gen2"))
    params = [(tuple(int(d) for d in p.shape), str(p.dtype)) for f in lowered.kernels.values() for p in f.params]
    assert ((16, 48, 4), "int8") in params  # packed [K/4, N, 4] for the dispatched OpenCL kernel
    assert ((64, 48), "int32") not in params


CASES = {
    "s8*s8": ({"a_type": S8, "b_type": S8}, 1),
    "u8*u8": ({"a_type": U8, "b_type": U8}, 1),
    "u8*s8, activation zero point": ({"a_type": U8, "b_type": S8, "a_zero": 128, "b_zero": 0}, 1),
    "s8*s8, zero zero points": ({"a_type": S8, "b_type": S8, "a_zero": 0, "b_zero": 0}, 1),
    "u8*u8, both zero points": ({"a_type": U8, "b_type": U8, "a_zero": 7, "b_zero": 250}, 1),
    "s8*s8, per-column weight zero points": ({"a_type": S8, "b_type": S8, "a_zero": -3,
                                              "b_zero": [-128, 0, 5, 127, 1, -1, 64, 3]}, 1),
    # refusal: zero points that are graph inputs cannot be folded into constants: stays widened, still exact
    "zero points as inputs": ({"a_type": U8, "b_type": S8, "a_zero": 9, "b_zero": 2, "zero_as_input": True}, 0),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_numerics_matmul_integer_bit_exact_on_the_host(case: str) -> None:
    options, narrowed = CASES[case]
    made = matmul_integer_model(5, 37, 8, **options)
    feeds = _a_feed(made)
    if options.get("zero_as_input"):
        feeds["a_zero"] = np.array(options["a_zero"]).astype(INT8_TYPES[options["a_type"]])
        feeds["b_zero"] = np.array(options["b_zero"]).astype(INT8_TYPES[options["b_type"]])
    assert _host_matches_reference(made, feeds) == narrowed


QLINEAR_CASES = {
    "u8*s8 per-tensor": {"a_type": U8, "b_type": S8, "y_type": U8, "per_column": False,
                         "scales": (0.05, 0.004, 0.07), "zeros": (5, 0, 120)},
    "u8*u8 per-column": {"a_type": U8, "b_type": U8, "y_type": U8, "per_column": True,
                         "scales": (0.02, 0.01, 0.3), "zeros": (128, 0, 3)},
    "s8*s8 ties": {"a_type": S8, "b_type": S8, "y_type": S8, "per_column": False,
                   "scales": (1.0, 0.5, 1.0), "zeros": (0, 0, 0)},
}


@pytest.mark.parametrize("case", list(QLINEAR_CASES), ids=list(QLINEAR_CASES))
def test_numerics_qlinear_matmul_bit_exact_on_the_host(case: str) -> None:
    made = qlinear_matmul_model(6, 40, 9, **QLINEAR_CASES[case])
    assert _host_matches_reference(made, _a_feed(made)) == 1


def test_numerics_per_token_w8a8_lowers_to_int8_and_is_bit_exact_on_the_host() -> None:
    """quantize-int8's per-token scheme: the uint8 codes (Abs, ReduceMax, Div, Max, Div, QuantizeLinear) and
    the int32 accumulator are bit-exact against the exact reference, the matmul stays int8 (constant zero
    point 128), and the rescaled float output is the reference's up to float rounding. Rows include an
    all-zero one (scale clamped to tiny), a massive-activation one, and exact .5 ties after scaling."""
    from passes.transforms.quantize_int8 import QuantizeInt8

    rng = np.random.default_rng(4)
    k, n, m = 48, 24, 6
    weight = rng.standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    made = onnx_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])],
                      [numpy_helper.from_array(weight, "w")])
    quantized = QuantizeInt8(scheme="w8a8-dynamic")(made).model
    produced = {node.op_type: node.output[0] for node in quantized.graph.node}
    codes, accumulator = produced["QuantizeLinear"], produced["MatMulInteger"]
    quantized.graph.output.extend([helper.make_tensor_value_info(codes, TensorProto.UINT8, [1, m, k]),
                                   helper.make_tensor_value_info(accumulator, TensorProto.INT32, [1, m, n])])
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    x[0, 1] = 0.0
    x[0, 2] *= 1000.0
    x[0, 3] = np.float32(127.0) * np.linspace(-1, 1, k, dtype=np.float32)  # scale 1: codes are the values
    x[0, 3, :8] = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])  # ties: round half to even
    from passes.lowering import build, lower, run_host

    host = target("host")
    lowered = lower(quantized, host)
    got = run_host(build(lowered, host), {"x": x})
    expected = run_reference(quantized, {"x": x})
    assert lowered.int8_matmuls == 1
    np.testing.assert_array_equal(got[codes], expected[codes])
    np.testing.assert_array_equal(got[accumulator], expected[accumulator])
    assert expected[codes][0, 1].tolist() == [128] * k
    # float32 rescale: two multiplies per element, so a few ulp of the output's magnitude
    np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-6, atol=1e-6 * float(np.abs(expected["y"]).max()))
