"""fold-transpose: structure, numerics, refusal, property.

Tolerances: merging Transposes and pre-transposing a constant move bytes only (exact); flipping a
Gemm's trans flags may change the kernel's summation order, so float32 compares at rtol=1e-5, atol=1e-6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from passes.testing import assert_equivalent, assert_pass_sound
from passes.transforms.fold_transpose import FoldTranspose
from tests.helpers import init, model, ops, tensor

RTOL, ATOL = 1e-5, 1e-6
RNG = np.random.default_rng(0)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _reasons(result: Any) -> list[str]:
    return [r.reason for r in result.refusals]


# -- structure ------------------------------------------------------------------------------------
def test_structure_transpose_pair_merges_into_one() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 2, 0]),
             helper.make_node("Transpose", ["t1"], ["y"])]  # default perm: reversed axes
    original = model(nodes, [tensor("x", ["a", 3, 4])], [tensor("y", [None, None, None])])
    result = FoldTranspose()(original)
    assert ops(result.model) == ["Transpose"]
    assert _attrs(result.model.graph.node[0])["perm"] == np.arange(3)[[1, 2, 0]][[2, 1, 0]].tolist()
    assert result.stats == {"transposes_folded": 1, "MergeTransposes": 1}
    assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes={"x": [2, 3, 4]})


def test_structure_chain_of_three_transposes_merges_into_one() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 2, 0]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
             helper.make_node("Transpose", ["t2"], ["y"])]
    original = model(nodes, [tensor("x", ["a", 3, 4])], [tensor("y", [None, None, None])])
    result = assert_pass_sound(FoldTranspose(), original, rtol=0, atol=0, input_shapes={"x": [2, 3, 4]})
    assert ops(result.model) == ["Transpose"]
    assert _attrs(result.model.graph.node[0])["perm"] == np.arange(3)[[1, 2, 0]][[0, 2, 1]][[2, 1, 0]].tolist()


def test_structure_inverse_pair_vanishes_and_output_keeps_its_name() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 2, 0])]
    original = model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 3, 4])])
    result = FoldTranspose()(original)
    assert ops(result.model) == ["Identity"]  # y is a graph output: it must still be produced
    assert [o.name for o in result.model.graph.output] == ["y"]
    inner = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Transpose", ["t"], ["u"], perm=[1, 0]), helper.make_node("Relu", ["u"], ["y"])]
    relu = FoldTranspose()(model(inner, [tensor("x", [2, 3])], [tensor("y", [2, 3])]))
    assert ops(relu.model) == ["Relu"] and list(relu.model.graph.node[0].input) == ["x"]


def test_structure_matmul_weight_is_pretransposed() -> None:
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    weight = RNG.standard_normal((4, 6)).astype(np.float32)
    original = model(nodes, [tensor("x", ["n", 6])], [tensor("y", ["n", 4])], [init("w", weight)])
    result = FoldTranspose()(original)
    assert ops(result.model) == ["MatMul"]
    folded = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(folded[result.model.graph.node[0].input[1]], weight.T)
    assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes={"x": [3, 6]})


def test_structure_gemm_absorbs_transposes_into_flags() -> None:
    nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]), helper.make_node("Transpose", ["b"], ["bt"]),
             helper.make_node("Gemm", ["at", "bt", "c"], ["y"], transB=1, alpha=0.5)]
    original = model(nodes, [tensor("a", [6, 3]), tensor("b", [6, 4])], [tensor("y", [3, 4])],
                     [init("c", np.ones(4, np.float32))])
    result = FoldTranspose()(original)
    assert ops(result.model) == ["Gemm"]
    gemm = result.model.graph.node[0]
    assert list(gemm.input) == ["a", "b", "c"]
    assert _attrs(gemm) == {"transA": 1, "transB": 0, "alpha": 0.5}
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


def test_structure_gemm_reading_one_transpose_twice() -> None:
    nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]), helper.make_node("Gemm", ["at", "at"], ["y"])]
    original = model(nodes, [tensor("a", [3, 3])], [tensor("y", [3, 3])])
    result = FoldTranspose()(original)
    assert ops(result.model) == ["Gemm"] and list(result.model.graph.node[0].input) == ["a", "a"]
    assert_pass_sound(FoldTranspose(), original, rtol=RTOL, atol=ATOL)


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
def test_numerics_samples(sample_model, idiom: str) -> None:  # type: ignore[no-untyped-def]
    for name in ("tiny-llama", "tiny-bert"):
        original = sample_model(name, idiom=idiom)
        result = FoldTranspose()(original)
        onnx.checker.check_model(result.model, full_check=True)
        for dims in ([1, 5], [2, 7]):
            shapes = {i.name: dims for i in original.graph.input}
            assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes=shapes)


def test_numerics_head_split_merged_with_attention_transpose() -> None:
    """The attention idiom: [B, S, H, D] -> [B, H, S, D] -> K^T [B, H, D, S] becomes one Transpose."""
    nodes = [helper.make_node("Transpose", ["k"], ["kh"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"])]
    inputs = [tensor("q", ["b", 4, "s", 8]), tensor("k", ["b", "s", 4, 8])]
    original = model(nodes, inputs, [tensor("scores", ["b", 4, "s", "s"])])
    result = FoldTranspose()(original)
    assert ops(result.model) == ["Transpose", "MatMul"]
    assert _attrs(result.model.graph.node[0])["perm"] == [0, 2, 3, 1]
    assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes={"q": [2, 4, 5, 8], "k": [2, 5, 4, 8]})


# -- refusals -------------------------------------------------------------------------------------
def test_refusal_shared_inner_transpose() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0]), helper.make_node("Relu", ["t"], ["z"])]
    original = model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3]), tensor("z", [3, 2])])
    result = FoldTranspose()(original)
    assert not result.modified
    assert _reasons(result) == ["MergeTransposes: intermediate 't' is used outside the pattern"]


def test_refusal_inner_transpose_is_a_graph_output() -> None:
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    original = model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 3]), tensor("wt", [4, 3])],
                     [init("w", np.ones((3, 4), np.float32))])
    result = FoldTranspose()(original)
    assert not result.modified
    assert _reasons(result) == ["PretransposeMatMulWeight: intermediate 'wt' is a graph output"]


def test_refusal_default_perm_on_unknown_rank() -> None:
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Transpose", ["r"], ["t"]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])]
    inputs = [tensor("x", [6]), tensor("s", [None], onnx.TensorProto.INT64)]
    original = model(nodes, inputs, [tensor("y", [None, None])])
    result = FoldTranspose()(original)
    assert not result.modified
    assert _reasons(result) == ["MergeTransposes: default perm on an input of unknown rank"]


def test_refusal_non_patterns_are_left_alone_without_a_reason() -> None:
    """A Transpose of a run-time weight is not constant folding; an identity perm is not a Gemm flag."""
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"]),
             helper.make_node("Transpose", ["a"], ["a2"], perm=[0, 1]), helper.make_node("Gemm", ["a2", "b"], ["g"])]
    inputs = [tensor("x", [2, 4]), tensor("w", [3, 4]), tensor("a", [2, 4]), tensor("b", [4, 3])]
    original = model(nodes, inputs, [tensor("y", [2, 3]), tensor("g", [2, 3])])
    result = FoldTranspose()(original)
    assert not result.modified and not result.refusals


def test_refusal_matmul_reading_the_transposed_weight_twice() -> None:
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["wt", "wt"], ["y"])]
    original = model(nodes, [], [tensor("y", [3, 3])], [init("w", RNG.standard_normal((3, 3)).astype(np.float32))])
    result = assert_pass_sound(FoldTranspose(), original, rtol=RTOL, atol=ATOL)
    assert not result.modified
    assert [r.reason for r in result.refusals] == [
        "PretransposeMatMulWeight: the rewrite would still read 'wt', which it removes"
    ]


def test_refusal_gemm_c_reading_the_folded_transpose() -> None:
    nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
             helper.make_node("Gemm", ["at", "b", "at"], ["y"])]
    original = model(nodes, [tensor("a", [3, 3]), tensor("b", [3, 3])], [tensor("y", [3, 3])])
    result = assert_pass_sound(FoldTranspose(), original, rtol=RTOL, atol=ATOL)
    assert not result.modified
    assert [r.reason for r in result.refusals] == [
        "TransposeIntoGemm: the rewrite would still read 'at', which it removes"
    ]


# -- property -------------------------------------------------------------------------------------
SYMBOLS = ("batch", "seq", "heads", "dim")
MAX_CHAIN = 4


@st.composite
def transpose_graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, list[int]], dict[str, Any]]:
    """A chain of 1-MAX_CHAIN Transposes (explicit or default perms; an intermediate sometimes also read by a
    Relu or exposed as a graph output), then a MatMul by a transposed constant or a Gemm with
    transposed operands."""
    rank = draw(st.integers(2, 4))
    sizes = [draw(st.integers(1, 4)) for _ in range(rank)]
    labels = [draw(st.sampled_from((None, SYMBOLS[i]))) for i in range(rank)]
    opset = draw(st.sampled_from([11, 13, 17, 18]))
    nodes, inits, outputs = [], [], []
    current, dims = "x", list(range(rank))  # dims: which input axis each current axis is
    for i in range(draw(st.integers(1, MAX_CHAIN))):
        perm = draw(st.permutations(range(rank)))
        default = perm == list(reversed(range(rank))) and draw(st.booleans())
        nodes.append(helper.make_node("Transpose", [current], [f"t{i}"], **({} if default else {"perm": perm})))
        if i and draw(st.integers(0, 4)) == 0:  # the previous Transpose is read elsewhere too
            if draw(st.booleans()):
                nodes.append(helper.make_node("Relu", [current], [f"side{i}"]))
                outputs.append((f"side{i}", rank))
            else:
                outputs.append((current, rank))
        current, dims = f"t{i}", [dims[p] for p in perm]
    tail = draw(st.sampled_from(("none", "matmul", "gemm")))
    k = sizes[dims[-1]] if labels[dims[-1]] is None else None
    tail = "none" if tail == "matmul" and k is None else tail
    if tail == "matmul":  # MatMul(chain, Transpose(W)) with W [N, K] or batched [B, N, K]
        n = draw(st.integers(1, 4))
        shape, perm = ([n, k], [1, 0]) if draw(st.booleans()) else ([2, n, k], [0, 2, 1])
        if len(shape) == 3 and rank >= 3 and (labels[dims[-3]] is not None or sizes[dims[-3]] not in (1, 2)):
            shape, perm = [n, k], [1, 0]
        inits.append(numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), "w"))
        nodes += [helper.make_node("Transpose", ["w"], ["wt"], perm=perm),
                  helper.make_node("MatMul", [current, "wt"], ["y"])]
        current = "y"
        rank = max(rank, len(shape))
    elif tail == "gemm":  # Gemm(Transpose(a), Transpose(b)) on separate 2-D inputs
        m, kk, n = (draw(st.integers(1, 4)) for _ in range(3))
        flags = {"transA": draw(st.integers(0, 1)), "transB": draw(st.integers(0, 1))}
        a_shape = [m, kk] if flags["transA"] else [kk, m]
        b_shape = [kk, n] if flags["transB"] else [n, kk]
        nodes += [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
                  helper.make_node("Transpose", ["b"], ["bt"]),
                  helper.make_node("Gemm", ["at", "bt"], ["g"], alpha=draw(st.sampled_from([1.0, 0.5])), **flags)]
        outputs.append(("g", 2))
        extra = {"a": a_shape, "b": b_shape}
    outputs.append((current, rank))
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [lab or s for s, lab in zip(sizes, labels)])]
    shapes = {"x": sizes}
    if tail == "gemm":
        inputs += [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, s) for name, s in extra.items()]
        shapes.update(extra)
    graph_outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None] * r)
                     for name, r in dict(outputs).items()]
    made = helper.make_model(helper.make_graph(nodes, "transposes", inputs, graph_outputs, inits),
                             opset_imports=[helper.make_opsetid("", opset)])
    made.ir_version = 7
    onnx.checker.check_model(made, full_check=True)
    return made, shapes, {"tail": tail}


def _unfolded(m: onnx.ModelProto) -> list[str]:
    """Transposes a run must have folded: read only by one Transpose/Gemm (or as a MatMul's constant
    weight), and not a graph output."""
    producers = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in m.graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    constants = {t.name for t in m.graph.initializer}
    exposed = {o.name for o in m.graph.output}
    found = []
    for name, uses in readers.items():
        source = producers.get(name)
        if source is None or source.op_type != "Transpose" or name in exposed or len(uses) != 1:
            continue
        node, index = uses[0]
        swap = _attrs(source).get("perm", [1, 0]) == [1, 0]
        if (node.op_type == "Transpose" or (node.op_type == "MatMul" and index == 1 and source.input[0] in constants)
                or (node.op_type == "Gemm" and index < 2 and swap)):
            found.append(f"{source.op_type} -> {node.op_type}")
    return found


@given(transpose_graphs())
def test_property_transposes_fold_where_they_can(
    case: tuple[onnx.ModelProto, dict[str, list[int]], dict[str, Any]],
) -> None:
    original, shapes, drawn = case
    event(f"tail: {drawn['tail']}")
    result = assert_pass_sound(FoldTranspose(), original, rtol=RTOL, atol=ATOL, input_shapes=shapes)
    assert not _unfolded(result.model), _unfolded(result.model)
