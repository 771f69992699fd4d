"""smooth-quant: structure (no op added, every producer kind folds 1/s), numerics (float outputs equal up to
rounding; per-tensor int8 SQNR gains on activations with outlier channels), refusals, idempotence and a
hypothesis property over widths, outlier strengths and alpha."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from passes.core.errors import PipelineError
from passes.numerics.accuracy import sqnr_db
from passes.testing import run_model
from passes.transforms.quantize_int8 import QuantizeInt8
from passes.transforms.smooth_quant import SmoothQuant, smoothing_scale
from tests.helpers import init, model, ops, tensor

#: float32 over two matmuls: the moved scales round differently; relative to the output's magnitude.
RTOL = 1e-5


def _outlier_input(rows: int, k: int, seed: int, strength: float = 50.0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, rows, k)).astype(np.float32)
    x[..., : max(1, k // 16)] *= strength  # a few channels 50x the rest, as in trained LLMs
    return x


def norm_model(k: int = 32, n: int = 24, *, layer_norm: str = "mul", seed: int = 0,
               residual: bool = False, outlier: float = 30.0) -> onnx.ModelProto:
    """y = (norm(x) * gamma [+ beta]) @ W, the norm as a decomposed Mul (RMSNorm's last op), Mul + Add
    (a decomposed LayerNorm's tail) or a fused LayerNormalization."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, k).astype(np.float32)
    gamma[: max(1, k // 32)] *= outlier  # trained norms carry the outliers in their scale
    inits = [init("gamma", gamma), init("w", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))]
    if layer_norm == "fused":
        inits.append(init("beta", rng.standard_normal(k).astype(np.float32)))
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln")]
    elif layer_norm == "mul-add":
        inits.append(init("beta", rng.standard_normal(k).astype(np.float32)))
        nodes = [helper.make_node("Mul", ["x", "gamma"], ["g"], name="scale"),
                 helper.make_node("Add", ["g", "beta"], ["h"], name="shift")]
    else:
        nodes = [helper.make_node("Mul", ["gamma", "x"], ["h"], name="scale")]
    nodes.append(helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"))
    outputs = [tensor("y", [1, "seq", n])]
    if residual:
        nodes.append(helper.make_node("Add", ["h", "h"], ["r"], name="residual"))
        outputs.append(tensor("r", [1, "seq", k]))
    return model(nodes, [tensor("x", [1, "seq", k])], outputs, inits)


def gated_mlp_model(k: int = 32, hidden: int = 48, *, seed: int = 0, outlier: float = 40.0) -> onnx.ModelProto:
    """y = (silu(x @ Wg) * (x @ Wu)) @ Wd with gate and up fused into one MatMul + Split, as fuse-qkv leaves them."""
    rng = np.random.default_rng(seed)
    fused = (rng.standard_normal((k, 2 * hidden)) / np.sqrt(k)).astype(np.float32)
    fused[:, hidden:hidden + 2] *= outlier  # up channels that make down_proj's input outliers
    down = (rng.standard_normal((hidden, k)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "gate_up"], ["gu"], name="gate_up"),
        helper.make_node("Split", ["gu", "sizes"], ["gate", "up"], axis=-1, name="split"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["act"], name="gated"),
        helper.make_node("MatMul", ["act", "down"], ["y"], name="down_proj"),
    ]
    inits = [init("gate_up", fused), init("down", down), init("sizes", np.array([hidden, hidden], np.int64))]
    return model(nodes, [tensor("x", [1, "seq", k])], [tensor("y", [1, "seq", k])], inits)


def _weights(made: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in made.graph.initializer}


def _assert_same_function(original: onnx.ModelProto, smoothed: onnx.ModelProto, x: np.ndarray) -> None:
    expected, got = run_model(original, {"x": x}), run_model(smoothed, {"x": x})
    for name, value in expected.items():
        scale = float(np.abs(value).max())
        np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=RTOL * scale, err_msg=name)


# -- structure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mul", "mul-add", "fused"])
def test_structure_norm_scale_absorbs_the_smoothing_and_no_op_is_added(kind: str) -> None:
    original = norm_model(layer_norm=kind)
    result = SmoothQuant()(original)
    assert result.modified and result.stats["activations_smoothed"] == 1
    assert ops(result.model) == ops(original)
    before, after = _weights(original), _weights(result.model)
    assert not np.array_equal(list(after.values())[0], before["gamma"])
    _assert_same_function(original, result.model, _outlier_input(16, 32, 1))


def test_structure_gated_mlp_folds_into_the_up_columns_only() -> None:
    original = gated_mlp_model()
    result = SmoothQuant()(original)
    assert result.stats["activations_smoothed"] == 1  # down_proj's input; x is a graph input (no producer)
    assert ops(result.model) == ops(original)
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    fused = next(v for k, v in after.items() if k.startswith("gate_up"))
    np.testing.assert_array_equal(fused[:, :48], _weights(original)["gate_up"][:, :48])  # gate untouched
    assert not np.array_equal(fused[:, 48:], _weights(original)["gate_up"][:, 48:])
    _assert_same_function(original, result.model, _outlier_input(16, 32, 2, strength=1.0))


def test_structure_scale_formula() -> None:
    """s = max|X|^a / max|W|^(1-a); channels with a zero peak keep 1."""
    scale = smoothing_scale(np.array([4.0, 0.0, 9.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(scale, [2.0, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_scale(np.array([8.0]), np.array([2.0]), 1.0), [8.0])


# -- numerics ----------------------------------------------------------------------------------

GAINS = {  # model, its options, the least SQNR gain in dB (measured: +8.3 and +4.9)
    "norm": (norm_model, {"k": 64, "outlier": 100.0}, 6.0),
    "gated-mlp": (gated_mlp_model, {"k": 64, "hidden": 256, "outlier": 100.0}, 3.0),
}


@pytest.mark.parametrize("case", list(GAINS))
def test_numerics_smoothing_lifts_per_tensor_int8_accuracy(case: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Static W8A8 (per-tensor activations) after smoothing beats it without where two channels run 100x
    the others; both calibrated on the same file (other draws than the test input)."""
    build, options, least = GAINS[case]
    original = build(**options)
    np.savez(tmp_path / "calibration.npz", x=np.stack([_outlier_input(64, 64, seed, 1.0) for seed in (5, 6)]))  # 2 samples
    calibration = str(tmp_path / "calibration.npz")
    plain = QuantizeInt8(scheme="w8a8-static", calibration=calibration)(original).model
    smoothed_float = SmoothQuant(calibration=calibration)(original).model
    smoothed = QuantizeInt8(scheme="w8a8-static", calibration=calibration)(smoothed_float).model
    x = _outlier_input(64, 64, 3, strength=1.0)
    reference = run_model(original, {"x": x})["y"]
    gain = sqnr_db(reference, run_model(smoothed, {"x": x})["y"]) - sqnr_db(reference, run_model(plain, {"x": x})["y"])
    assert gain >= least, gain


# -- refusals ----------------------------------------------------------------------------------

def test_refusal_activation_read_by_a_non_matmul_is_left_alone() -> None:
    result = SmoothQuant()(norm_model(residual=True))
    assert not result.modified and result.stats["groups"] == 0


def test_refusal_alpha_zero_and_options() -> None:
    assert not SmoothQuant(alpha=0.0)(norm_model()).modified
    with pytest.raises(PipelineError, match="alpha"):
        SmoothQuant.from_options({"alpha": "1.5"})
    with pytest.raises(PipelineError, match="tokenizer needs calibration"):
        SmoothQuant.from_options({"tokenizer": "tok"})


def test_idempotent_second_run_finds_the_channels_balanced() -> None:
    once = SmoothQuant()(norm_model()).model
    again = SmoothQuant()(once)
    assert not again.modified and again.stats["activations_smoothed"] == 0


# -- property ----------------------------------------------------------------------------------

@given(st.integers(4, 40), st.integers(1, 24), st.sampled_from(["mul", "mul-add", "fused"]),
       st.floats(0.1, 0.9), st.integers(0, 2**16))
def test_property_same_function_fewer_outliers(k: int, n: int, kind: str, alpha: float, seed: int) -> None:
    original = norm_model(k, n, layer_norm=kind, seed=seed)
    result = SmoothQuant(alpha=alpha)(original)
    onnx.checker.check_model(result.model, full_check=True)
    assert ops(result.model) == ops(original)
    x = _outlier_input(8, k, seed)
    _assert_same_function(original, result.model, x)
    # balanced: on the same calibration data the scales recompute to 1, so a second run changes nothing
    assert not SmoothQuant(alpha=alpha)(result.model).modified
