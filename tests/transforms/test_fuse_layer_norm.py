"""fuse-layer-norm: structure on the samples, numerics, refusals with their reasons, property over
every exporter spelling (passes.testing.exporter_patterns)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from onnx import TensorProto, helper

from passes.testing import assert_pass_sound
from passes.testing.exporter_patterns import PatternCase, layer_norm_cases
from passes.transforms.fuse_layer_norm import FuseLayerNorm
from tests.helpers import init, model, ops, tensor

# The fused op and the decomposition round differently (variance formula, one rounding of
# scale/bias in fp16): float32 rtol=1e-4, atol=1e-5; float16 (both normalise in float32, round
# to fp16 once or twice) rtol=1e-2, atol=4e-3, about 4 fp16 ulps at |y| ~ 2.
TOLERANCE = {TensorProto.FLOAT: (1e-4, 1e-5), TensorProto.FLOAT16: (1e-2, 4e-3)}
RTOL, ATOL = TOLERANCE[TensorProto.FLOAT]


def _layer_norm(
    *,
    shape: Sequence[int | str] = ("batch", 5, 8),
    axes: Sequence[int] = (-1,),
    var_axes: Sequence[int] | None = None,
    keepdims: int = 1,
    exponent: float = 2.0,
    eps_input: bool = False,
    scale: np.ndarray | None = None,
    opset: int = 17,
    mean_is_output: bool = False,
) -> onnx.ModelProto:
    """A LayerNorm (axes as attribute below opset 18, as input from 18) with knobs for the refusals."""
    hidden = list(shape[len(shape) - len(axes):])
    if scale is None:
        scale = np.linspace(0.5, 1.5, int(np.prod(hidden)), dtype=np.float32).reshape(hidden)
    inits = [init("two", np.float32(exponent)), init("scale", scale), init("bias", np.full(scale.shape[-1:], 0.25, np.float32))]

    def reduce(source: str, out: str, reduced: Sequence[int]) -> onnx.NodeProto:
        if opset < 18:
            return helper.make_node("ReduceMean", [source], [out], axes=list(reduced), keepdims=keepdims)
        inits.append(init(f"axes_{out}", np.int64(list(reduced))))
        return helper.make_node("ReduceMean", [source, f"axes_{out}"], [out], keepdims=keepdims)

    nodes = [
        reduce("x", "mean", axes),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        reduce("sq", "var", var_axes or axes),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["y"]),
    ]
    inputs = [tensor("x", shape)] + ([tensor("eps", [])] if eps_input else [])
    inits += [] if eps_input else [init("eps", np.float32(1e-5))]
    outputs = [tensor("y", shape)] + ([tensor("mean", [None] * len(shape))] if mean_is_output else [])
    return model(nodes, inputs, outputs, inits, opset=opset)


def _reasons(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.reason for r in result.refusals]


# -- structure ------------------------------------------------------------------------------------
def test_structure_hand_written_layer_norm_becomes_one_op() -> None:
    result = FuseLayerNorm()(_layer_norm())
    assert ops(result.model) == ["LayerNormalization"]
    node = result.model.graph.node[0]
    assert list(node.input) == ["x", "scale", "bias"] and list(node.output) == ["y"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"axis": -1, "epsilon": pytest.approx(1e-5), "stash_type": 1}
    assert result.stats == {"layer_norms_fused": 1, "LayerNormPattern": 1}


def test_structure_tiny_bert_torchscript_refuses_at_14_fuses_with_bump(sample_model) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-bert", idiom="torchscript")
    refused = FuseLayerNorm()(original)
    assert not refused.modified and len(refused.model.graph.node) == 249
    assert _reasons(refused) == ["LayerNormPattern: opset 14 has no LayerNormalization (needs 17)"] * 5
    bumped = FuseLayerNorm(bump_opset=True)(original)
    histogram = Counter(ops(bumped.model))
    assert histogram["LayerNormalization"] == 5
    assert histogram["ReduceMean"] == histogram["Pow"] == histogram["Sqrt"] == 0
    assert len(bumped.model.graph.node) == 249 - 5 * 10
    assert bumped.model.opset_import[0].version == 17 and bumped.stats["opset_raised_to"] == 17


def test_structure_tiny_bert_dynamo_fuses_at_opset_18(sample_model) -> None:  # type: ignore[no-untyped-def]
    result = FuseLayerNorm()(sample_model("tiny-bert", idiom="dynamo"))
    histogram = Counter(ops(result.model))
    assert result.stats["layer_norms_fused"] == 5 and histogram["LayerNormalization"] == 5
    assert histogram["ReduceMean"] == histogram["Pow"] == histogram["Sqrt"] == 0
    assert len(result.model.graph.node) == 146 - 5 * 8 and result.model.opset_import[0].version == 18


def test_structure_fp16_cast_idiom_fuses_on_the_fp16_input_with_stash_type() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x32", "axes"], ["mean"]),
        helper.make_node("Sub", ["x32", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
        helper.make_node("Add", ["eps", "var"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["inv", "d"], ["normed"]),
        helper.make_node("Cast", ["normed"], ["normed16"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["w", "normed16"], ["y"]),
    ]
    fp16 = TensorProto.FLOAT16
    original = model(nodes, [tensor("x", [2, 3, 16], fp16)], [tensor("y", [2, 3, 16], fp16)],
                     [init("axes", np.int64([-1])), init("eps", np.float32(1e-6)),
                      init("w", np.linspace(0.5, 1.5, 16, dtype=np.float16))], opset=18)
    result = assert_pass_sound(FuseLayerNorm(), original, rtol=1e-2, atol=4e-3)
    assert ops(result.model) == ["LayerNormalization"]
    assert list(result.model.graph.node[0].input)[:2] == ["x", "w"]


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("idiom", "bump"), [("torchscript", True), ("dynamo", False)])
def test_numerics_samples(sample_model, idiom: str, bump: bool) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-bert", idiom=idiom)
    result = assert_pass_sound(FuseLayerNorm(bump_opset=bump), original, rtol=RTOL, atol=ATOL,
                               input_shapes={"input_ids": [2, 9], "attention_mask": [2, 9]})
    assert result.stats["layer_norms_fused"] == 5


def test_numerics_multi_axis_and_broadcast_scale() -> None:
    """Normalising the last two axes with a [1, 5, 8] scale: the fused op gets a [5, 8] constant."""
    scale = np.linspace(0.5, 1.5, 40, dtype=np.float32).reshape(1, 5, 8)
    original = _layer_norm(shape=("batch", 5, 8), axes=(-2, 2), scale=scale, opset=18)
    result = assert_pass_sound(FuseLayerNorm(), original, rtol=RTOL, atol=ATOL)
    assert ops(result.model) == ["LayerNormalization"]
    assert helper.get_attribute_value(result.model.graph.node[0].attribute[0]) == -2


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (dict(shape=(4, 4), keepdims=0), "keepdims=0"),
        (dict(shape=(2, 3, 4), axes=(1,)), "reduction axes [1] are not the trailing axes"),
        (dict(shape=(2, 3, 4), axes=(-1,), var_axes=(1, 2), scale=np.ones(4, np.float32)),
         "the ReduceMeans reduce different axes ([2] and [1, 2])"),
        (dict(eps_input=True), "epsilon is not a constant"),
        (dict(exponent=3.0), "Pow exponent is 3, not 2"),
        (dict(scale=np.ones((5, 8), np.float32)), "scale of shape [5, 8] broadcasts over leading axes"),
        (dict(shape=("batch", "hidden"), scale=np.ones(1, np.float32)), "normalised dims ['hidden'] are not static"),
        (dict(opset=16), "opset 16 has no LayerNormalization (needs 17)"),
        (dict(mean_is_output=True), "intermediate 'mean' is a graph output"),
    ],
)
def test_refusal_reasons(case: dict[str, object], reason: str) -> None:
    original = _layer_norm(**case)  # type: ignore[arg-type]
    result = FuseLayerNorm()(original)
    assert not result.modified and ops(result.model) == ops(original)
    assert _reasons(result) == [f"LayerNormPattern: {reason}"]


def test_refusal_intermediate_used_elsewhere() -> None:
    original = _layer_norm()
    original.graph.node.append(helper.make_node("Neg", ["std"], ["other"]))
    original.graph.output.append(tensor("other", ["batch", 5, 1]))
    result = FuseLayerNorm()(original)
    assert _reasons(result) == ["LayerNormPattern: intermediate 'std' is used outside the pattern"]


def test_refusal_subs_with_different_means_and_mixed_precision() -> None:
    two_means = _layer_norm()
    two_means.graph.node.insert(1, helper.make_node("ReduceMean", ["x"], ["mean2"], axes=[-1]))
    two_means.graph.node.insert(3, helper.make_node("Sub", ["x", "mean2"], ["d2"]))
    two_means.graph.node[4].input[0] = "d2"  # Pow squares the second Sub
    assert _reasons(FuseLayerNorm()(two_means)) == ["LayerNormPattern: the two Subs subtract different means"]


def _norm_then(after: list[onnx.NodeProto], x_type: int, y_type: int, weight: np.ndarray) -> onnx.ModelProto:
    """ReduceMean .. Div on `x`, then the `after` nodes from `normed` to `y`."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["normed"]),
        *after,
    ]
    eps = init("eps", np.asarray(1e-5, weight.dtype if x_type == y_type else np.float32))
    return model(nodes, [tensor("x", [2, 8], x_type)], [tensor("y", [2, 8], y_type)], [eps, init("w", weight)])


def test_refusal_mixed_precision() -> None:
    """A Cast to fp16 with no Cast to float32 before it stays, with the scale after it: only the
    float32 core fuses. A norm computed in fp16 is refused (the fused op would compute in float32)."""
    w16, fp16 = np.ones(8, np.float16), TensorProto.FLOAT16
    cast_out_only = _norm_then([helper.make_node("Cast", ["normed"], ["n16"], to=fp16),
                                helper.make_node("Mul", ["n16", "w"], ["y"])], TensorProto.FLOAT, fp16, w16)
    result = assert_pass_sound(FuseLayerNorm(), cast_out_only, rtol=1e-2, atol=4e-3)
    assert ops(result.model) == ["LayerNormalization", "Cast", "Mul"]
    scale = next(t for t in result.model.graph.initializer if t.name == result.model.graph.node[0].input[1])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(scale), np.ones(8, np.float32))  # no scale: ones
    in_fp16 = _norm_then([helper.make_node("Mul", ["normed", "w"], ["y"])], fp16, fp16, w16)
    assert _reasons(FuseLayerNorm()(in_fp16)) == [
        "LayerNormPattern: the normalisation is computed in float16, not float32"]


def test_refusal_bump_blocked_by_an_op_whose_meaning_changed() -> None:
    original = _layer_norm(opset=14)
    original.graph.node.append(helper.make_node("BatchNormalization", ["y", "bn", "bn", "bn", "bn"], ["z"]))
    original.graph.initializer.append(init("bn", np.ones(5, np.float32)))
    original.graph.output.append(tensor("z", ["batch", 5, 8]))
    result = FuseLayerNorm(bump_opset=True)(original)
    assert not result.modified and result.model.opset_import[0].version == 14
    assert _reasons(result) == ["LayerNormPattern: opset 14 has no LayerNormalization (needs 17); cannot raise it: "
                                "BatchNormalization changed between opset 14 and 17"]


# -- property -------------------------------------------------------------------------------------
@given(layer_norm_cases())
def test_property_every_exporter_spelling_fuses(case: PatternCase) -> None:
    rtol, atol = TOLERANCE[case.dtype]
    result = assert_pass_sound(FuseLayerNorm(bump_opset=True), case.model, rtol=rtol, atol=atol)
    assert result.stats["layer_norms_fused"] == case.instances, (_reasons(result), case.variants)
    assert not {"ReduceMean", "Pow", "Sqrt"} & set(ops(result.model))
    plain = FuseLayerNorm()(case.model)
    if case.opset >= 17:
        assert plain.stats["layer_norms_fused"] == case.instances
    else:
        reason = f"LayerNormPattern: opset {case.opset} has no LayerNormalization (needs 17)"
        assert _reasons(plain) == [reason] * case.instances


def test_strategy_covers_every_spelling() -> None:
    seen: set[str] = set()

    @settings(max_examples=80, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(layer_norm_cases())
    def collect(case: PatternCase) -> None:
        seen.update(case.variants)
        seen.add(f"opset>=18={case.opset >= 18}")
        seen.add(f"dtype={case.dtype}")

    collect()
    expected = {"square=pow", "square=pow-int", "square=mul", "division=div", "division=reciprocal",
                "division=div-one", "two_subs=True", "two_subs=False", "casts", "param=input",
                "opset>=18=True", "opset>=18=False", f"dtype={TensorProto.FLOAT}", f"dtype={TensorProto.FLOAT16}"}
    assert expected <= seen, expected - seen
