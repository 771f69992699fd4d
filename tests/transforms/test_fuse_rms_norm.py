"""fuse-rms-norm: structure on the samples (opset 23 needs a bump), numerics (also through the
onnx.reference fallback), refusals with their reasons, property over every exporter spelling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.reference
import onnxruntime
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from onnx import TensorProto, helper

from passes.testing import EquivalenceError, assert_equivalent, assert_pass_sound
from passes.testing.exporter_patterns import PatternCase, rms_norm_cases
from passes.transforms.fuse_rms_norm import FuseRmsNorm
from tests.helpers import init, model, ops, tensor

# Fused vs decomposed differ by float rounding: float32 rtol=1e-4, atol=1e-5; float16 (both
# normalise in float32, then round to fp16 once or twice) rtol=1e-2, atol=4e-3.
TOLERANCE = {TensorProto.FLOAT: (1e-4, 1e-5), TensorProto.FLOAT16: (1e-2, 4e-3)}
RTOL, ATOL = TOLERANCE[TensorProto.FLOAT]
SAMPLE_SHAPES = {"input_ids": [2, 9]}


def _rms_norm(*, opset: int = 23, exponent: float = 2.0, scale_shape: tuple[int, ...] = (8,),
              axes: tuple[int, ...] = (-1,), shape: tuple[int | str, ...] = ("batch", 5, 8), keepdims: int = 1,
              eps_input: bool = False, centred: bool = False) -> onnx.ModelProto:
    """`w * (x * Reciprocal(Sqrt(mean(x^2) + eps)))` with axes as input (opset >= 18) or attribute;
    `centred` normalises `x - mean(x)` instead (a LayerNorm without its affine part)."""

    def reduce(source: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [source, "axes"], [out], keepdims=keepdims)
        return helper.make_node("ReduceMean", [source], [out], axes=list(axes), keepdims=keepdims)

    x = "xc" if centred else "x"
    nodes = [reduce("x", "mean"), helper.make_node("Sub", ["x", "mean"], ["xc"])] if centred else []
    nodes += [
        helper.make_node("Pow", [x, "two"], ["sq"]),
        reduce("sq", "var"),
        helper.make_node("Add", ["eps", "var"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", [x, "inv"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
    ]
    inits = [init("two", np.float32(exponent)),
             init("w", np.linspace(0.5, 1.5, int(np.prod(scale_shape)), dtype=np.float32).reshape(scale_shape))]
    inits += [init("axes", np.int64(list(axes)))] if opset >= 18 else []
    inits += [] if eps_input else [init("eps", np.float32(1e-6))]
    inputs = [tensor("x", shape)] + ([tensor("eps", [1])] if eps_input else [])
    return model(nodes, inputs, [tensor("y", shape)], inits, opset=opset)


def _reasons(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.reason for r in result.refusals]


# -- structure ------------------------------------------------------------------------------------
def test_structure_hand_written_rms_norm_becomes_one_op() -> None:
    result = FuseRmsNorm()(_rms_norm())
    assert ops(result.model) == ["RMSNormalization"]
    node = result.model.graph.node[0]
    assert list(node.input) == ["x", "w"] and list(node.output) == ["y"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"axis": -1, "epsilon": pytest.approx(1e-6), "stash_type": 1}


@pytest.mark.parametrize(("idiom", "opset", "before", "per_norm"),
                         [("torchscript", 17, 428, 9), ("dynamo", 18, 205, 8)])
def test_structure_tiny_llama_needs_opset_23(  # type: ignore[no-untyped-def]
    sample_model, idiom: str, opset: int, before: int, per_norm: int
) -> None:
    original = sample_model("tiny-llama", idiom=idiom)
    refused = FuseRmsNorm()(original)
    assert not refused.modified and len(refused.model.graph.node) == before
    assert _reasons(refused) == [f"RmsNormPattern: opset {opset} has no RMSNormalization (needs 23)"] * 5
    bumped = FuseRmsNorm(bump_opset=True)(original)
    histogram = Counter(ops(bumped.model))
    assert histogram["RMSNormalization"] == 5 and histogram["ReduceMean"] == histogram["Pow"] == 0
    assert histogram["Sqrt"] == histogram["Reciprocal"] == 0 and histogram["Cast"] == 0
    assert len(bumped.model.graph.node) == before - 5 * per_norm
    assert bumped.model.opset_import[0].version == 23 and bumped.stats["opset_raised_to"] == 23


def test_structure_layer_norm_is_left_to_fuse_layer_norm() -> None:
    result = FuseRmsNorm()(_rms_norm(centred=True))
    assert not result.modified and not result.refusals


@pytest.mark.parametrize(("x_type", "back", "expected"), [
    (TensorProto.FLOAT16, TensorProto.FLOAT16, ["RMSNormalization"]),  # fp16 idiom: stash_type=1 on x
    (TensorProto.FLOAT, TensorProto.FLOAT, ["RMSNormalization"]),  # dynamo fp32: both Casts are identities
    (TensorProto.FLOAT16, TensorProto.FLOAT, ["Cast", "RMSNormalization"]),  # normalise the Cast output
    (TensorProto.DOUBLE, TensorProto.DOUBLE, ["Cast", "RMSNormalization", "Cast", "Mul"]),  # not stash_type=1
])
def test_structure_cast_pairs(x_type: int, back: int, expected: list[str]) -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x32", "x32"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["x32", "std"], ["normed"]),
        helper.make_node("Cast", ["normed"], ["back"], to=back),
        helper.make_node("Mul", ["back", "w"], ["y"]),
    ]
    weight = np.linspace(0.5, 1.5, 16).astype(helper.tensor_dtype_to_np_dtype(back))
    original = model(nodes, [tensor("x", [3, 16], x_type)], [tensor("y", [3, 16], back)],
                     [init("axes", np.int64([1])), init("eps", np.float32(1e-6)), init("w", weight)], opset=23)
    rtol, atol = TOLERANCE[TensorProto.FLOAT16 if TensorProto.FLOAT16 in (x_type, back) else TensorProto.FLOAT]
    result = assert_pass_sound(FuseRmsNorm(), original, rtol=rtol, atol=atol)
    assert ops(result.model) == expected


def test_structure_torchscript_reuses_the_no_op_cast_as_the_residual() -> None:
    """TorchScript traces `x.to(float32)` on a float32 x as x itself, so the residual Add reads the
    Cast's output: the Cast stays, the norm fuses on it (as in real llama/qwen2 TorchScript exports)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Pow", ["x32", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["one", "std"], ["inv"]),
        helper.make_node("Mul", ["x32", "inv"], ["normed"]),
        helper.make_node("Cast", ["normed"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["w", "back"], ["h"]),
        helper.make_node("Add", ["x32", "h"], ["y"]),
    ]
    inits = [init("two", np.float32(2)), init("eps", np.float32(1e-6)), init("one", np.float32(1)),
             init("w", np.linspace(0.5, 1.5, 8, dtype=np.float32)), init("axes", np.int64([-1]))]
    original = model(nodes, [tensor("x", ["batch", 8])], [tensor("y", ["batch", 8])], inits, opset=23)
    result = assert_pass_sound(FuseRmsNorm(), original, rtol=RTOL, atol=ATOL)
    assert ops(result.model) == ["Cast", "RMSNormalization", "Add"]
    assert list(result.model.graph.node[1].input) == ["x32", "w"]


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
def test_numerics_samples_with_bump(sample_model, idiom: str) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-llama", idiom=idiom)
    result = assert_pass_sound(FuseRmsNorm(bump_opset=True), original, rtol=RTOL, atol=ATOL, input_shapes=SAMPLE_SHAPES)
    assert result.stats["rms_norms_fused"] == 5


def test_numerics_reference_fallback_really_compares(monkeypatch: pytest.MonkeyPatch) -> None:
    """With onnxruntime unable to load anything, assert_equivalent runs onnx.reference on both
    models: the fused model agrees, and one with a wrong epsilon is caught."""
    original = _rms_norm()
    fused = FuseRmsNorm()(original).model
    wrong = onnx.ModelProto()
    wrong.CopyFrom(fused)
    next(a for a in wrong.graph.node[0].attribute if a.name == "epsilon").f = 0.5
    runs: list[str] = []

    def no_session(*args: object, **kwargs: object) -> None:
        raise RuntimeError("onnxruntime disabled for this test")

    class CountingEvaluator(onnx.reference.ReferenceEvaluator):
        def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            runs.append("run")
            return super().run(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    monkeypatch.setattr(onnx.reference, "ReferenceEvaluator", CountingEvaluator)
    comparison = assert_equivalent(original, fused, rtol=RTOL, atol=ATOL)
    assert len(runs) == 2 and comparison.ok and comparison.outputs[0].shape == (2, 5, 8)
    with pytest.raises(EquivalenceError, match="max abs error"):  # numbers really were compared
        assert_equivalent(original, wrong, rtol=RTOL, atol=ATOL)
    assert len(runs) == 4


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (dict(exponent=3.0), "Pow exponent is 3, not 2"),
        (dict(axes=(1,), scale_shape=(5, 1)), "reduction axes [1] are not the trailing axes"),
        (dict(scale_shape=(5, 8)), "scale of shape [5, 8] broadcasts over leading axes"),
        (dict(opset=22), "opset 22 has no RMSNormalization (needs 23)"),
        (dict(opset=17), "opset 17 has no RMSNormalization (needs 23)"),
        (dict(shape=(4, 4), scale_shape=(4,), keepdims=0), "keepdims=0"),
        (dict(eps_input=True), "epsilon is not a constant"),
    ],
)
def test_refusal_reasons(case: dict[str, object], reason: str) -> None:
    result = FuseRmsNorm()(_rms_norm(**case))  # type: ignore[arg-type]
    assert not result.modified and _reasons(result) == [f"RmsNormPattern: {reason}"]


def test_refusal_bump_blocked_by_reduce_mean_left_outside() -> None:
    original = _rms_norm(opset=17)
    original.graph.node.append(helper.make_node("ReduceMean", ["y"], ["pooled"], axes=[1]))
    original.graph.output.append(tensor("pooled", ["batch", 1, 8]))
    result = FuseRmsNorm(bump_opset=True)(original)
    assert not result.modified and result.model.opset_import[0].version == 17
    assert _reasons(result) == ["RmsNormPattern: opset 17 has no RMSNormalization (needs 23); cannot raise it: "
                                "ReduceMean changed between opset 17 and 23"]


# -- property -------------------------------------------------------------------------------------
@given(rms_norm_cases())
def test_property_every_exporter_spelling_fuses(case: PatternCase) -> None:
    rtol, atol = TOLERANCE[case.dtype]
    result = assert_pass_sound(FuseRmsNorm(bump_opset=True), case.model, rtol=rtol, atol=atol)
    assert result.stats["rms_norms_fused"] == case.instances, (_reasons(result), case.variants)
    assert not {"ReduceMean", "Pow", "Sqrt", "Cast"} & set(ops(result.model))
    plain = FuseRmsNorm()(case.model)
    if case.opset >= 23:
        assert plain.stats["rms_norms_fused"] == case.instances
    else:
        reason = f"RmsNormPattern: opset {case.opset} has no RMSNormalization (needs 23)"
        assert _reasons(plain) == [reason] * case.instances


def test_strategy_covers_every_spelling() -> None:
    seen: set[str] = set()

    @settings(max_examples=80, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(rms_norm_cases())
    def collect(case: PatternCase) -> None:
        seen.update(case.variants)
        seen.update({f"opset>=18={case.opset >= 18}", f"dtype={case.dtype}"})

    collect()
    expected = {"square=pow", "square=pow-int", "square=mul", "division=div", "division=reciprocal",
                "division=div-one", "casts", "param=input", "opset>=18=True", "opset>=18=False",
                f"dtype={TensorProto.FLOAT}", f"dtype={TensorProto.FLOAT16}"}
    assert expected <= seen, expected - seen
