"""matmul-to-einsum: structure, numerics, refusal, property; the round trip through einsum-to-matmul."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from passes.core import ir
from passes.testing import assert_equivalent, assert_pass_sound
from passes.testing.strategies import onnx_graphs
from passes.transforms.einsum_to_matmul import EinsumToMatMul
from passes.transforms.matmul_to_einsum import MatMulToEinsum, broadcast_reason
from tests.helpers import init, model, ops, tensor

# float32 tolerance: Einsum and MatMul may sum the k products in different orders.
RTOL, ATOL = 1e-5, 1e-5
# what tests/infra/test_every_pass.py holds every registered pass to.
GENERIC_RTOL, GENERIC_ATOL = 1e-5, 1e-6

Dim = int | str


def matmul_model(
    a: list[Dim], b: list[Dim], *, opset: int = 17, dtype: int = TensorProto.FLOAT, weight: np.ndarray | None = None
) -> onnx.ModelProto:
    """MatMul(a, b) over graph inputs (b an initializer when `weight` is given); output shape inferred."""
    inputs = [tensor("a", a, dtype)] + ([] if weight is not None else [tensor("b", b, dtype)])
    inits = [init("b", weight)] if weight is not None else []
    out_rank = max(len(a), len(b)) - (1 in (len(a), len(b)))  # a 1-D operand's axis is dropped
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    return model([node], inputs, [tensor("y", [None] * out_rank, dtype)], inits, opset=opset)


def _equation(m: onnx.ModelProto) -> str:
    (node,) = m.graph.node
    assert node.op_type == "Einsum"
    return helper.get_attribute_value(node.attribute[0]).decode()


# -- structure ---------------------------------------------------------------------------------------
EQUATIONS = [
    ([3, 4], [4, 5], "ij,jk->ik"),
    (["b", "s", 4], [4, 5], "aij,jk->aik"),
    ([3, 4], [2, 4, 5], "ij,ajk->aik"),
    ([4], [2, 4, 5], "j,ajk->ak"),
    ([2, 3, 4], [4], "aij,j->ai"),
    ([4], [4], "j,j->"),
    (["b", 2, 3, 4], ["b", 2, 4, 5], "abij,abjk->abik"),  # provably equal: letters
    ([2, 5, 3, 4], [5, 4, 6], "abij,bjk->abik"),
    ([1, 3, 4], [2, 4, 5], "...ij,...jk->...ik"),  # static broadcast: an ellipsis
    (["c", 3, 4], ["d", 4, 5], "...ij,...jk->...ik"),  # two symbols may broadcast
    ([2, 1, 3, 4], [6, 4, 5], "a...ij,...jk->a...ik"),
]


@pytest.mark.parametrize(("a", "b", "equation"), EQUATIONS)
def test_structure_equation_per_rank_pair(a: list[Dim], b: list[Dim], equation: str) -> None:
    result = MatMulToEinsum()(matmul_model(a, b))
    assert ops(result.model) == ["Einsum"]
    assert _equation(result.model) == equation
    assert result.stats == {"matmuls_to_einsum": 1, "MatMulAsEinsum": 1}


# -- numerics ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("a", "b", "equation"), EQUATIONS)
def test_numerics_equal_under_onnxruntime(a: list[Dim], b: list[Dim], equation: str) -> None:
    original = matmul_model(a, b)
    rewritten = MatMulToEinsum()(original).model
    for size in (1, 3):  # symbols bound to 1 broadcast, to 3 match
        shapes = {"a": [d if isinstance(d, int) else size for d in a], "b": [d if isinstance(d, int) else 3 for d in b]}
        assert_equivalent(original, rewritten, rtol=RTOL, atol=ATOL, input_shapes=shapes)


def test_numerics_int64_exact_and_float16_stated() -> None:
    ints = matmul_model([2, 3, 4], [2, 4, 5], dtype=TensorProto.INT64)
    assert_pass_sound(MatMulToEinsum(), ints, rtol=0, atol=0)
    halves = matmul_model([2, 3, 8], [8, 5], dtype=TensorProto.FLOAT16)  # 8 products in fp16
    assert_pass_sound(MatMulToEinsum(), halves, rtol=1e-2, atol=1e-2)


# -- refusal -----------------------------------------------------------------------------------------
def _reasons(original: onnx.ModelProto) -> list[str]:
    result = MatMulToEinsum()(original)
    assert not result.modified and ops(result.model) == ["MatMul"]
    return [r.reason for r in result.refusals]


def test_refusal_opset_below_12() -> None:
    original = matmul_model([2, 3], [3, 4], opset=11)
    assert _reasons(original) == ["MatMulAsEinsum: Einsum needs opset >= 12 (the graph has opset 11)"]


def test_refusal_unknown_rank() -> None:
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    original = model(
        nodes,
        [tensor("x", [2, 3, 4]), tensor("shape", [None], TensorProto.INT64)],
        [tensor("y", [None, None, None])],
        [init("w", np.ones((4, 5), np.float32))],
    )
    result = MatMulToEinsum()(original)
    assert [r.reason for r in result.refusals] == ["MatMulAsEinsum: rank of operand 0 is unknown"]
    assert ops(result.model) == ["Reshape", "MatMul"]


def test_refusal_bfloat16() -> None:
    original = matmul_model([2, 3], [3, 4], dtype=TensorProto.BFLOAT16)
    assert _reasons(original) == ["MatMulAsEinsum: Einsum has no bfloat16 (opset 17)"]


def test_refusal_static_one_against_a_dynamic_batch_dim() -> None:
    """ONNX's Einsum shape inference would record the broadcast dim as 1."""
    original = matmul_model([1, 3, 4], ["d", 4, 5])
    assert _reasons(original) == [
        "MatMulAsEinsum: batch dims 1 and 'd' may broadcast at run time (ONNX would infer Einsum's dim as 1)"
    ]


# -- property ----------------------------------------------------------------------------------------
@dataclass
class MatMulCase:
    model: onnx.ModelProto
    input_shapes: dict[str, list[int]]


def _batch_pair(draw: st.DrawFn, position: int) -> list[tuple[Dim, int]]:
    """(declared dim, run-time size) of one batch position in both operands."""
    kind = draw(st.sampled_from(("equal", "broadcast", "symbol", "symbols")))
    size = draw(st.integers(1, 3))
    pairs: dict[str, list[tuple[Dim, int]]] = {
        "equal": [(size, size), (size, size)],
        "broadcast": [(1, 1), (size, size)],
        "symbol": [(f"s{position}", size), (f"s{position}", size)],
        "symbols": [(f"c{position}", draw(st.sampled_from((size, 1)))), (f"d{position}", size)],
    }
    pair = pairs[kind]
    return pair[::-1] if draw(st.booleans()) else pair


@st.composite
def matmul_cases(draw: st.DrawFn) -> MatMulCase:
    """MatMul over ranks 1-4 (mostly 2-4) with batch dims that match, broadcast statically, share a
    symbol, or carry two symbols (bound to equal sizes or to 1 against n)."""
    ranks = [draw(st.sampled_from((2, 3, 4, 2, 3, 4, 1))) for _ in range(2)]
    m, k, n = (draw(st.integers(1, 4)) for _ in range(3))
    batch = [max(r - 2, 0) for r in ranks]
    declared: list[list[Dim]] = [[], []]
    sizes: list[list[int]] = [[], []]
    for position in range(max(batch)):
        pair = _batch_pair(draw, position)
        for side in (0, 1):
            if position >= max(batch) - batch[side]:  # batch dims align from the right
                declared[side].append(pair[side][0])
                sizes[side].append(pair[side][1])
    for side, matrix in enumerate(([m, k], [k, n])):
        tail = matrix if ranks[side] >= 2 else [k]
        declared[side] += tail
        sizes[side] += tail
    opset = draw(st.sampled_from((17, 13, 18, 12)))
    dtype = draw(st.sampled_from((TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64)))
    weight = None
    if draw(st.sampled_from((False, False, True))):
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        weight = rng.standard_normal(sizes[1]).astype(helper.tensor_dtype_to_np_dtype(dtype))
    built = matmul_model(declared[0], declared[1], opset=opset, dtype=dtype, weight=weight)
    return MatMulCase(built, {"a": sizes[0], **({"b": sizes[1]} if weight is None else {})})


def _fixed(a: list[Dim], b: list[Dim], sizes_a: list[int], sizes_b: list[int]) -> MatMulCase:
    return MatMulCase(matmul_model(a, b), {"a": sizes_a, "b": sizes_b})


@given(matmul_cases())
@example(_fixed(["c0", 3, 4], ["d0", 4, 5], [1, 3, 4], [2, 4, 5]))  # two symbols, broadcast at run time
@example(_fixed([2, "c1", 3, 4], ["d1", 4, 5], [2, 3, 3, 4], [1, 4, 5]))
@example(_fixed([4], [4], [4], [4]))
def test_property_sound_then_round_trip_to_bare_matmul(case: MatMulCase) -> None:
    shapes = [list(ir.import_graph(case.model).nodes[0].inputs[i].shape) for i in (0, 1)]
    if broadcast_reason(*shapes) is not None:
        result = MatMulToEinsum()(case.model)
        assert not result.modified and len(result.refusals) == 1
        return
    result = assert_pass_sound(MatMulToEinsum(), case.model, rtol=RTOL, atol=ATOL, input_shapes=case.input_shapes)
    assert ops(result.model) == ["Einsum"]
    back = assert_pass_sound(EinsumToMatMul(), result.model, rtol=RTOL, atol=ATOL, input_shapes=case.input_shapes)
    assert ops(back.model) == ["MatMul"]  # MatMul's equations need no Transpose or Reshape
    assert_equivalent(case.model, back.model, rtol=RTOL, atol=ATOL, input_shapes=case.input_shapes)


@given(onnx_graphs())
def test_property_generic_graphs_round_trip(original: onnx.ModelProto) -> None:
    """On the generated graphs every registered pass meets (at that test's tolerance), every MatMul
    becomes an Einsum and comes back as exactly the original op list."""
    raised = assert_pass_sound(MatMulToEinsum(), original, rtol=GENERIC_RTOL, atol=GENERIC_ATOL)
    assert "MatMul" not in ops(raised.model), raised.refusals
    back = assert_pass_sound(EinsumToMatMul(), raised.model, rtol=GENERIC_RTOL, atol=GENERIC_ATOL)
    assert ops(back.model) == ops(original)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
def test_samples_round_trip(sample_model, name: str, idiom: str) -> None:  # type: ignore[no-untyped-def]
    original = sample_model(name, idiom=idiom)
    raised = MatMulToEinsum()(original)
    assert not raised.refusals and "MatMul" not in ops(raised.model)
    back = EinsumToMatMul()(raised.model)
    assert ir.op_histogram(back.model) == ir.op_histogram(original)
    for shape in ([1, 5], [2, 3]):
        feeds = {"input_ids": shape} | ({"attention_mask": shape} if name == "tiny-bert" else {})
        assert_equivalent(original, raised.model, rtol=RTOL, atol=ATOL, input_shapes=feeds)
        assert_equivalent(original, back.model, rtol=RTOL, atol=ATOL, input_shapes=feeds)
