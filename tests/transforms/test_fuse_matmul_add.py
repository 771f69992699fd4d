"""fuse-matmul-add: structure, numerics, refusal, property.

Tolerances: Gemm may add the bias inside the dot product's accumulation instead of after it, so
float32 compares at rtol=1e-5, atol=1e-5 (float64: 1e-12; float16, one rounding fewer: 2e-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.testing import assert_equivalent, assert_pass_sound
from passes.transforms.fuse_matmul_add import FuseMatMulAdd
from tests.helpers import init, model, ops, tensor

TOLERANCE = {np.float32: (1e-5, 1e-5), np.float64: (1e-12, 1e-12), np.float16: (2e-3, 2e-3)}
RTOL, ATOL = TOLERANCE[np.float32]
RNG = np.random.default_rng(0)


def _weight(k: int, n: int, dtype: Any = np.float32) -> np.ndarray:
    return (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)


def _linear(x: Sequence[Any] | None, bias: Sequence[Any] | None = (4,), *, w: Sequence[Any] = (6, 4),
            w_const: bool = True, bias_const: bool = True, bias_first: bool = False, opset: int = 17,
            elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y = Add(MatMul(x, W), b); W and b are constants unless `*_const=False` (then graph inputs of
    that shape). A shape of None makes the tensor's rank unknowable (a Reshape by a run-time shape)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Add", ["b", "mm"] if bias_first else ["mm", "b"], ["y"])]
    inputs, inits = [], []
    for name, shape, const in (("x", x, False), ("w", w, w_const), ("b", bias, bias_const)):
        if shape is None:
            nodes.insert(0, helper.make_node("Reshape", [f"{name}0", "s"], [name]))
            inputs += [tensor(f"{name}0", [4], elem), tensor("s", [None], TensorProto.INT64)]
        elif const:
            inits.append(init(name, (RNG.standard_normal(shape) / np.sqrt(6)).astype(dtype)))
        else:
            inputs.append(tensor(name, list(shape), elem))
    x_rank = len(x) if x is not None else 2
    mm_rank = len(w) - 1 if x_rank == 1 else max(x_rank, len(w))
    rank = max(mm_rank, len(bias) if bias is not None else 1)
    return model(nodes, inputs, [tensor("y", [None] * rank, elem)], inits, opset=opset)


def _reasons(result: Any) -> list[str]:
    return [r.reason for r in result.refusals]


# -- structure ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_first", [False, True])
def test_structure_2d_becomes_one_gemm(bias_first: bool) -> None:
    original = _linear(["m", 6], bias_first=bias_first)
    result = FuseMatMulAdd()(original)
    assert ops(result.model) == ["Gemm"]
    assert list(result.model.graph.node[0].input) == ["x", "w", "b"]
    assert result.stats == {"matmul_adds_fused": 1, "MatMulAddToGemm": 1}
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL, input_shapes={"x": [5, 6]})


def test_structure_static_rank3_reshapes_with_constant_shapes() -> None:
    original = _linear([2, 3, 6], [1, 1, 4])
    result = FuseMatMulAdd()(original)
    assert ops(result.model) == ["Reshape", "Gemm", "Reshape"]
    shapes = {t.name: numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}
    reshapes = [n for n in result.model.graph.node if n.op_type == "Reshape"]
    assert [shapes[n.input[1]] for n in reshapes] == [[-1, 6], [2, 3, 4]]
    gemm_bias = shapes[result.model.graph.node[1].input[2]]
    assert np.asarray(gemm_bias).shape == (4,)  # [1, 1, 4] flattened: Gemm's C is at most 2-D
    assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("opset", "shape_ops"), [(17, ["Shape"]), (13, ["Shape", "Slice"])])
def test_structure_dynamic_leading_dims_read_at_run_time(opset: int, shape_ops: list[str]) -> None:
    original = _linear(["batch", "seq", 6], opset=opset)
    result = FuseMatMulAdd()(original)
    assert ops(result.model) == ["Reshape", "Gemm", *shape_ops, "Concat", "Reshape"]
    shape_node = result.model.graph.node[2]
    if opset >= 15:
        assert {a.name: a.i for a in shape_node.attribute} == {"start": 0, "end": -1}
    for dims in ([1, 1, 6], [3, 5, 6], [2, 0, 6]):  # a zero-sized seq needs allowzero (opset >= 14)
        if 0 in dims and opset < 14:
            continue
        assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL, input_shapes={"x": dims})


def test_structure_keep_matmul_normalises_and_schedules_the_pair() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Neg", ["x"], ["other"]),  # between the pair
        helper.make_node("Add", ["b", "mm"], ["y"]),
    ]
    original = model(nodes, [tensor("x", ["batch", "seq", 6])],
                     [tensor("y", ["batch", "seq", 4]), tensor("other", ["batch", "seq", 6])],
                     [init("w", _weight(6, 4)), init("b", np.ones(4, np.float32))])
    result = FuseMatMulAdd(high_rank="keep-matmul")(original)
    assert ops(result.model) == ["Neg", "MatMul", "Add"]
    matmul, add = result.model.graph.node[1:]
    assert add.input[0] == matmul.output[0] and add.input[1] == "b" and add.output[0] == "y"
    assert result.stats == {"matmul_adds_fused": 1, "BiasAddAfterMatMul": 1}
    assert_equivalent(original, result.model, rtol=0, atol=0)
    assert not FuseMatMulAdd(high_rank="keep-matmul")(result.model).modified


def test_structure_keep_matmul_still_makes_gemms_of_2d_pairs() -> None:
    result = FuseMatMulAdd(high_rank="keep-matmul")(_linear([5, 6], bias_first=True))
    assert ops(result.model) == ["Gemm"]


@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
def test_structure_samples_leave_no_projection_pairs(sample_model, idiom: str) -> None:  # type: ignore[no-untyped-def]
    llama = sample_model("tiny-llama", idiom=idiom, layers=2)
    result = FuseMatMulAdd()(llama)
    # q/k/v/o carry biases; gate/up/down, lm_head and the attention MatMuls have none.
    assert result.stats["ReshapeMatMulAddToGemm"] == 8
    assert sum(n.op_type == "Gemm" for n in result.model.graph.node) == 8
    assert _bias_pairs(result.model) == 0 and _bias_pairs(llama) == 8
    bert = FuseMatMulAdd()(sample_model("tiny-bert", idiom=idiom, layers=2))
    assert sum(n.op_type == "Gemm" for n in bert.model.graph.node) == 12  # q/k/v/o + 2 MLP per layer
    assert _bias_pairs(bert.model) == 0


def _bias_pairs(m: onnx.ModelProto) -> int:
    """MatMuls whose output feeds an Add with a constant other input."""
    constants = {t.name for t in m.graph.initializer}
    constants |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    matmuls = {n.output[0] for n in m.graph.node if n.op_type == "MatMul"}
    return sum(1 for n in m.graph.node if n.op_type == "Add" and set(n.input) & matmuls and set(n.input) & constants)


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
@pytest.mark.parametrize("high_rank", ["reshape-gemm", "keep-matmul"])
def test_numerics_samples(sample_model, idiom: str, high_rank: str) -> None:  # type: ignore[no-untyped-def]
    for name in ("tiny-llama", "tiny-bert"):
        original = sample_model(name, idiom=idiom)
        result = FuseMatMulAdd(high_rank=high_rank)(original)  # type: ignore[arg-type]
        onnx.checker.check_model(result.model, full_check=True)
        for dims in ([1, 5], [3, 9]):
            shapes = {i.name: dims for i in original.graph.input}
            assert_equivalent(original, result.model, rtol=RTOL, atol=ATOL, input_shapes=shapes)


def test_numerics_float16() -> None:
    original = _linear([2, 7, 6], elem=TensorProto.FLOAT16)
    result = FuseMatMulAdd()(original)
    assert ops(result.model) == ["Reshape", "Gemm", "Reshape"]
    rtol, atol = TOLERANCE[np.float16]
    assert_equivalent(original, result.model, rtol=rtol, atol=atol)


# -- refusals -------------------------------------------------------------------------------------
REFUSALS = [  # (case, kwargs of _linear, reason)
    ("vector", {"x": [6]}, "MatMulAddToGemm: MatMul has a 1-D operand (vector semantics)"),
    ("batched", {"x": [5, 6], "w": [2, 6, 4]}, "MatMulAddToGemm: weight is 3-D (batched weights)"),
    ("unknown rank", {"x": None}, "MatMulAddToGemm: MatMul operand rank is unknown"),
    ("2-D bias rank 3", {"x": [5, 6], "bias": [1, 1, 4]},
     "MatMulAddToGemm: bias rank 3 > 2 would grow the output's rank"),
    ("2-D bias grows M", {"x": [1, 6], "bias": [3, 4]},
     "MatMulAddToGemm: bias [3, 4] does not broadcast one way to the output [1, 4]"),
    ("2-D symbolic bias", {"x": ["m", 6], "bias": ["n"], "bias_const": False},
     "MatMulAddToGemm: bias [n] does not broadcast one way to the output [m, 4]"),
    ("bias of unknown shape", {"x": [5, 6], "bias": None}, "MatMulAddToGemm: bias shape is unknown"),
    ("opset 10", {"x": [5, 6], "opset": 10}, "MatMulAddToGemm: opset 10 < 11"),
    ("int32", {"x": [5, 6], "elem": TensorProto.INT32},
     "MatMulAddToGemm: dtype int32 is not a float type (Gemm is fused for floats only)"),
    ("[seq, N] bias", {"x": ["batch", 7, 6], "bias": [7, 4]},
     "ReshapeMatMulAddToGemm: bias [7, 4] spans more than the last axis"),
    ("bias grows rank", {"x": [2, 3, 6], "bias": [1, 1, 1, 4]},
     "ReshapeMatMulAddToGemm: bias rank 4 > output rank 3 would grow the output"),
    ("symbolic last dim", {"x": [2, 3, 6], "bias": ["n"], "bias_const": False},
     "ReshapeMatMulAddToGemm: bias [n] does not match the output's last dim 4"),
    ("dynamic K", {"x": [2, 3, "k"], "w": ["k", 4], "w_const": False}, "ReshapeMatMulAddToGemm: K is dynamic"),
    ("dynamic N", {"x": [2, 3, 6], "w": [6, "n"], "w_const": False, "bias": []},
     "ReshapeMatMulAddToGemm: N is dynamic"),
    ("K is 0", {"x": [2, 3, 0], "w": [0, 4]}, "ReshapeMatMulAddToGemm: K is 0 (Reshape to [-1, 0] is ambiguous)"),
    ("zero dim before 14", {"x": [2, 0, 6], "opset": 13},
     "ReshapeMatMulAddToGemm: a zero-sized leading dim needs Reshape's allowzero (opset >= 14)"),
]


@pytest.mark.parametrize(("kwargs", "reason"), [pytest.param(k, r, id=c) for c, k, r in REFUSALS])
def test_refusal(kwargs: dict[str, Any], reason: str) -> None:
    original = _linear(**kwargs)
    result = FuseMatMulAdd()(original)
    assert not result.modified and ops(result.model) == ops(original)
    assert _reasons(result) == [reason]


def test_refusal_keep_matmul_gives_the_same_bias_reasons() -> None:
    result = FuseMatMulAdd(high_rank="keep-matmul")(_linear(["batch", 7, 6], [7, 4], bias_first=True))
    assert not result.modified
    assert _reasons(result) == ["BiasAddAfterMatMul: bias [7, 4] spans more than the last axis"]


def test_refusal_shared_matmul_output_stays() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"]),
             helper.make_node("Relu", ["mm"], ["z"])]
    original = model(nodes, [tensor("x", [5, 6])], [tensor("y", [5, 4]), tensor("z", [5, 4])],
                     [init("w", _weight(6, 4)), init("b", np.ones(4, np.float32))])
    result = FuseMatMulAdd()(original)
    assert not result.modified
    assert _reasons(result) == ["MatMulAddToGemm: intermediate 'mm' is used outside the pattern"]


def test_refusal_add_of_a_matmul_with_itself_is_not_a_bias() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "mm"], ["y"])]
    original = model(nodes, [tensor("x", [5, 6])], [tensor("y", [5, 4])], [init("w", _weight(6, 4))])
    result = FuseMatMulAdd()(original)
    assert not result.modified and not result.refusals


# -- property -------------------------------------------------------------------------------------
Dim = tuple[int, "str | None"]  # (concrete size, symbol or None when static)
BIAS_KINDS = ("scalar", "one", "n", "ones_n", "m1", "mn", "lead_n")
LAST_AXIS_KINDS = ("scalar", "one", "n", "ones_n")  # the only ones rank(a) > 2 may fuse
SYMBOLS = ("batch", "seq", "heads")


def _bias_dims(kind: str, lead: list[Dim], n: int) -> list[Dim]:
    m = lead[-1] if lead else (1, None)
    out = [*lead, (n, None)]
    return {"scalar": [], "one": [(1, None)], "n": [(n, None)], "ones_n": [(1, None)] * len(lead) + [(n, None)],
            "m1": [m, (1, None)], "mn": out, "lead_n": [m, (n, None)]}[kind]


@st.composite
def matmul_add_graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, list[int]], dict[str, Any]]:
    """Add(MatMul(x, W), b) in the spellings the pass must fuse or refuse: x of rank 1-4 with static
    or symbolic leading dims (sizes >= 2), W and b constants or inputs, every bias broadcast kind,
    either Add order, sometimes a node between the pair. Returns the model, feed shapes and the draw."""
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rank = draw(st.sampled_from((1, 2, 2, 3, 3, 4)))  # rank 1 is only ever refused
    k, n = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    symbols: dict[str, int] = {}
    lead: list[Dim] = []
    for i in range(rank - 1):
        label = draw(st.sampled_from((None, *SYMBOLS[:i + 1])))
        size = draw(st.integers(2, 4))
        lead.append((symbols.setdefault(label, size) if label else size, label))
    drawn = {"dtype": dtype, "rank": rank, "kind": draw(st.sampled_from(BIAS_KINDS if rank >= 2 else LAST_AXIS_KINDS)),
             "bias_first": draw(st.booleans()), "between": draw(st.booleans()), "w_const": draw(st.booleans()),
             "b_const": draw(st.booleans()), "opset": draw(st.sampled_from([11, 13, 17, 18]))}
    bias = _bias_dims(drawn["kind"], lead, n)
    # a constant bias has static dims: one facing a symbolic dim cannot be proven to broadcast
    drawn["const_vs_symbol"] = drawn["b_const"] and any(label for _, label in bias)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    inputs, inits, shapes = [], [], {}
    operands = (("x", [*lead, (k, None)], False), ("w", [(k, None), (n, None)], drawn["w_const"]),
                ("b", bias, drawn["b_const"]))
    for name, dims, const in operands:
        concrete = [size for size, _ in dims]
        if const:
            scale = 1.0 / np.sqrt(k) if name == "w" else 1.0
            inits.append(numpy_helper.from_array((scale * rng.standard_normal(concrete)).astype(dtype), name))
        else:
            inputs.append(helper.make_tensor_value_info(name, elem, [label or size for size, label in dims]))
            shapes[name] = concrete
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"])]
    outputs = [helper.make_tensor_value_info("y", elem, [None] * max(rank, len(bias)))]
    if drawn["between"]:
        nodes.append(helper.make_node("Neg", ["x"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", elem, [None] * rank))
    nodes.append(helper.make_node("Add", ["b", "mm"] if drawn["bias_first"] else ["mm", "b"], ["y"]))
    made = helper.make_model(helper.make_graph(nodes, "matmul_add", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", drawn["opset"])])
    made.ir_version = 7
    onnx.checker.check_model(made, full_check=True)
    return made, shapes, drawn


def _should_fire(drawn: dict[str, Any], high_rank: str) -> bool:
    if drawn["rank"] < 2:
        return False
    if drawn["rank"] == 2:
        return not drawn["const_vs_symbol"]
    if drawn["kind"] not in LAST_AXIS_KINDS:
        return False
    return high_rank == "reshape-gemm" or drawn["bias_first"] or drawn["between"]


@given(matmul_add_graphs(), st.sampled_from(["reshape-gemm", "keep-matmul"]))
def test_property_fuses_exactly_the_safe_pairs(
    case: tuple[onnx.ModelProto, dict[str, list[int]], dict[str, Any]], high_rank: str
) -> None:
    original, shapes, drawn = case
    event(f"rank {drawn['rank']}, bias {drawn['kind']}, {high_rank}")
    rtol, atol = TOLERANCE[drawn["dtype"]]
    fuse = FuseMatMulAdd(high_rank=high_rank)  # type: ignore[arg-type]
    result = assert_pass_sound(fuse, original, rtol=rtol, atol=atol, input_shapes=shapes)
    assert result.modified == _should_fire(drawn, high_rank), (drawn, _reasons(result))
    after = ops(result.model)
    if result.modified and "Gemm" in after:
        assert "MatMul" not in after and "Add" not in after
    elif result.modified:  # keep-matmul: Add(mm, b) right after its MatMul
        index = after.index("MatMul")
        matmul, add = result.model.graph.node[index:index + 2]
        assert add.op_type == "Add" and add.input[0] == matmul.output[0]
