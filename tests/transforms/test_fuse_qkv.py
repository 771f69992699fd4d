"""fuse-qkv: structure, numerics, refusal, property.

Tolerances: concatenating weights does not change any dot product, but a Gemm sibling becomes
MatMul + Add (the bias is added after the accumulation, not inside it), so float32 compares at
rtol=1e-5, atol=1e-5 and float64 at 1e-12.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from passes.core.errors import PipelineError
from passes.testing import assert_equivalent, assert_pass_sound
from passes.transforms.fuse_matmul_add import FuseMatMulAdd
from passes.transforms.fuse_qkv import FuseQkv
from tests.helpers import init, model, ops, tensor

TOLERANCE = {np.float32: (1e-5, 1e-5), np.float64: (1e-12, 1e-12)}
RTOL, ATOL = TOLERANCE[np.float32]
RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def _initializers(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _reasons(result: Any) -> list[str]:
    return [r.reason for r in result.refusals]


def _qkv(sizes: tuple[int, ...] = (8, 4, 4), *, biases: tuple[str, ...] = ("last", "first", "last"),
         opset: int = 17, k: int = 8) -> onnx.ModelProto:
    """Projections of x [batch, seq, k] to `sizes`, each with a bias Add ("first": Add(b, mm)) or none."""
    nodes, inits, outputs = [], [], []
    for i, (n, bias) in enumerate(zip(sizes, biases)):
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"mm{i}"], name=f"proj{i}"))
        inits.append(init(f"w{i}", _w(k, n)))
        out = f"mm{i}"
        if bias != "none":
            inits.append(init(f"b{i}", RNG.standard_normal(n).astype(np.float32)))
            pair = [f"b{i}", out] if bias == "first" else [out, f"b{i}"]
            nodes.append(helper.make_node("Add", pair, [f"y{i}"]))
            out = f"y{i}"
        nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
        outputs.append(tensor(f"r{i}", ["batch", "seq", n]))
    return model(nodes, [tensor("x", ["batch", "seq", k])], outputs, inits, opset=opset)


# -- structure ------------------------------------------------------------------------------------
def test_structure_qkv_with_biases_becomes_matmul_add_split() -> None:
    original = _qkv()
    result = FuseQkv()(original)
    assert ops(result.model) == ["MatMul", "Add", "Split", "Relu", "Relu", "Relu"]
    matmul, add, split = result.model.graph.node[:3]
    values = _initializers(result.model)
    originals = _initializers(original)
    np.testing.assert_array_equal(values[matmul.input[1]], np.concatenate([originals[f"w{i}"] for i in range(3)], 1))
    np.testing.assert_array_equal(values[add.input[1]], np.concatenate([originals[f"b{i}"] for i in range(3)]))
    assert values[split.input[1]].tolist() == [8, 4, 4]  # grouped-KV: N differs per branch
    assert list(split.output) == ["y0", "y1", "y2"]  # consumers keep reading the same names
    assert result.stats == {"groups_fused": 1, "ConcatSiblingMatMuls": 1, "projections_fused": 3, "biases_folded": 3}
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL, input_shapes={"x": [2, 5, 8]})


def test_structure_some_biases_stay_after_the_split() -> None:
    original = _qkv((4, 4), biases=("last", "none"))
    result = FuseQkv()(original)
    assert ops(result.model) == ["MatMul", "Split", "Add", "Relu", "Relu"]
    assert result.stats["biases_folded"] == 0
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


def test_structure_bias_that_grows_the_rank_stays_after_the_split() -> None:
    """x [6] @ W [6, n] is [n]; adding a [1, n] bias makes it [1, n], which a folded [sum n] bias would not."""
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]) for i in range(2)]
    nodes += [helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"]) for i in range(2)]
    inits = [init("w0", _w(6, 3)), init("w1", _w(6, 2)), init("b0", _w(1, 3)), init("b1", _w(1, 2))]
    original = model(nodes, [tensor("x", [6])], [tensor("y0", [1, 3]), tensor("y1", [1, 2])], inits)
    result = FuseQkv()(original)
    assert ops(result.model) == ["MatMul", "Split", "Add", "Add"]
    assert result.stats["biases_folded"] == 0
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


def test_structure_opset_11_split_sizes_are_an_attribute() -> None:
    result = FuseQkv()(_qkv((3, 5), biases=("none", "none"), opset=11))
    split = result.model.graph.node[1]
    assert split.op_type == "Split" and len(split.input) == 1
    assert {a.name: list(a.ints) or a.i for a in split.attribute} == {"axis": -1, "split": [3, 5]}


def test_structure_gemm_siblings_transb_and_c() -> None:
    """Gemm(x, W^T){transB=1} and Gemm(x, W, C[M, N]): C cannot fold, so it comes back as an Add."""
    nodes = [
        helper.make_node("Gemm", ["x", "wt"], ["g0"], transB=1),
        helper.make_node("Gemm", ["x", "w1", "c1"], ["g1"]),
        helper.make_node("MatMul", ["x", "w2"], ["g2"]),
    ]
    inits = [init("wt", _w(5, 6)), init("w1", _w(6, 3)), init("c1", _w(4, 3)), init("w2", _w(6, 2))]
    original = model(nodes, [tensor("x", [4, 6])], [tensor(f"g{i}", [4, n]) for i, n in enumerate((5, 3, 2))], inits)
    result = FuseQkv()(original)
    assert ops(result.model) == ["MatMul", "Split", "Add"]
    weight = _initializers(result.model)[result.model.graph.node[0].input[1]]
    np.testing.assert_array_equal(weight[:, :5], _initializers(original)["wt"].T)
    assert result.model.graph.node[2].input[1] == "c1" and result.model.graph.node[2].output[0] == "g1"
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


def test_structure_gemm_c_vectors_fold_with_add_biases() -> None:
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "c0"], ["g0"]),
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["b1", "m1"], ["g1"]),
    ]
    inits = [init("w0", _w(6, 3)), init("c0", _w(1, 3)), init("w1", _w(6, 2)), init("b1", np.float32([1.0]))]
    original = model(nodes, [tensor("x", [4, 6])], [tensor("g0", [4, 3]), tensor("g1", [4, 2])], inits)
    result = FuseQkv()(original)
    assert ops(result.model) == ["MatMul", "Add", "Split"]
    bias = _initializers(result.model)[result.model.graph.node[1].input[1]]
    np.testing.assert_array_equal(bias, np.concatenate([_initializers(original)["c0"][0], [1.0, 1.0]]))
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


def test_structure_sibling_graph_outputs_keep_their_names() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["q"]), helper.make_node("MatMul", ["x", "w1"], ["k"]),
             helper.make_node("Add", ["k", "b1"], ["k_biased"])]
    inits = [init("w0", _w(6, 3)), init("w1", _w(6, 3)), init("b1", _w(1, 3)[0])]
    outputs = [tensor("q", [2, 3]), tensor("k", [2, 3]), tensor("k_biased", [2, 3])]
    original = model(nodes, [tensor("x", [2, 6])], outputs, inits)
    result = FuseQkv()(original)
    assert ops(result.model) == ["MatMul", "Split", "Add"]  # k is visible, so its bias cannot fold
    assert [o.name for o in result.model.graph.output] == ["q", "k", "k_biased"]
    assert list(result.model.graph.node[1].output) == ["q", "k"]
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
def test_structure_samples(sample_model, idiom: str) -> None:  # type: ignore[no-untyped-def]
    llama = sample_model("tiny-llama", idiom=idiom, layers=2)
    result = FuseQkv()(llama)
    # per layer: Q/K/V (biases fold) and the SwiGLU gate/up pair (no biases)
    assert result.stats == {"groups_fused": 4, "ConcatSiblingMatMuls": 4, "projections_fused": 10, "biases_folded": 6}
    splits = [n for n in result.model.graph.node if n.op_type == "Split"]
    assert [len(s.output) for s in splits] == [3, 2, 3, 2]
    assert ops(result.model).count("MatMul") == ops(llama).count("MatMul") - 6
    bert = FuseQkv()(sample_model("tiny-bert", idiom=idiom, layers=2))
    assert bert.stats == {"groups_fused": 2, "ConcatSiblingMatMuls": 2, "projections_fused": 6, "biases_folded": 6}


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
def test_numerics_samples(sample_model, idiom: str) -> None:  # type: ignore[no-untyped-def]
    for name in ("tiny-llama", "tiny-bert"):
        original = sample_model(name, idiom=idiom)
        result = FuseQkv()(original)
        onnx.checker.check_model(result.model, full_check=True)
        for dims in ([1, 5], [3, 9]):
            shapes = {i.name: dims for i in original.graph.input}
            assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL, input_shapes=shapes)


def test_numerics_ordering_before_fuse_matmul_add(sample_model) -> None:  # type: ignore[no-untyped-def]
    """The pipeline runs fuse-qkv first: the fused Q/K/V MatMul + Add then becomes one Gemm per layer.
    The other order hides Q/K/V behind private Reshapes, and only gate/up are left to fuse."""
    original = sample_model("tiny-llama", idiom="dynamo", layers=2)
    qkv_first = FuseMatMulAdd()(FuseQkv()(original).model)
    assert qkv_first.stats["matmul_adds_fused"] == 4  # the fused QKV and o_proj, per layer
    assert_equivalent(original, qkv_first.model, rtol=RTOL, atol=ATOL, input_shapes={"input_ids": [2, 7]})
    late = FuseQkv()(FuseMatMulAdd()(original).model)
    assert late.stats["groups_fused"] == 2 and late.stats["biases_folded"] == 0


# -- refusals -------------------------------------------------------------------------------------
def _siblings(extra: onnx.NodeProto, extra_inits: list[onnx.TensorProto], *, x: list[Any] | None = None,
              extra_inputs: Sequence[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """Two fusable MatMuls of x [4, 6] plus `extra` (output "e"), which reads x too."""
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="a"),
             helper.make_node("MatMul", ["x", "w1"], ["b"], name="b"), extra]
    inits = [init("w0", _w(6, 3)), init("w1", _w(6, 2)), *extra_inits]
    e_rank = 3 if any(len(t.dims) == 3 for t in extra_inits) else 2
    outputs = [tensor("a", [None, None]), tensor("b", [None, None]), tensor("e", [None] * e_rank)]
    return model(nodes, [tensor("x", x or [4, 6]), *extra_inputs], outputs, inits)


REFUSALS = [
    pytest.param(helper.make_node("MatMul", ["x", "wd"], ["e"], name="e"), [], [tensor("wd", [6, 2])],
                 "weight is not a constant", id="dynamic weight"),
    pytest.param(helper.make_node("MatMul", ["x", "w3"], ["e"], name="e"), [init("w3", _w(2, 6, 2))], [],
                 "weight is 3-D, not 2-D", id="batched weight"),
    pytest.param(helper.make_node("Gemm", ["x", "wg"], ["e"], name="e", transA=1), [init("wg", _w(4, 2))], [],
                 "Gemm transA=1", id="transA"),
    pytest.param(helper.make_node("Gemm", ["x", "wg"], ["e"], name="e", alpha=0.5), [init("wg", _w(6, 2))], [],
                 "Gemm alpha=0.5 != 1", id="alpha"),
    pytest.param(helper.make_node("Gemm", ["x", "wg", "c"], ["e"], name="e", beta=2.0),
                 [init("wg", _w(6, 2)), init("c", _w(1, 2)[0])], [], "Gemm beta=2 != 1", id="beta"),
]


@pytest.mark.parametrize(("extra", "extra_inits", "extra_inputs", "reason"), REFUSALS)
def test_refusal_odd_sibling_stays_the_others_fuse(extra: onnx.NodeProto, extra_inits: list[onnx.TensorProto],
                                                   extra_inputs: list[onnx.ValueInfoProto], reason: str) -> None:
    original = _siblings(extra, extra_inits, extra_inputs=extra_inputs)
    result = FuseQkv()(original)
    assert result.stats["projections_fused"] == 2
    assert ops(result.model) == ["MatMul", "Split", extra.op_type]
    assert [(r.node, r.reason) for r in result.refusals] == [("e", f"ConcatSiblingMatMuls: {reason}")]
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


def test_refusal_weights_with_different_k() -> None:
    """x [m, k] read with K=6 twice and K=5 once: no model can run, but the pass must not merge them."""
    extra = helper.make_node("MatMul", ["x", "w5"], ["e"], name="e")
    result = FuseQkv()(_siblings(extra, [init("w5", _w(5, 2))], x=["m", "k"]))
    assert result.stats["projections_fused"] == 2
    assert _reasons(result) == ["ConcatSiblingMatMuls: weights have different K"]


def test_refusal_min_siblings() -> None:
    result = FuseQkv(min_siblings=3)(_qkv((4, 4), biases=("last", "last")))
    assert not result.modified
    assert _reasons(result) == ["ConcatSiblingMatMuls: 2 siblings < min_siblings=3"] * 2
    assert FuseQkv(min_siblings=3)(_qkv()).modified


def test_refusal_opset_10() -> None:
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(2)]
    outputs = [tensor("y0", [2, 3]), tensor("y1", [2, 3])]
    original = model(nodes, [tensor("x", [2, 6])], outputs, [init("w0", _w(6, 3)), init("w1", _w(6, 3))], opset=10)
    result = FuseQkv()(original)
    assert not result.modified
    assert _reasons(result) == ["ConcatSiblingMatMuls: opset 10 < 11 (Split with axis=-1)"] * 2


def test_refusal_bad_option() -> None:
    with pytest.raises(ValueError, match="min_siblings must be >= 2"):
        FuseQkv(min_siblings=1)
    with pytest.raises(PipelineError):
        FuseQkv.from_options({"min_siblings": "1"})


# -- property -------------------------------------------------------------------------------------
SYMBOLS = ("batch", "seq", "heads")


@st.composite
def sibling_graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, list[int]], dict[str, Any]]:
    """2-5 projections of one input (MatMul, or Gemm with transB when the input is 2-D), each with
    no bias, a bias Add in either order, or a Gemm C; sometimes a sibling that must be refused."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rank, k = draw(st.sampled_from((1, 2, 2, 3, 3, 4))), draw(st.integers(1, 9))
    style = draw(st.sampled_from(("every sibling biased", "mixed", "no biases")))
    lead = [(draw(st.integers(1, 4)), draw(st.sampled_from((None, SYMBOLS[i])))) for i in range(rank - 1)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    opset = draw(st.sampled_from([11, 13, 17, 18]))
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outputs: list[str] = []
    ranks: dict[str, int] = {"dynamic": max(rank, 1)}
    folds: list[bool] = []
    for i in range(draw(st.integers(2, 5))):
        n = draw(st.integers(1, 9))
        weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
        out = f"p{i}"
        if rank == 2 and draw(st.booleans()):  # a Gemm: C folds when it is a per-column vector
            trans_b = draw(st.booleans())
            inits.append(numpy_helper.from_array(weight.T.copy() if trans_b else weight, f"w{i}"))
            m = lead[0][0]
            c_shape = draw(st.sampled_from({"every sibling biased": [(n,), (1, n), (1,)], "no biases": [None],
                                            "mixed": [None, (n,), (1, n), (1,), (m, n), (m, 1)]}[style]))
            c = [] if c_shape is None else [f"c{i}"]
            if c_shape is not None:
                inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(dtype), f"c{i}"))
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}", *c], [out], transB=int(trans_b)))
            ranks[out] = 2
            folds.append(c_shape is not None and (len(c_shape) == 1 or c_shape[0] == 1))
        else:
            inits.append(numpy_helper.from_array(weight, f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [out]))
            ranks[out] = max(rank, 1)
            bias_shape = draw(st.sampled_from({"every sibling biased": [(n,), (1,), (), (1, n)],  # (1, n) grows a 1-D x
                                               "no biases": [None], "mixed": [None, (n,), (1,), (), (1, n)]}[style]))
            # the MatMul result is a graph output too, so its bias cannot fold
            exposed = style == "mixed" and bias_shape is not None and draw(st.booleans())
            if exposed:
                outputs.append(out)
            if bias_shape is not None:
                inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(dtype), f"b{i}"))
                pair = [f"b{i}", out] if draw(st.booleans()) else [out, f"b{i}"]
                ranks[f"biased{i}"] = max(ranks[out], len(bias_shape))
                out = f"biased{i}"
                nodes.append(helper.make_node("Add", pair, [out]))
            folds.append(bias_shape is not None and not exposed and len(bias_shape) <= max(rank, 1))
        if draw(st.booleans()):
            nodes.append(helper.make_node("Tanh", [out], [f"t{i}"]))
            ranks[f"t{i}"] = ranks[out]
            out = f"t{i}"
        outputs.append(out)
    refused = draw(st.booleans())
    inputs = [helper.make_tensor_value_info("x", elem, [label or size for size, label in lead] + [k])]
    shapes = {"x": [size for size, _ in lead] + [k]}
    if refused:  # a sibling with a run-time weight, interleaved anywhere
        nodes.insert(draw(st.integers(0, len(nodes))), helper.make_node("MatMul", ["x", "wd"], ["dynamic"]))
        inputs.append(helper.make_tensor_value_info("wd", elem, [k, 3]))
        shapes["wd"] = [k, 3]
        outputs.append("dynamic")
    graph_outputs = [helper.make_tensor_value_info(o, elem, [None] * ranks[o]) for o in outputs]
    graph = helper.make_graph(nodes, "siblings", inputs, graph_outputs, inits)
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    made.ir_version = 7
    onnx.checker.check_model(made, full_check=True)
    return made, shapes, {"dtype": dtype, "count": len(folds), "folds": all(folds), "refused": refused, "rank": rank}


@given(sibling_graphs())
def test_property_siblings_fuse_into_one_matmul(
    case: tuple[onnx.ModelProto, dict[str, list[int]], dict[str, Any]],
) -> None:
    original, shapes, drawn = case
    event(f"rank {drawn['rank']}, biases fold: {drawn['folds']}")
    rtol, atol = TOLERANCE[drawn["dtype"]]
    result = assert_pass_sound(FuseQkv(), original, rtol=rtol, atol=atol, input_shapes=shapes)
    assert result.stats["projections_fused"] == drawn["count"]
    assert result.stats["biases_folded"] == (drawn["count"] if drawn["folds"] else 0)
    readers = [n.op_type for n in result.model.graph.node if "x" in n.input]
    assert readers == ["MatMul"] * (1 + drawn["refused"]), readers
    assert ops(result.model).count("Split") == 1
    assert _reasons(result) == (["ConcatSiblingMatMuls: weight is not a constant"] if drawn["refused"] else [])
