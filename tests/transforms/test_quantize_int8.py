"""quantize-int8: structure per scheme, numerics (a stated SQNR bound: int8 is lossy), refusals,
and a hypothesis property over MatMul/Gemm shapes, ranks and schemes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.numerics.accuracy import quantization_report, sqnr_db
from passes.core.errors import PipelineError
from passes.testing import random_feeds, run_model
from passes.transforms.quantize_int8 import QuantizeInt8
from tests.helpers import init, model, ops, tensor

SCHEMES = ("w8a8-dynamic", "w8a8-static", "w8a16")
#: output SQNR bound (dB) on Gaussian data: 8-bit per-channel weights and per-tensor 8-bit activations
#: give ~38-45 dB on these sizes; 30 dB is the issue's bar for whole models.
MIN_SQNR_DB = 30.0


def matmul_model(m: int = 6, k: int = 16, n: int = 8, *, seed: int = 0, opset: int = 17,
                 weight: np.ndarray | None = None, name: str = "proj") -> onnx.ModelProto:
    """y[batch, m, n] = MatMul(x[batch, m, k], W[k, n]) with Gaussian W."""
    w = weight if weight is not None else np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name=name)
    return model([node], [tensor("x", ["batch", m, w.shape[0]])], [tensor("y", ["batch", m, w.shape[-1]])],
                 [init("w", w)], opset=opset)


def gemm_model(m: int = 6, k: int = 16, n: int = 8, *, trans_b: bool = True, bias: bool = True, alpha: float = 1.0,
               beta: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [init("w", w)] + ([init("c", rng.standard_normal(n).astype(np.float32))] if bias else [])
    node = helper.make_node("Gemm", ["x", "w"] + (["c"] if bias else []), ["y"], name="gemm", transB=int(trans_b),
                            alpha=alpha, beta=beta)
    return model([node], [tensor("x", [m, k])], [tensor("y", [m, n])], inits)


def weight_of(made: onnx.ModelProto, dtype: type) -> np.ndarray:
    (found,) = [numpy_helper.to_array(t) for t in made.graph.initializer if numpy_helper.to_array(t).dtype == dtype
                and numpy_helper.to_array(t).ndim == 2]
    return found


# -- structure ---------------------------------------------------------------------------------

PER_TOKEN = ["Abs", "ReduceMax", "Div", "Max", "Div", "QuantizeLinear"]
EXPECTED_OPS = {
    "w8a8-dynamic": [*PER_TOKEN, "MatMulInteger", "Cast", "Mul", "Mul"],
    "per-tensor": ["DynamicQuantizeLinear", "Mul", "MatMulInteger", "Cast", "Mul"],
    "w8a8-static": ["QuantizeLinear", "MatMulInteger", "Cast", "Mul"],
    "w8a16": ["DequantizeLinear", "MatMul"],
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_structure_matmul_per_scheme_keeps_the_output_name(scheme: str) -> None:
    result = QuantizeInt8(scheme=scheme)(matmul_model())  # type: ignore[arg-type]
    assert ops(result.model) == EXPECTED_OPS[scheme]
    assert result.model.graph.node[-1].output == ["y"]
    assert result.stats["matmuls_quantized"] == 1 and result.stats["scheme"] == scheme
    assert ("calibration" in result.stats) == (scheme == "w8a8-static")
    weight = weight_of(result.model, np.int8)
    assert weight.shape == (16, 8) and np.abs(weight).max() == 127 and weight.min() >= -127


def test_structure_dynamic_per_tensor_is_dynamic_quantize_linear() -> None:
    result = QuantizeInt8(scheme="w8a8-dynamic", activations="per-tensor")(matmul_model())
    assert ops(result.model) == EXPECTED_OPS["per-tensor"] and result.stats["activations"] == "per-tensor"


def test_structure_per_token_reduces_the_last_axis_at_opset_18() -> None:
    """ReduceMax takes its axes as an input from opset 18, as an attribute before."""
    for opset in (13, 18):
        made = QuantizeInt8()(matmul_model(opset=opset)).model
        onnx.checker.check_model(made, full_check=True)
        reduce = next(n for n in made.graph.node if n.op_type == "ReduceMax")
        assert (len(reduce.input) == 2) == (opset >= 18)


def test_structure_gemm_trans_b_bias() -> None:
    dynamic = QuantizeInt8()(gemm_model(trans_b=True)).model
    assert ops(dynamic) == EXPECTED_OPS["w8a8-dynamic"] + ["Add"]
    assert ops(QuantizeInt8(activations="per-tensor")(gemm_model(trans_b=True)).model) == EXPECTED_OPS["per-tensor"] + ["Add"]
    assert weight_of(dynamic, np.int8).shape == (16, 8)  # stored [K, N] for MatMulInteger
    weight_only = QuantizeInt8(scheme="w8a16")(gemm_model(trans_b=True)).model
    assert ops(weight_only) == ["DequantizeLinear", "Gemm"]
    dequantize = weight_only.graph.node[0]
    assert helper.get_attribute_value(dequantize.attribute[0]) == 0  # axis 0 = N of a transB weight
    assert weight_of(weight_only, np.int8).shape == (8, 16)


def test_structure_weights_round_half_to_even_like_quantize_linear() -> None:
    """Per-channel scale max|W[:, n]| / 127 and QuantizeLinear's rounding, checked against onnxruntime."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 5)).astype(np.float32)
    w[0, :] = 127.0 * np.float32([0.5, 1, 2, 4, 8])  # the channel maxima: scales 0.5, 1, 2, 4, 8 exactly
    w[1:9, :] = (np.arange(8, dtype=np.float32)[:, None] + 0.5) * w[0, :] / 127  # exact .5 ties
    result = QuantizeInt8(scheme="w8a16")(matmul_model(k=32, n=5, weight=w))
    scales = [numpy_helper.to_array(t) for t in result.model.graph.initializer if numpy_helper.to_array(t).ndim == 1]
    np.testing.assert_array_equal(scales[0], np.float32([0.5, 1, 2, 4, 8]))
    node = helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=1)
    reference = model([node], [tensor("w", [32, 5])], [tensor("q", [32, 5], TensorProto.INT8)],
                      [init("s", scales[0]), init("z", np.zeros(5, np.int8))])
    expected = run_model(reference, {"w": w})["q"]
    np.testing.assert_array_equal(weight_of(result.model, np.int8), expected)
    assert weight_of(result.model, np.int8)[1:9, 0].tolist() == [0, 2, 2, 4, 4, 6, 6, 8]


# -- numerics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("build", [matmul_model, gemm_model], ids=["matmul", "gemm"])
def test_numerics_sqnr_bound_on_gaussian_data(scheme: str, build) -> None:  # type: ignore[no-untyped-def]
    original = build(m=12, k=64, n=24)
    quantized = QuantizeInt8(scheme=scheme)(original).model  # type: ignore[arg-type]
    feeds = random_feeds(original, 0, input_shapes={"x": [2, 12, 64]} if build is matmul_model else None)
    report = quantization_report(original, quantized, feeds)
    assert report.min_output_sqnr_db >= MIN_SQNR_DB, report.to_json()


def test_numerics_w8a16_is_exactly_the_dequantized_weight() -> None:
    """Weight-only: y = x @ (Wq * sW); float32, the only difference from numpy is summation order."""
    original = matmul_model(k=64, n=24)
    result = QuantizeInt8(scheme="w8a16")(original).model
    wq = weight_of(result, np.int8).astype(np.float32)
    scale = next(numpy_helper.to_array(t) for t in result.graph.initializer if numpy_helper.to_array(t).ndim == 1)
    x = random_feeds(original, 1, input_shapes={"x": [2, 6, 64]})["x"]
    np.testing.assert_allclose(run_model(result, {"x": x})["y"], x @ (wq * scale), rtol=1e-5, atol=1e-5)


def test_numerics_static_calibration_file_sets_the_activation_range(tmp_path: Path) -> None:
    """uint8 asymmetric: s = (max x - min(min x, 0)) / 255, zp = round(-min / s); the file says so."""
    original = matmul_model(k=16, n=8)
    x = np.random.default_rng(5).uniform(-1.0, 3.0, size=(4, 6, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = QuantizeInt8(scheme="w8a8-static", calibration=str(tmp_path / "calib.npz"))(original)
    assert result.stats["calibration"] == "file"
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    scale = next(v for k, v in values.items() if k.startswith("proj/x_scale"))
    zero = next(v for k, v in values.items() if k.startswith("proj/x_zero_point"))
    assert scale == pytest.approx((x.max() - x.min()) / 255, rel=1e-6)
    assert int(zero) == round(-float(x.min()) / float(scale))
    assert sqnr_db(run_model(original, {"x": x})["y"], run_model(result.model, {"x": x})["y"]) >= MIN_SQNR_DB


def test_numerics_percentile_clips_an_outlier() -> None:
    x = np.random.default_rng(0).standard_normal((1, 64, 16)).astype(np.float32)
    x[0, 0, 0] = 1000.0  # one outlier stretches min-max to a 4 units-wide step
    original = matmul_model(m=64)

    def static_sqnr(percentile: float, path: Path) -> float:
        np.savez(path, x=x)
        quantized = QuantizeInt8(scheme="w8a8-static", calibration=str(path), percentile=percentile)(original).model
        clean = {"x": np.where(np.abs(x) > 100, 0, x).astype(np.float32)}
        return sqnr_db(run_model(original, clean)["y"], run_model(quantized, clean)["y"])

    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        assert static_sqnr(99.9, Path(folder) / "c.npz") > static_sqnr(100.0, Path(folder) / "c.npz") + 20


# -- refusals ----------------------------------------------------------------------------------

def _refusals(made: onnx.ModelProto, **options: object) -> list[str]:
    result = QuantizeInt8(**options)(made)  # type: ignore[arg-type]
    assert not result.modified
    return [r.reason for r in result.refusals]


def test_refusal_weight_not_constant() -> None:
    made = model([helper.make_node("MatMul", ["x", "w"], ["y"], name="qk")], [tensor("x", [2, 4]), tensor("w", [4, 3])],
                 [tensor("y", [2, 3])])
    assert _refusals(made) == ["QuantizeTokenW8A8: weight is not a constant"]


def test_refusal_weight_not_2d() -> None:
    w = np.ones((2, 4, 3), np.float32)
    made = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [2, 5, 4])], [tensor("y", [2, 5, 3])],
                 [init("w", w)])
    assert _refusals(made, scheme="w8a16") == ["QuantizeWeightOnlyW8A16: weight is 3-D, not 2-D"]


def test_refusal_skip_pattern_and_min_elements() -> None:
    assert _refusals(matmul_model(name="/lm_head/MatMul"), skip="lm_head") == [
        "QuantizeTokenW8A8: name matches skip pattern 'lm_head'"]
    assert _refusals(matmul_model(k=16, n=8), min_elements=129) == [
        "QuantizeTokenW8A8: weight has 128 elements < min_elements=129"]
    assert QuantizeInt8(min_elements=128)(matmul_model(k=16, n=8)).modified


def test_refusal_non_float32_weight() -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    made = model([node], [tensor("x", [2, 4], TensorProto.INT32)], [tensor("y", [2, 3], TensorProto.INT32)],
                 [init("w", np.ones((4, 3), np.int32))])
    assert _refusals(made, scheme="w8a8-static") == ["QuantizeStaticW8A8: weight dtype int32 is not float32"]


def test_refusal_opset_too_low() -> None:
    assert _refusals(matmul_model(opset=12), scheme="w8a16") == [
        "QuantizeWeightOnlyW8A16: opset 12 < 13 needed by per-axis DequantizeLinear"]
    assert _refusals(matmul_model(opset=10), activations="per-tensor") == [
        "QuantizeDynamicW8A8: opset 10 < 11 needed by DynamicQuantizeLinear"]
    assert _refusals(matmul_model(opset=9)) == ["QuantizeTokenW8A8: opset 9 < 10 needed by QuantizeLinear"]
    assert QuantizeInt8(scheme="w8a8-static")(matmul_model(opset=10)).modified


def test_refusal_gemm_trans_a_and_already_quantized() -> None:
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)
    made = model([node], [tensor("x", [4, 2])], [tensor("y", [2, 3])], [init("w", np.ones((4, 3), np.float32))])
    assert _refusals(made) == ["QuantizeTokenW8A8: Gemm transA=1"]
    once = QuantizeInt8(scheme="w8a16")(matmul_model()).model
    assert _refusals(once, scheme="w8a16") == ["QuantizeWeightOnlyW8A16: weight is already quantized (DequantizeLinear)"]


def test_refusal_options_are_checked() -> None:
    with pytest.raises(PipelineError, match="percentile"):
        QuantizeInt8.from_options({"scheme": "w8a8-static", "percentile": "20"})
    with pytest.raises(PipelineError, match="expected one of"):
        QuantizeInt8.from_options({"scheme": "w4a16"})
    assert QuantizeInt8.from_options({"scheme": "w8a16", "skip": "lm_head"}).spec() == "quantize-int8{scheme=w8a16,skip=lm_head}"


def _bias_term(made: onnx.ModelProto) -> np.ndarray | float:
    """beta * C of a Gemm, else 0."""
    node = made.graph.node[0]
    if node.op_type != "Gemm" or len(node.input) < 3:
        return 0.0
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
    c = next(numpy_helper.to_array(t) for t in made.graph.initializer if t.name == node.input[2])
    return np.float32(beta) * c


def _alpha_weight(made: onnx.ModelProto) -> tuple[float, np.ndarray]:
    """alpha and W as [K, N] of the single MatMul/Gemm."""
    node = made.graph.node[0]
    weight = next(numpy_helper.to_array(t) for t in made.graph.initializer if t.name == node.input[1])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return float(attrs.get("alpha", 1.0)), weight.T if attrs.get("transB", 0) else weight


# -- property ----------------------------------------------------------------------------------

@st.composite
def quantizable_models(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """MatMul (x rank 2-4, leading dims dynamic or static) or Gemm (transB, bias, alpha, beta), Gaussian W."""
    k, n, m = draw(st.integers(1, 48)), draw(st.integers(1, 40)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        lead = draw(st.lists(st.integers(1, 3), max_size=2))
        dynamic = draw(st.booleans())
        dims: list[int | str] = [f"d{i}" if dynamic else d for i, d in enumerate(lead)]
        w = rng.standard_normal((k, n)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
        made = model([node], [tensor("x", [*dims, m, k])], [tensor("y", [*dims, m, n])], [init("w", w)])
        return made, {"x": [*lead, m, k]}
    trans_b, bias = draw(st.booleans()), draw(st.booleans())
    alpha, beta = draw(st.sampled_from([1.0, 0.5, 2.0])), draw(st.sampled_from([1.0, 0.25]))
    return gemm_model(m, k, n, trans_b=trans_b, bias=bias, alpha=alpha, beta=beta, seed=seed), {"x": [m, k]}


@given(quantizable_models(), st.sampled_from(SCHEMES))
@example((gemm_model(1, 1, 1, trans_b=True, bias=True, alpha=2.0, beta=0.25), {"x": [1, 1]}), "w8a8-static")
def test_property_valid_accurate_idempotent(case: tuple[onnx.ModelProto, dict[str, list[int]]], scheme: str) -> None:
    original, shapes = case
    once = QuantizeInt8(scheme=scheme)(original)  # type: ignore[arg-type]
    onnx.checker.check_model(once.model, full_check=True)
    assert once.modified and once.stats["matmuls_quantized"] == 1
    assert ("MatMulInteger" in ops(once.model)) == (scheme != "w8a16")
    assert ops(once.model)[0] == {"w8a8-dynamic": "Abs", "w8a8-static": "QuantizeLinear",
                                  "w8a16": "DequantizeLinear"}[scheme]
    feeds = random_feeds(original, 0, input_shapes=shapes)
    expected, got = run_model(original, feeds)["y"], run_model(once.model, feeds)["y"]
    noise = got.astype(np.float64) - expected
    # The bias is added exactly, so the signal is the matmul term alpha * x @ W. A few outputs can
    # cancel to ~0 by chance (1x28 @ 28x1 gave -0.09 where |x||w| is ~5: 16.7 dB), so the bound is
    # on the noise against the product's expected power alpha^2 * x^2 @ W^2 always, and on the
    # plain SQNR once there are 64 outputs to average over.
    alpha, weight = _alpha_weight(original)
    x = feeds["x"].astype(np.float64)
    power = alpha**2 * np.sum(np.square(x) @ np.square(weight.astype(np.float64)))
    if scheme == "w8a8-static":
        # the activation scale comes from the calibration inputs, not from this one: with a handful of
        # values (x[2, 1] once drew two 20x below the calibration's spread: 29.7 dB), the noise is judged
        # against the power of an input at the calibrated scale
        from passes.numerics.calibration import generated_feeds

        calibrated = float(np.mean([np.mean(np.square(f["x"].astype(np.float64))) for f in generated_feeds(original)]))
        rows = x.size // x.shape[-1]
        power = max(power, alpha**2 * calibrated * rows * float(np.sum(np.square(weight.astype(np.float64)))))
    assert 10 * np.log10(power / max(np.sum(noise**2), 1e-300)) >= MIN_SQNR_DB
    if expected.size >= 64 and scheme != "w8a8-static":  # static: an input below the calibrated spread (the
        # noise stays that of the calibrated scale) lowers the plain SQNR, as above (a 2 x 1 input: 29.7 dB)
        product = expected - _bias_term(original)
        assert sqnr_db(product, product + noise) >= MIN_SQNR_DB
    again = QuantizeInt8(scheme=scheme)(once.model)  # type: ignore[arg-type]
    assert not again.modified, again.stats


# -- mixed precision by sensitivity --------------------------------------------------------------

def _two_layer_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="calm"),
             helper.make_node("MatMul", ["z", "w2"], ["y2"], name="sink")]
    inits = [init("w1", rng.standard_normal((32, 16)).astype(np.float32)),
             init("w2", rng.standard_normal((32, 16)).astype(np.float32))]
    return model(nodes, [tensor("x", [1, 16, 32]), tensor("z", [1, 16, 32])],
                 [tensor("y1", [1, 16, 16]), tensor("y2", [1, 16, 16])], inits)


def _sink_feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, z = (rng.standard_normal((1, 16, 32)).astype(np.float32) for _ in range(2))
    z[0, 0] *= 1000.0  # the first token's activations are massive (an attention sink's, in trained LLMs)
    return {"x": x, "z": z}


def test_mixed_precision_keeps_the_layer_a_massive_token_ruins_in_w8a16(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", **{k: np.stack([_sink_feeds(s)[k] for s in (1, 2)]) for k in ("x", "z")})
    result = QuantizeInt8(scheme="w8a8-static", calibration=str(tmp_path / "calib.npz"), min_sqnr=25.0)(_two_layer_model())
    layers = {layer["layer"]: layer for layer in result.stats["layers"]}  # type: ignore[union-attr]
    assert layers["y1"]["kept"] == "w8a8" and layers["y1"]["sqnr_db"] > 35
    assert layers["y2"]["kept"] == "w8a16" and layers["y2"]["sqnr_db"] < 25
    assert result.stats["w8a8_layers"] == 1 and result.stats["fallback_layers"] == 1
    producers = {n.output[0]: n.op_type for n in result.model.graph.node}
    assert producers["y2"] == "MatMul" and "DequantizeLinear" in producers.values()
    feeds = _sink_feeds(3)
    original = run_model(_two_layer_model(), feeds)
    got = run_model(result.model, feeds)
    ordinary = slice(1, None)  # the tokens the massive one would have drowned
    assert sqnr_db(original["y2"][0, ordinary], got["y2"][0, ordinary]) > 35
    # per-token dynamic scales give the massive token its own scale: nothing falls back
    dynamic = QuantizeInt8(scheme="w8a8-dynamic", calibration=str(tmp_path / "calib.npz"), min_sqnr=25.0)(_two_layer_model())
    assert dynamic.stats["fallback_layers"] == 0


def test_token_sqnr_is_not_hidden_by_one_massive_row() -> None:
    from passes.transforms._sensitivity import token_sqnr_db

    reference = np.ones((4, 8))
    reference[0] *= 1000.0
    candidate = reference.copy()
    candidate[1:] += 0.1  # 20 dB of noise on every ordinary row
    assert sqnr_db(reference, candidate) > 60  # a plain SQNR sees the massive row only
    assert token_sqnr_db(reference, candidate) == pytest.approx(-10 * np.log10(0.75 * 0.01), rel=1e-9)
    assert token_sqnr_db(reference, reference) == np.inf
