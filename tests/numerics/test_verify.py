"""The numeric oracle itself: comparisons, seeded feeds, the onnx.reference fallback."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.testing import EquivalenceError, assert_equivalent
from passes.numerics.verify import compare_outputs, input_dims, random_feeds, run_model
from tests.helpers import init, model, tensor


def test_float_comparison_uses_the_stated_tolerance_and_matches_nans() -> None:
    ref = {"y": np.array([1.0, np.nan, 3.0], np.float32)}
    close = {"y": np.array([1.00001, np.nan, 3.0], np.float32)}
    assert compare_outputs(ref, close, rtol=1e-4, atol=0).ok
    assert not compare_outputs(ref, close, rtol=1e-7, atol=0).ok
    assert not compare_outputs(ref, {"y": np.array([1.0, 2.0, 3.0], np.float32)}, rtol=1, atol=1).ok


def test_integers_compare_exactly_and_types_must_match() -> None:
    ref = {"y": np.array([1, 2], np.int64)}
    assert not compare_outputs(ref, {"y": np.array([1, 3], np.int64)}, rtol=1, atol=1).ok
    mismatch = compare_outputs(ref, {"y": np.array([1, 2], np.int32)}).outputs[0]
    assert not mismatch.ok and mismatch.problem == "expected int64[2], got int32[2]"
    assert compare_outputs(ref, {}).outputs[0].problem == "missing"


def test_feeds_are_seeded_and_respect_symbols_and_tables() -> None:
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Add", ["e", "x"], ["y"])]
    m = model(
        nodes,
        [tensor("ids", ["batch", "seq"], TensorProto.INT64), tensor("x", ["batch", "seq", 4])],
        [tensor("y", ["batch", "seq", 4])],
        [init("table", np.zeros((7, 4), np.float32))],
    )
    a, b = random_feeds(m, 3, input_shapes={"ids": (2, 5)}), random_feeds(m, 3, input_shapes={"ids": (2, 5)})
    assert a["x"].shape == (2, 5, 4) and a["ids"].shape == (2, 5)  # x shares batch/seq with ids
    assert a["ids"].max() < 7 and a["ids"].min() >= 0  # ids index a 7-row table
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], random_feeds(m, 4, input_shapes={"ids": (2, 5)})["x"])
    assert input_dims(m) == {"ids": (2, 2), "x": (2, 2, 4)}


def test_models_onnxruntime_cannot_load_run_through_onnx_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("NOT_IMPLEMENTED: Could not find an implementation for Relu(99)")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    m = model(nodes, [tensor("x", [3])], [tensor("y", [3])], opset=onnx.defs.onnx_opset_version())
    out = run_model(m, {"x": np.array([-1.0, 0.0, 2.0], np.float32)})
    np.testing.assert_array_equal(out["y"], [0.0, 0.0, 2.0])


def test_assert_equivalent_raises_with_the_worst_errors() -> None:
    relu = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [8])], [tensor("y", [8])])
    neg = model([helper.make_node("Neg", ["x"], ["y"])], [tensor("x", [8])], [tensor("y", [8])])
    assert assert_equivalent(relu, relu, rtol=0, atol=0).ok
    with pytest.raises(EquivalenceError, match=r"y: max abs error"):
        assert_equivalent(relu, neg, rtol=1e-5, atol=1e-5)


def test_scaled_atol_grows_with_the_output_magnitude() -> None:
    """Logits of ~20 after 30 layers carry ~1e-4 of fp32 rounding even near zero: `scale_atol` multiplies
    atol by max(1, max |reference|); without it the same difference fails."""
    from passes.numerics.verify import compare_outputs

    reference = {"logits": np.array([20.0, 0.0, -3.0], np.float32)}
    candidate = {"logits": np.array([20.0, 4e-4, -3.0], np.float32)}
    assert not compare_outputs(reference, candidate, rtol=1e-4, atol=1e-4).ok
    assert compare_outputs(reference, candidate, rtol=1e-4, atol=1e-4, scale_atol=True).ok
    assert not compare_outputs(reference, {"logits": np.array([20.0, 3e-3, -3.0], np.float32)},
                               rtol=1e-4, atol=1e-4, scale_atol=True).ok
    small = {"p": np.array([0.5, 0.0], np.float32)}  # below 1: atol is not shrunk
    assert compare_outputs(small, {"p": np.array([0.5, 9e-5], np.float32)}, rtol=1e-4, atol=1e-4, scale_atol=True).ok


def _matmul_chain(rng: np.random.Generator) -> onnx.ModelProto:
    """x @ W1 -> Relu -> @ W2 (+ b): float weights past INLINE_BYTES, which onnxruntime prepacks."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    weights = [init("w1", rng.standard_normal((96, 160)).astype(np.float32)),
               init("w2", rng.standard_normal((160, 48)).astype(np.float32)), init("b", np.ones(48, np.float32))]
    return model(nodes, [tensor("x", [3, 96])], [tensor("y", [3, 48])], weights)


def test_runner_hands_weights_over_in_place_and_computes_what_a_serialized_session_does() -> None:
    import onnxruntime as ort

    from passes.numerics.verify import ModelRunner, split_weights

    m = _matmul_chain(np.random.default_rng(0))
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    serialized = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = serialized.run(None, feeds)[0]
    assert np.array_equal(ModelRunner(m)(feeds)["y"], expected)  # bit for bit: prepacking kept
    hollow, arrays = split_weights(m)
    assert set(arrays) == {"w1", "w2"} and not any(t.raw_data for t in hollow.graph.initializer if t.name in arrays)
    runner = ModelRunner(hollow, weights=arrays, outputs=["h"])
    got = runner(feeds)
    assert np.array_equal(got["y"], expected)
    assert np.array_equal(got["h"], feeds["x"] @ numpy_helper.to_array(m.graph.initializer[0]))


def test_a_hollow_pipeline_run_keeps_the_graphs_arrays_and_fills_back_to_the_whole_run() -> None:
    from passes.infra.manager import PassManager
    from passes.numerics.verify import filled_model, split_weights

    m = _matmul_chain(np.random.default_rng(2))
    whole = PassManager("cleanup").run(m).model
    hollow, arrays = split_weights(m)
    result = PassManager("cleanup").run(hollow, weights=arrays, hollow=True)
    assert result.weights is not None and all(result.weights[name] is arrays[name] for name in arrays)
    filled = filled_model(result.model, result.weights)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in filled.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in whole.graph.initializer}
