"""fuse-gelu: structure (every association of the three factors, both forms, the samples),
numerics, refusals with their reasons, property over every exporter spelling."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from onnx import TensorProto, helper

from passes.testing import assert_pass_sound
from passes.testing.exporter_patterns import PatternCase, gelu_cases
from passes.transforms.fuse_gelu import FuseGelu
from passes.transforms.fuse_layer_norm import FuseLayerNorm
from tests.helpers import init, model, ops, tensor

# Gelu vs its decomposition differ by float rounding: float32 rtol=1e-4, atol=1e-5; float16
# (the decomposition rounds after every op, 1 + erf cancels near -3) rtol=1e-2, atol=4e-3.
TOLERANCE = {TensorProto.FLOAT: (1e-4, 1e-5), TensorProto.FLOAT16: (1e-2, 4e-3)}
RTOL, ATOL = TOLERANCE[TensorProto.FLOAT]
SAMPLE_SHAPES = {"input_ids": [2, 9], "attention_mask": [2, 9]}

# (first Mul inputs, second Mul inputs): x * 0.5 * p in every association the exporters emit.
PRODUCTS = {
    "x*p*0.5 (torch.nn.GELU)": (["x", "p"], ["m", "half"]),
    "0.5*x*p": (["half", "x"], ["m", "p"]),
    "x*(0.5*p)": (["half", "p"], ["x", "m"]),
    "(x*0.5)*p": (["x", "half"], ["p", "m"]),
}


def _gelu(product: str = "x*p*0.5 (torch.nn.GELU)", *, opset: int = 20, half: float = 0.5, root: float = math.sqrt(2),
          erf_by_mul: bool = False, extra_output: str | None = None) -> onnx.ModelProto:
    first, second = PRODUCTS[product]
    scaled = (helper.make_node("Mul", ["inv_sqrt2", "x"], ["s"]) if erf_by_mul
              else helper.make_node("Div", ["x", "sqrt2"], ["s"]))
    nodes = [
        scaled,
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["one", "e"], ["p"]),
        helper.make_node("Mul", first, ["m"]),
        helper.make_node("Mul", second, ["y"]),
    ]
    inits = [init("sqrt2", np.float32(root)), init("inv_sqrt2", np.float32(1 / root)),
             init("one", np.float32(1.0)), init("half", np.float32(half))]
    outputs = [tensor("y", ["batch", 16])] + ([tensor(extra_output, ["batch", 16])] if extra_output else [])
    return model(nodes, [tensor("x", ["batch", 16])], outputs, inits, opset=opset)


def _gelu_tanh(cube: str) -> onnx.ModelProto:
    cube_nodes = {
        "pow": [helper.make_node("Pow", ["x", "three"], ["c"])],
        "x*(x*x)": [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Mul", ["x", "sq"], ["c"])],
    }[cube]
    nodes = [
        *cube_nodes,
        helper.make_node("Mul", ["k", "c"], ["kc"]),
        helper.make_node("Add", ["x", "kc"], ["poly"]),
        helper.make_node("Mul", ["root", "poly"], ["arg"]),
        helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["one", "t"], ["p"]),
        helper.make_node("Mul", ["half", "x"], ["m"]),
        helper.make_node("Mul", ["m", "p"], ["y"]),
    ]
    inits = [init("three", np.float32(3)), init("k", np.float32(0.044715)),
             init("root", np.float32(math.sqrt(2 / math.pi))), init("one", np.float32(1.0)), init("half", np.float32(0.5))]
    return model(nodes, [tensor("x", ["batch", 16])], [tensor("y", ["batch", 16])], inits, opset=20)


def _reasons(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.reason for r in result.refusals]


# -- structure ------------------------------------------------------------------------------------
@pytest.mark.parametrize("product", list(PRODUCTS))
@pytest.mark.parametrize("erf_by_mul", [False, True])
def test_structure_every_association_fuses(product: str, erf_by_mul: bool) -> None:
    result = assert_pass_sound(FuseGelu(), _gelu(product, erf_by_mul=erf_by_mul), rtol=RTOL, atol=ATOL)
    assert ops(result.model) == ["Gelu"]
    node = result.model.graph.node[0]
    assert list(node.input) == ["x"] and list(node.output) == ["y"]
    assert helper.get_attribute_value(node.attribute[0]) == b"none"


@pytest.mark.parametrize("cube", ["pow", "x*(x*x)"])
def test_structure_tanh_approximation(cube: str) -> None:
    result = assert_pass_sound(FuseGelu(), _gelu_tanh(cube), rtol=RTOL, atol=ATOL)
    assert ops(result.model) == ["Gelu"]
    assert helper.get_attribute_value(result.model.graph.node[0].attribute[0]) == b"tanh"
    assert result.stats == {"gelus_fused": 1, "GeluTanhPattern": 1}


def test_structure_tiny_bert_dynamo_with_bump(sample_model) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-bert", idiom="dynamo")
    refused = FuseGelu()(original)
    assert not refused.modified and _reasons(refused) == ["GeluErfPattern: opset 18 has no Gelu (needs 20)"] * 2
    result = FuseGelu(bump_opset=True)(original)
    histogram = Counter(ops(result.model))
    assert histogram["Gelu"] == 2 and histogram["Erf"] == 0 and result.model.opset_import[0].version == 20
    assert len(result.model.graph.node) == 146 - 2 * 4


def test_structure_tiny_bert_torchscript_bumps_after_layer_norm(sample_model) -> None:  # type: ignore[no-untyped-def]
    """At opset 14 the decomposed LayerNorms' ReduceMean (axes attribute) blocks opset 20; once
    fuse-layer-norm has removed them, the bump goes through."""
    original = sample_model("tiny-bert", idiom="torchscript")
    blocked = FuseGelu(bump_opset=True)(original)
    reason = "opset 14 has no Gelu (needs 20); cannot raise it: ReduceMean changed between opset 14 and 20"
    assert not blocked.modified and _reasons(blocked) == [f"GeluErfPattern: {reason}"] * 2
    normed = FuseLayerNorm(bump_opset=True)(original).model
    result = assert_pass_sound(FuseGelu(bump_opset=True), normed, rtol=RTOL, atol=ATOL, input_shapes=SAMPLE_SHAPES)
    histogram = Counter(ops(result.model))
    assert histogram["Gelu"] == 2 and histogram["Erf"] == 0 and len(result.model.graph.node) == 199 - 2 * 7


@pytest.mark.parametrize(("node", "blocker"), [
    (helper.make_node("Split", ["y"], ["a", "b"], axis=1), "Split"),  # equal halves: opset 18 needs num_outputs
    (helper.make_node("Split", ["y", "halves"], ["a", "b"], axis=1), None),  # explicit sizes mean the same
    (helper.make_node("ReduceMax", ["y"], ["a"], axes=[1]), "ReduceMax"),  # axes moved to an input
    (helper.make_node("ReduceMax", ["y"], ["a"]), None),  # no axes: all of them, at 17 and at 20
])
def test_bump_checks_every_node(node: onnx.NodeProto, blocker: str | None) -> None:
    original = _gelu(opset=17)
    original.graph.node.append(node)
    original.graph.initializer.append(init("halves", np.int64([8, 8])))
    original.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output)
    result = FuseGelu(bump_opset=True)(original)
    if blocker is None:
        assert result.stats == {"gelus_fused": 1, "GeluErfPattern": 1, "opset_raised_to": 20}
        assert_pass_sound(FuseGelu(bump_opset=True), original, rtol=RTOL, atol=ATOL)
    else:
        reason = f"opset 17 has no Gelu (needs 20); cannot raise it: {blocker} changed between opset 17 and 20"
        assert not result.modified and _reasons(result) == [f"GeluErfPattern: {reason}"]


# -- numerics -------------------------------------------------------------------------------------
def test_numerics_tiny_bert_dynamo(sample_model) -> None:  # type: ignore[no-untyped-def]
    original = sample_model("tiny-bert", idiom="dynamo")
    result = assert_pass_sound(FuseGelu(bump_opset=True), original, rtol=RTOL, atol=ATOL, input_shapes=SAMPLE_SHAPES)
    assert result.stats["gelus_fused"] == 2


# -- refusals -------------------------------------------------------------------------------------
def test_refusal_low_opset() -> None:
    result = FuseGelu()(_gelu(opset=19))
    assert not result.modified and _reasons(result) == ["GeluErfPattern: opset 19 has no Gelu (needs 20)"]


def test_refusal_intermediate_used_elsewhere() -> None:
    result = FuseGelu()(_gelu(extra_output="e"))
    assert not result.modified and _reasons(result) == ["GeluErfPattern: intermediate 'e' is a graph output"]


@pytest.mark.parametrize("case", [dict(half=0.25), dict(root=2.0), dict(root=2.0, erf_by_mul=True),
                                  dict(root=1.41421), dict(half=0.5001)])
def test_not_a_gelu_when_a_constant_is_off(case: dict[str, object]) -> None:
    result = FuseGelu()(_gelu(**case))  # type: ignore[arg-type]
    assert not result.modified and not result.refusals


# -- property -------------------------------------------------------------------------------------
@given(gelu_cases())
def test_property_every_exporter_spelling_fuses(case: PatternCase) -> None:
    rtol, atol = TOLERANCE[case.dtype]
    result = assert_pass_sound(FuseGelu(bump_opset=True), case.model, rtol=rtol, atol=atol)
    assert result.stats["gelus_fused"] == case.instances, (_reasons(result), case.variants)
    assert set(ops(result.model)) == {"Gelu"}
    plain = FuseGelu()(case.model)
    if case.opset >= 20:
        assert plain.stats["gelus_fused"] == case.instances
    else:
        assert len(plain.refusals) == case.instances and not plain.modified


def test_strategy_covers_every_spelling() -> None:
    seen: set[str] = set()

    @settings(max_examples=80, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(gelu_cases())
    def collect(case: PatternCase) -> None:
        seen.update(case.variants)
        seen.add(f"dtype={case.dtype}")

    collect()
    expected = {"erf", "tanh", "cube=pow", "cube=x*(x*x)", "cube=(x*x)*x", "product=(x*0.5)*p",
                "product=(x*p)*0.5", "product=(0.5*p)*x", f"dtype={TensorProto.FLOAT}", f"dtype={TensorProto.FLOAT16}"}
    assert expected <= seen, expected - seen
