"""einsum-to-matmul: structure, numerics, refusal, property (random two-operand equations)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from passes.testing import assert_equivalent, assert_pass_sound, run_model
from passes.transforms._einsum import EinsumError, parse
from passes.transforms.einsum_to_matmul import EinsumToMatMul
from tests.helpers import init, model, ops, tensor

# float32 tolerance: the lowering reassociates the contraction's sums.
RTOL, ATOL = 1e-5, 1e-5

Dim = int | str


def _concrete(shape: list[Dim], size: int = 3) -> list[int]:
    return [d if isinstance(d, int) else size for d in shape]


def einsum_model(
    equation: str,
    shapes: list[list[Dim]],
    *,
    opset: int = 17,
    dtype: int = TensorProto.FLOAT,
    constants: dict[int, np.ndarray] | None = None,
    rank: int | None = None,
) -> onnx.ModelProto:
    """One Einsum over graph inputs x0, x1, ... (operand i is an initializer if in `constants`);
    the output's rank is numpy's unless given."""
    constants = constants or {}
    names = [f"x{i}" for i in range(len(shapes))]
    if rank is None:
        rank = np.einsum(equation, *[np.zeros(_concrete(s)) for s in shapes]).ndim
    inputs = [tensor(n, s, dtype) for i, (n, s) in enumerate(zip(names, shapes)) if i not in constants]
    inits = [init(names[i], v) for i, v in constants.items()]
    node = helper.make_node("Einsum", names, ["y"], equation=equation)
    return model([node], inputs, [tensor("y", [None] * rank, dtype)], inits, opset=opset)


# -- structure ---------------------------------------------------------------------------------------
TRANSFORMER_EQUATIONS = [
    ("bij,bjk->bik", [["b", 3, 4], ["b", 4, 5]], ["MatMul"]),
    ("...ij,...jk->...ik", [["b", 2, 3, 4], ["b", 2, 4, 5]], ["MatMul"]),
    ("bhqd,bhkd->bhqk", [["b", 2, "q", 4], ["b", 2, "k", 4]], ["Transpose", "MatMul"]),
    ("bqhd,bkhd->bhqk", [["b", "q", 2, 4], ["b", "k", 2, 4]], ["Transpose", "Transpose", "MatMul"]),
    ("bhqk,bhkd->bhqd", [["b", 2, "q", "k"], ["b", 2, "k", 4]], ["MatMul"]),
    ("bhqk,bkhd->bqhd", [["b", 2, "q", "k"], ["b", "k", 2, 4]], ["Transpose", "MatMul", "Transpose"]),
    ("bsd,hd->bsh", [["b", "s", 4], [5, 4]], ["Transpose", "MatMul"]),
    ("bsd,dh->bsh", [["b", "s", 4], [4, 5]], ["MatMul"]),
    ("bi,ij->bj", [["b", 3], [3, 4]], ["MatMul"]),
    ("i,j->ij", [["i"], ["j"]], ["Unsqueeze", "Mul"]),
    ("ij->ji", [[3, 4]], ["Transpose"]),
    ("ij->i", [[3, 4]], ["ReduceSum"]),
    ("bi,bi->b", [["b", 3], ["b", 3]], ["Unsqueeze", "Unsqueeze", "MatMul", "Squeeze"]),
    ("abc,cd->dab", [["a", "b", 4], [4, 5]], ["MatMul", "Transpose"]),
    ("ijk,jkl->il", [[2, 3, 4], [3, 4, 5]], ["Reshape", "Reshape", "MatMul"]),  # static targets
]


@pytest.mark.parametrize(("equation", "shapes", "expected"), TRANSFORMER_EQUATIONS)
def test_structure_transformer_equations(equation: str, shapes: list[list[Dim]], expected: list[str]) -> None:
    result = EinsumToMatMul()(einsum_model(equation, shapes))
    assert ops(result.model) == expected
    rule = "LowerBinaryEinsum" if "," in equation else "LowerUnaryEinsum"
    assert result.stats == {"einsums_lowered": 1, rule: 1}


@pytest.mark.parametrize(
    ("opset", "expected"),
    [
        (13, ["Shape", "Gather", "ReduceProd", "Concat", "Reshape"]),  # [0 (copy x), y*z]
        (17, ["Shape", "Gather", "Gather", "ReduceProd", "Concat", "Reshape"]),  # [x, y*z], allowzero=1
    ],
)
def test_structure_dynamic_merge_reads_sizes_at_run_time(opset: int, expected: list[str]) -> None:
    """Two dynamic dims merged into one MatMul axis: the target is built from Shape, never -1."""
    original = einsum_model("xyz,zyw->wx", [["x", "y", "z"], ["z", "y", "w"]], opset=opset)
    result = EinsumToMatMul()(original)
    assert ops(result.model) == expected + ["Transpose", "Shape", "Gather", "Concat", "Reshape", "MatMul", "Transpose"]
    constants = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert all(-1 not in c.tolist() for c in constants)


@pytest.mark.parametrize("opset", [12, 13, 18])
def test_structure_axes_follow_the_opset(opset: int) -> None:
    result = EinsumToMatMul()(einsum_model("bi,bi->b", [[2, 3], [2, 3]], opset=opset))
    unsqueeze = next(n for n in result.model.graph.node if n.op_type == "Unsqueeze")
    assert (len(unsqueeze.input) == 2) == (opset >= 13)
    assert any(a.name == "axes" for a in unsqueeze.attribute) == (opset < 13)


# -- numerics ----------------------------------------------------------------------------------------
def test_numerics_attention_with_dynamic_dims_and_constant_weight() -> None:
    weight = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    original = einsum_model("bsd,hd->bsh", [["b", "s", 4], [6, 4]], constants={1: weight})
    lowered = EinsumToMatMul()(original).model
    for b, s in ((1, 1), (2, 5), (3, 0)):  # seq 0: an empty tensor reshapes correctly too
        assert_equivalent(original, lowered, rtol=RTOL, atol=ATOL, input_shapes={"x0": [b, s, 4]})


@pytest.mark.parametrize(
    ("opset", "sizes"), [(17, (2, 3, 4, 5)), (13, (2, 3, 4, 5)), (17, (1, 3, 0, 2)), (17, (2, 0, 4, 5))]
)
def test_numerics_dynamic_reshapes_and_empty_dims(opset: int, sizes: tuple[int, int, int, int]) -> None:
    """Merged dynamic dims, some of them empty. Checked against numpy: onnxruntime's own Einsum
    dies with SIGFPE on this equation when y = 0 (onnxruntime 1.32)."""
    x, y, z, w = sizes
    original = einsum_model("xyz,zyw->wx", [["x", "y", "z"], ["z", "y", "w"]], opset=opset)
    lowered = EinsumToMatMul()(original).model
    assert any(n.op_type == "Reshape" and n.attribute for n in lowered.graph.node) == (opset >= 14)  # allowzero
    rng = np.random.default_rng(0)
    feeds = {
        "x0": rng.standard_normal((x, y, z)).astype(np.float32),
        "x1": rng.standard_normal((z, y, w)).astype(np.float32),
    }
    (got,) = run_model(lowered, feeds).values()
    np.testing.assert_allclose(got, np.einsum("xyz,zyw->wx", feeds["x0"], feeds["x1"]), rtol=RTOL, atol=ATOL)


def test_numerics_float16_and_int64() -> None:
    """float16 (stated: rtol=atol=1e-2, contraction of 8 products) and int64 (exact)."""
    fp16 = einsum_model("bqhd,bkhd->bhqk", [[2, 3, 2, 8], [2, 4, 2, 8]], dtype=TensorProto.FLOAT16)
    assert_pass_sound(EinsumToMatMul(), fp16, rtol=1e-2, atol=1e-2)
    ints = einsum_model("bqhd,bkhd->bhqk", [[2, 3, 2, 8], [2, 4, 2, 8]], dtype=TensorProto.INT64)
    assert_pass_sound(EinsumToMatMul(), ints, rtol=0, atol=0)


def test_numerics_broadcast_contraction_of_a_static_one() -> None:
    """Einsum broadcasts a contracted index of size 1: sum_j A[i,0] B[j,k] = A[i,0] * sum_j B[j,k]."""
    original = einsum_model("ij,jk->ik", [["i", 1], ["j", "k"]])
    result = assert_pass_sound(EinsumToMatMul(), original, rtol=RTOL, atol=ATOL)
    assert ops(result.model) == ["ReduceSum", "Unsqueeze", "ReduceSum", "Mul"]


# -- refusal -----------------------------------------------------------------------------------------
def _refusals(original: onnx.ModelProto) -> list[str]:
    result = EinsumToMatMul()(original)
    assert not result.modified and ops(result.model) == ops(original)
    return [r.reason for r in result.refusals]


def test_refusal_three_operands() -> None:
    original = einsum_model("ij,jk,kl->il", [[2, 3], [3, 4], [4, 5]])
    assert _refusals(original) == ["LowerBinaryEinsum: 3 operands: only 1-2 are lowered"]


@pytest.mark.parametrize(
    ("equation", "shapes", "reason"),
    [
        ("ii,ij->j", [[3, 3], [3, 4]], "LowerBinaryEinsum: index i repeats in operand 0"),
        ("ii->i", [[3, 3]], "LowerUnaryEinsum: index i repeats in operand 0"),
        ("ij,jj->i", [[3, 4], [4, 4]], "LowerBinaryEinsum: index j repeats in operand 1"),
    ],
)
def test_refusal_diagonal(equation: str, shapes: list[list[Dim]], reason: str) -> None:
    assert _refusals(einsum_model(equation, shapes)) == [reason]


def test_refusal_unknown_rank_with_ellipsis() -> None:
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Einsum", ["r", "w"], ["y"], equation="...ij,jk->...ik"),
    ]
    original = model(
        nodes,
        [tensor("x", [2, 3, 4]), tensor("shape", [None], TensorProto.INT64)],
        [tensor("y", [None, None, None])],
        [init("w", np.ones((4, 5), np.float32))],
    )
    assert _refusals(original) == ["LowerBinaryEinsum: rank of operand 0 is unknown (needed for the ellipsis)"]


def test_refusal_element_type_without_matmul() -> None:
    original = einsum_model("ij,jk->ik", [[2, 3], [3, 4]], dtype=TensorProto.INT8)
    assert _refusals(original) == ["LowerBinaryEinsum: dtype int8 is not lowered (only float16/32/64 and int32/64)"]


def test_refusal_ellipsis_missing_from_the_output() -> None:
    """onnxruntime rejects this equation at run time; the pass leaves it alone with a reason."""
    original = einsum_model("...ij,...jk->ik", [[2, 3, 4], [2, 4, 5]], rank=2)
    assert _refusals(original) == ["LowerBinaryEinsum: the operands have an ellipsis but the output does not"]


@pytest.mark.parametrize(
    ("equation", "ranks", "reason"),
    [
        ("...ij,...jk->...ik", [3, 4], "ellipsis covers 1 dims in operand 0 but 2 in operand 1"),
        ("Ab,bc", [2, 2], "implicit output with upper-case index A (onnxruntime rejects it)"),
        ("ij,jk->il", [2, 2], "output index l is in no operand"),
        ("ij,jk->ii", [2, 2], "index i repeats in the output"),
        ("ij,jk->ik", [3, 2], "operand 0 has rank 3 but the equation gives it 2 indices"),
        ("ij,jk->ik", [2], "the equation has 2 operand terms but the node has 1 inputs"),
        ("i.j,jk->ik", [2, 2], "invalid character '.' in the equation"),
        ("...i...,i->i", [3, 1], "operand 0 has two ellipses"),
    ],
)
def test_refusal_reasons_of_the_equation_parser(equation: str, ranks: list[int], reason: str) -> None:
    """Equations ONNX's checker already rejects cannot be built as models; their reasons are the parser's."""
    with pytest.raises(EinsumError, match=re.escape(reason)):
        parse(equation, ranks)


def test_refusal_implicit_upper_case() -> None:
    original = einsum_model("Ab,bc", [[2, 3], [3, 4]], rank=2)
    reason = "LowerBinaryEinsum: implicit output with upper-case index A (onnxruntime rejects it)"
    assert _refusals(original) == [reason]


def test_unary_transpose_of_any_type_is_lowered() -> None:
    original = einsum_model("ij->ji", [[2, 3]], dtype=TensorProto.INT8)
    assert ops(EinsumToMatMul()(original).model) == ["Transpose"]


# -- property ----------------------------------------------------------------------------------------
# weighted towards what MatMul lowers: contractions with free and batch indices around them.
ROLES = ("contracted",) * 3 + ("left", "right", "batch") * 2 + ("left_sum", "right_sum")
BROADCAST = (None, None, None, None, None, None, 0, 1)  # which operand, if any, has a size-1 copy


@dataclass
class EinsumCase:
    model: onnx.ModelProto
    input_shapes: dict[str, list[int]]


@st.composite
def einsum_cases(draw: st.DrawFn) -> EinsumCase:
    """A random one- or two-operand equation: batch / contracted / free / summed indices, size-1
    broadcasting, an ellipsis, random output order or implicit output, dynamic dims, constants."""
    operands = draw(st.sampled_from((2, 2, 2, 1)))
    count = draw(st.integers(1, 5))
    explicit = draw(st.sampled_from((True, True, True, False))) or operands == 1
    pool = string.ascii_letters if explicit else string.ascii_lowercase
    letters = draw(st.permutations(pool))[:count]
    roles = ROLES if operands == 2 else ("left", "left_sum")
    terms: list[list[str]] = [[], []]
    dims: list[list[int]] = [[], []]
    out: list[str] = []
    drawn = [draw(st.sampled_from(roles)) for _ in letters]
    if operands == 2 and "contracted" not in drawn and draw(st.sampled_from((True, True, True, False))):
        drawn[0] = "contracted"  # mostly a real contraction; sometimes a broadcasting product
    for letter, role in zip(letters, drawn):
        size = draw(st.integers(1, 4))
        sides = {"batch": (0, 1), "contracted": (0, 1), "right": (1,), "right_sum": (1,)}.get(role, (0,))
        one = draw(st.sampled_from(BROADCAST)) if len(sides) == 2 else None
        for side in sides:
            terms[side].append(letter)
            dims[side].append(1 if side == one else size)
        if role in ("batch", "left", "right"):
            out.append(letter)
    width = draw(st.integers(0, 2))
    holders = draw(st.sampled_from(((), (0,), (1,), (0, 1)) if operands == 2 else ((), (0,))))
    sizes = [draw(st.integers(1, 4)) for _ in range(width)]
    for side in holders:
        at = draw(st.integers(0, len(terms[side])))
        terms[side][at:at] = ["..."]
        one = draw(st.sampled_from(BROADCAST)) if len(holders) == 2 else None
        dims[side][at:at] = [1 if side == one else s for s in sizes]
    out = draw(st.permutations(out)) + ([] if not holders else ["..."])
    if holders:
        at = draw(st.integers(0, len(out) - 1))
        out = out[:-1]
        out[at:at] = ["..."]
    spacer = " " if draw(st.booleans()) else ""
    lhs = f",{spacer}".join("".join(t) for t in terms[:operands])
    equation = f"{lhs}{spacer}->{spacer}{''.join(out)}" if explicit else lhs
    return _case(draw, equation, dims[:operands], [terms[i] for i in range(operands)])


def _case(draw: st.DrawFn, equation: str, dims: list[list[int]], terms: list[list[str]]) -> EinsumCase:
    """Symbolic dims (never on a static 1 that a contraction broadcasts) and a constant operand."""
    broadcast = {(s, a) for s, d in enumerate(dims) for a, size in enumerate(d) if size == 1}
    shapes: list[list[Dim]] = []
    for side, sizes in enumerate(dims):
        shapes.append([
            f"d{side}_{axis}" if (side, axis) not in broadcast and draw(st.sampled_from((True, False, False))) else size
            for axis, size in enumerate(sizes)
        ])
    dtype = draw(st.sampled_from((TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64)))
    constants = {}
    if len(dims) == 2 and draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        constants[1] = rng.standard_normal(dims[1]).astype(helper.tensor_dtype_to_np_dtype(dtype))
        if dtype == TensorProto.INT64:
            constants[1] = rng.integers(-3, 4, dims[1]).astype(np.int64)
    opset = draw(st.sampled_from((17, 18, 13, 12)))
    rank = np.einsum(equation, *[np.zeros(d) for d in dims]).ndim
    built = einsum_model(equation, [s if i not in constants else d for i, (s, d) in enumerate(zip(shapes, dims))],
                         opset=opset, dtype=dtype, constants=constants, rank=rank)
    return EinsumCase(built, {f"x{i}": d for i, d in enumerate(dims) if i not in constants})


def _pinned(
    equation: str, shapes: list[list[int]], dynamic: tuple[tuple[int, int], ...] = (), opset: int = 17
) -> EinsumCase:
    """A fixed case; the dims at (operand, axis) in `dynamic` are declared symbolic."""
    declared: list[list[Dim]] = [
        [f"d{i}_{axis}" if (i, axis) in dynamic else size for axis, size in enumerate(sizes)]
        for i, sizes in enumerate(shapes)
    ]
    rank = np.einsum(equation, *[np.zeros(s) for s in shapes]).ndim
    built = einsum_model(equation, declared, opset=opset, rank=rank)
    return EinsumCase(built, {f"x{i}": s for i, s in enumerate(shapes)})


@given(einsum_cases())
@example(_pinned("bhqd,bhkd->bhqk", [[2, 2, 3, 4], [1, 2, 5, 4]]))  # broadcast batch
@example(_pinned("i...j,j...k->...ik", [[3, 1, 4], [4, 2, 5]]))  # ellipsis mid-term, broadcast
@example(_pinned("ab,cd->dcab", [[2, 3], [3, 2]]))  # outer product, output transposed
@example(_pinned("bmk,bkn->nbm", [[2, 3, 4], [2, 4, 5]]))  # output permutations that are 3-cycles
@example(_pinned("bmk,bkn->mnb", [[2, 3, 4], [2, 4, 5]]))
@example(_pinned("ab,cd->", [[2, 3], [3, 2]]))  # everything summed away
@example(_pinned("Ab,bA->", [[2, 3], [3, 2]]))
@example(_pinned("ab,ab", [[2, 2], [2, 2]], dynamic=((0, 1), (1, 0), (1, 1))))  # contracted slot, mixed static
@example(_pinned("ab,b->b", [[1, 1], [2]]))  # the output dim broadcasts: ONNX infers 1
@example(_pinned("bxyz,bzyw->bwx", [[2, 3, 2, 4], [2, 4, 2, 3]], dynamic=((0, 0), (0, 1), (0, 2), (1, 3)), opset=12))
@example(_pinned("bxyz,bzyw->bwx", [[2, 3, 2, 4], [1, 4, 2, 3]], dynamic=((0, 1), (0, 2), (1, 2), (1, 3)), opset=18))
def test_property_sound_and_no_einsum_left(case: EinsumCase) -> None:
    result = assert_pass_sound(EinsumToMatMul(), case.model, rtol=RTOL, atol=ATOL, input_shapes=case.input_shapes)
    assert "Einsum" not in ops(result.model), result.refusals
    assert result.stats["einsums_lowered"] == 1
