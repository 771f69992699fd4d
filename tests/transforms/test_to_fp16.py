"""to-fp16: structure (dtypes, islands, Casts) on small graphs and the samples, numerics against the
float32 original, refusals with their reasons, and a property over generated float graphs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given
from onnx import TensorProto, helper, numpy_helper

from passes import optimize
from passes.testing import assert_equivalent, assert_pass_sound, run_model
from passes.testing.strategies import onnx_graphs, shape_chain_graphs, test_dims
from passes.transforms.to_fp16 import ToFp16
from passes.numerics.verify import random_feeds
from tests.helpers import init, model, ops, tensor

# float16 keeps 11 significant bits (unit roundoff 2^-11 = 4.9e-4); a few roundings per layer through
# two layers stay well inside rtol=1e-2, atol=1e-2 on the samples' outputs (|values| <= ~4).
RTOL, ATOL = 1e-2, 1e-2
FLT_MIN = float(np.finfo(np.float32).min)
SAMPLES = [("tiny-llama", "torchscript"), ("tiny-llama", "dynamo"), ("tiny-bert", "torchscript"), ("tiny-bert", "dynamo")]
# Casts per sample: llama 5 RMSNorm islands x (in, out) + 2 Softmax x (in, out) + the logits = 15;
# decomposed BERT: 5 LayerNorms x (mean in/out, variance in/out) + 4 Softmax + mask bias + output = 26;
# fused BERT (LayerNormalization stays fp16 with stash_type=1): 4 Softmax + mask bias + output = 6.
EXPECTED_CASTS = {"tiny-llama": {"torchscript": 15, "dynamo": 15}, "tiny-bert": {"torchscript": 26, "dynamo": 6}}


def _weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) / 4


def _dtypes(m: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                          *inferred.graph.output)}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    return types


def _cast_round_trips(m: onnx.ModelProto) -> list[str]:
    """Names of Cast(fp16 -> fp32) -> Cast(fp32 -> fp16) pairs."""
    types = _dtypes(m)
    producers = {o: n for n in m.graph.node for o in n.output}
    found = []
    for node in m.graph.node:
        inner = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if inner is not None and inner.op_type == "Cast" and types.get(inner.input[0]) == TensorProto.FLOAT16:
            to = {a.name: a.i for a in node.attribute}["to"], {a.name: a.i for a in inner.attribute}["to"]
            if to == (TensorProto.FLOAT16, TensorProto.FLOAT):
                found.append(node.name)
    return found


def _attention_graph() -> onnx.ModelProto:
    """x @ W -> Softmax -> @ W2: the Softmax is a float32 island between two fp16 matmuls."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Softmax", ["h"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"])]
    return model(nodes, [tensor("x", ["n", 8])], [tensor("y", ["n", 8])], [init("w1", _weights()), init("w2", _weights())])


def test_structure_softmax_island_between_half_matmuls() -> None:
    result = ToFp16()(_attention_graph())
    out = result.model
    assert ops(out) == ["Cast", "MatMul", "Cast", "Softmax", "Cast", "MatMul", "Cast"]
    types = _dtypes(out)
    assert types["x"] == types["y"] == TensorProto.FLOAT  # keep_io_types
    assert types["w1"] == types["w2"] == TensorProto.FLOAT16
    softmax = next(n for n in out.graph.node if n.op_type == "Softmax")
    assert types[softmax.input[0]] == types[softmax.output[0]] == TensorProto.FLOAT
    assert result.stats["casts_inserted"] == 4 and result.stats["nodes_half"] == 2
    assert_equivalent(_attention_graph(), out, rtol=RTOL, atol=ATOL, input_shapes={"x": [3, 8]})


def test_structure_without_io_types_the_graph_is_half_end_to_end() -> None:
    out = ToFp16(keep_io_types=False)(_attention_graph()).model
    assert ops(out) == ["MatMul", "Cast", "Softmax", "Cast", "MatMul"]
    types = _dtypes(out)
    assert types["x"] == types["y"] == TensorProto.FLOAT16


def _rms_norm_graph() -> onnx.ModelProto:
    """Torchscript RMSNorm: w * (x * 1 / Sqrt(ReduceMean(Pow(x, 2)) + eps)), then a MatMul."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Pow", ["h", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["one", "std"], ["inv"]),
        helper.make_node("Mul", ["h", "inv"], ["normed"]),
        helper.make_node("Mul", ["gamma", "normed"], ["y"]),
    ]
    inits = [init("w", _weights() * 64), init("two", np.float32(2.0)), init("eps", np.float32(1e-6)),
             init("one", np.float32(1.0)), init("gamma", np.linspace(0.5, 1.5, 8, dtype=np.float32))]
    return model(nodes, [tensor("x", ["n", 8])], [tensor("y", ["n", 8])], inits)


def test_structure_variance_is_one_float32_island() -> None:
    """Pow -> ReduceMean -> Add -> Sqrt -> Div stay float32 with one Cast in and one out; the
    activations (|h| up to ~500, h^2 far beyond 65504) never square in float16."""
    original = _rms_norm_graph()
    out = ToFp16()(original).model
    assert ops(out) == ["Cast", "MatMul", "Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Cast", "Mul", "Mul", "Cast"]
    types = _dtypes(out)
    assert [types[t] for t in ("sq", "var", "var_eps", "std", "inv", "two", "eps", "one")] == [TensorProto.FLOAT] * 8
    assert types["gamma"] == types["w"] == types["normed"] == TensorProto.FLOAT16
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32) * 8}
    assert np.abs(run_model(original, feeds)["y"]).max() < 5  # normalised (<= sqrt(8) * 1.5), yet h^2 overflows half:
    assert np.abs(feeds["x"] @ _weights() * 64).max() > 256
    assert_equivalent(original, out, feeds=feeds, rtol=RTOL, atol=ATOL)


def test_structure_mask_sentinel_is_clamped_not_nan() -> None:
    """`(1 - mask) * FLT_MIN + scores`: FLT_MIN as float16 is -inf and 0 * -inf = NaN; clamped to -32752,
    half float16's range, so `score + sentinel` stays finite too."""
    nodes = [helper.make_node("Sub", ["one", "mask"], ["inverted"]), helper.make_node("Mul", ["inverted", "minimum"], ["bias"]),
             helper.make_node("Add", ["scores", "bias"], ["masked"]), helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
    original = model(nodes, [tensor("scores", ["n", 6]), tensor("mask", ["n", 6])], [tensor("y", ["n", 6])],
                     [init("one", np.float32(1.0)), init("minimum", np.float32(FLT_MIN))])
    result = ToFp16()(original)
    (minimum,) = [t for t in result.model.graph.initializer if t.name == "minimum"]
    assert minimum.data_type == TensorProto.FLOAT16 and numpy_helper.to_array(minimum) == -32752
    assert result.stats["sentinels_clamped"] == 1
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]], np.float32)
    feeds = {"scores": np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32) * 4, "mask": mask}
    got = run_model(result.model, feeds)["y"]
    assert np.isfinite(got).all() and np.allclose(got.sum(-1), 1, atol=1e-3)  # the fully masked row too
    # a fully masked row is uniform in float32 (scores vanish next to FLT_MIN) but not in float16,
    # where -32752 + s keeps s to 16 units: compare the rows that attend to something
    partial = {k: v[:2] for k, v in feeds.items()}
    assert_equivalent(original, result.model, feeds=partial, rtol=RTOL, atol=ATOL)


def test_structure_cast_round_trip_from_a_mixed_graph_is_dropped() -> None:
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["x32"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Relu", ["x16"], ["y"])]
    original = model(nodes, [tensor("x", [4], TensorProto.FLOAT16)], [tensor("y", [4], TensorProto.FLOAT16)])
    result = ToFp16()(original)
    assert ops(result.model) == ["Relu"] and result.stats["cast_round_trips_dropped"] == 1


def test_structure_attribute_typed_ops_follow() -> None:
    """Cast(double -> float) becomes Cast(-> float16); ConstantOfShape's value turns float16; Shape untouched."""
    nodes = [helper.make_node("Cast", ["d"], ["f"], to=TensorProto.FLOAT), helper.make_node("Shape", ["f"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["c"], value=numpy_helper.from_array(np.float32([0.5]))),
             helper.make_node("Add", ["f", "c"], ["y"])]
    original = model(nodes, [tensor("d", [2, 3], TensorProto.DOUBLE)], [tensor("y", [2, 3])])
    out = ToFp16()(original).model
    assert ops(out) == ["Cast", "Shape", "ConstantOfShape", "Add", "Cast"]
    assert out.graph.node[0].attribute[0].i == TensorProto.FLOAT16
    assert out.graph.node[2].attribute[0].t.data_type == TensorProto.FLOAT16
    assert_equivalent(original, out, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("name", "idiom"), SAMPLES)
def test_structure_samples(sample_model, name: str, idiom: str) -> None:  # type: ignore[no-untyped-def]
    canonical = optimize(sample_model(name, idiom=idiom))
    result = ToFp16()(canonical)
    out = result.model
    counts = Counter(ops(out))
    assert counts["Cast"] - Counter(ops(canonical))["Cast"] == EXPECTED_CASTS[name][idiom]
    assert len(out.graph.node) == len(canonical.graph.node) + EXPECTED_CASTS[name][idiom]
    assert not _cast_round_trips(out)
    types = _dtypes(out)
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[i] == TensorProto.FLOAT16 for n in matmuls for i in n.input)
    for node in out.graph.node:
        if node.op_type in ("Softmax", "ReduceMean"):
            assert types[node.input[0]] == types[node.output[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "LayerNormalization":
            assert types[node.input[0]] == TensorProto.FLOAT16
            assert {a.name: a.i for a in node.attribute}.get("stash_type", 1) == 1
    assert all(types[o.name] == TensorProto.FLOAT for o in out.graph.output)
    weights = [t for t in out.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    half_bytes = sum(t.ByteSize() for t in weights if t.data_type == TensorProto.FLOAT16)
    assert half_bytes > 0.99 * sum(t.ByteSize() for t in weights)  # the weights are stored in fp16
    assert not ToFp16()(out).modified


@pytest.mark.parametrize(("name", "idiom"), SAMPLES)
def test_numerics_samples_against_float32(sample_model, name: str, idiom: str) -> None:  # type: ignore[no-untyped-def]
    canonical = optimize(sample_model(name, idiom=idiom))
    converted = ToFp16()(canonical).model
    shapes = {"input_ids": [2, 9]} | ({"attention_mask": [2, 9]} if name == "tiny-bert" else {})
    for seed in (0, 1):
        feeds = random_feeds(canonical, seed, input_shapes=shapes)
        if name == "tiny-bert":
            feeds["attention_mask"][1] = 0  # a fully masked sequence: uniform attention, no NaN
        comparison = assert_equivalent(canonical, converted, feeds=feeds, rtol=RTOL, atol=ATOL)
        assert comparison.max_abs_error < 5e-3
        assert all(np.isfinite(v).all() for v in run_model(converted, feeds).values())


def test_numerics_fused_rms_norm_at_opset_23() -> None:
    """RMSNormalization stays fused in float16 with stash_type=1 (run through onnx.reference)."""
    nodes = [helper.make_node("RMSNormalization", ["x", "gamma"], ["y"], axis=-1, epsilon=1e-6, stash_type=1)]
    original = model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8])],
                     [init("gamma", np.linspace(0.5, 1.5, 8, dtype=np.float32))], opset=23)
    out = ToFp16()(original).model
    assert ops(out) == ["Cast", "RMSNormalization", "Cast"]
    assert _dtypes(out)["gamma"] == TensorProto.FLOAT16
    assert_equivalent(original, out, rtol=RTOL, atol=ATOL)


def _graph_of(dtype: int, np_dtype: type) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])]
    return model(nodes, [tensor("x", [2, 8], dtype)], [tensor("y", [2, 8], dtype)], [
        numpy_helper.from_array(_weights().astype(np_dtype), "w")])


@pytest.mark.parametrize(("dtype", "np_dtype", "found"), [
    (TensorProto.DOUBLE, np.float64, "float64"), (TensorProto.BFLOAT16, None, "bfloat16")])
def test_refusal_double_and_bfloat16_graphs_unchanged(dtype: int, np_dtype: type | None, found: str) -> None:
    if np_dtype is None:
        nodes = [helper.make_node("Relu", ["x"], ["y"])]
        original = model(nodes, [tensor("x", [2, 8], dtype)], [tensor("y", [2, 8], dtype)])
    else:
        original = _graph_of(dtype, np_dtype)
    result = ToFp16()(original)
    assert not result.modified
    assert [r.reason for r in result.refusals] == [f"no float32 tensor to convert (float types present: {found})"]


def test_refusal_integer_graph_unchanged() -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Range", ["zero", "c", "one"], ["y"])]
    original = model(nodes, [tensor("a", [], TensorProto.INT64), tensor("b", [], TensorProto.INT64)],
                     [tensor("y", [None], TensorProto.INT64)], [init("zero", np.int64(0)), init("one", np.int64(1))])
    result = ToFp16()(original)
    assert not result.modified and ops(result.model) == ["Add", "Range"]
    assert [r.reason for r in result.refusals] == ["no float32 tensor to convert (no float tensors)"]


def test_refusal_ops_in_block_stay_float32() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Relu", ["t"], ["y"])]
    original = model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8])], [init("w", _weights())])
    result = ToFp16(block="Tanh|Softmax")(original)
    assert [r.reason for r in result.refusals] == ["Tanh is in block 'Tanh|Softmax'"]
    assert ops(result.model) == ["Cast", "MatMul", "Cast", "Tanh", "Cast", "Relu", "Cast"]
    assert _dtypes(result.model)["t"] == TensorProto.FLOAT
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="is not a regular expression"):
        ToFp16(block="Soft(max")


@pytest.mark.parametrize(("node", "inits", "reason"), [
    (helper.make_node("Mul", ["x", "big"], ["y"]), [init("big", np.float32([1e5]))],
     "reads constant 'big' that holds 1e+05, beyond float16's range (65504)"),
    (helper.make_node("Pow", ["x", "p"], ["y"]), [init("p", np.float32(3.0))],
     "Pow(x, 3) overflows float16 for |x| > 40.31"),
    (helper.make_node("Pow", ["x", "p"], ["y"]), [init("p", np.float32(-1.0))],
     "Pow(x, -1) overflows float16 for |x| < 1.53e-05"),
    (helper.make_node("Exp", ["x"], ["y"]), [], "Exp stays float32: exp(x) overflows float16 for x > 11.09"),
])
def test_refusal_unsafe_values_stay_float32(node: onnx.NodeProto, inits: list[onnx.TensorProto], reason: str) -> None:
    original = model([node], [tensor("x", [4])], [tensor("y", [4])], inits)
    result = ToFp16()(original)
    assert not result.modified and [r.reason for r in result.refusals] == [reason]


def test_refusal_control_flow() -> None:
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "b", [], [tensor("r", [4])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    original = model(nodes, [tensor("c", [], TensorProto.BOOL), tensor("x", [4])], [tensor("y", [4])])
    result = ToFp16()(original)
    assert not result.modified
    assert [r.reason for r in result.refusals] == [
        "control flow (If/Loop/Scan) is not converted: subgraph types would have to change too"]


_ALWAYS_HALF = {"Relu", "Sigmoid", "Tanh", "MatMul"}  # never seeded nor absorbed into an island
_ALWAYS_SINGLE = {"Softmax", "ReduceMean", "Exp"}


def _value_scale(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """The largest |value| any float tensor of `m` takes on `feeds` (inputs included)."""
    probe = onnx.shape_inference.infer_shapes(m)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(v for v in probe.graph.value_info
                              if v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE) and v.name not in known)
    values = [*run_model(probe, feeds).values(), *feeds.values()]
    return max([1.0] + [float(np.abs(v).max()) for v in values if v.size and np.issubdtype(v.dtype, np.floating)])


@given(onnx_graphs(dtypes=(np.float32, np.float64)))
def test_property_converted_graphs_are_valid_close_and_idempotent(original: onnx.ModelProto) -> None:
    """Tolerance: rtol=1e-2 and atol=1e-2 * (the largest |value| inside the graph, at least 1): each
    fp16 rounding errs by <= 2^-11 of the value rounded, a dozen of them stay under 1e-2 of it."""
    feeds = random_feeds(original, 0, input_shapes=test_dims(original))
    scale = _value_scale(original, feeds)
    result = assert_pass_sound(ToFp16(), original, rtol=RTOL, atol=ATOL * scale, input_shapes=test_dims(original))
    assert all(np.isfinite(v).all() for v in run_model(result.model, feeds).values())
    assert not _cast_round_trips(result.model)
    if original.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE:
        assert not result.modified and "float types present: float64" in result.refusals[0].reason
        return
    types = _dtypes(result.model)
    for node in result.model.graph.node:
        if node.op_type in _ALWAYS_HALF:
            assert types[node.output[0]] == TensorProto.FLOAT16, f"{node.op_type} {node.name} is not half"
        if node.op_type in _ALWAYS_SINGLE:
            assert types[node.input[0]] == TensorProto.FLOAT, f"{node.op_type} {node.name} is not float32"
    if any(n.op_type in _ALWAYS_HALF for n in original.graph.node):
        assert result.modified, "a float32 graph with half-able ops was left alone"


@given(shape_chain_graphs())
def test_property_shape_chains_keep_integer_work_untouched(original: onnx.ModelProto) -> None:
    """Exporter shape chains: the integer ops (Shape, Gather, Range, ...) keep their types."""
    feeds = random_feeds(original, 0, input_shapes=test_dims(original))
    scale = _value_scale(original, feeds)
    result = assert_pass_sound(ToFp16(), original, rtol=RTOL, atol=ATOL * scale, input_shapes=test_dims(original))
    before, after = _dtypes(original), _dtypes(result.model)
    for node in original.graph.node:
        for name in node.output:
            if before.get(name) not in (TensorProto.FLOAT, None):
                assert after[name] == before[name], f"{node.op_type} output {name} changed type"
