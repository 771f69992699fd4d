"""decompose-rms-norm: structure (Div / Reciprocal forms, Mul / Pow squares), numerics against
onnxruntime *and* onnx.reference (both really compare: a wrong decomposition fails), refusal, property
(ranks, axes, epsilons, stash types, dtypes, dynamic dims, opsets 23 and 24).

Tolerances: float32 rtol=atol=1e-5 (the same arithmetic as the spec's function body; onnxruntime
agrees to the bit here, onnx.reference multiplies by a Reciprocal instead of dividing). float16
rtol=atol=1e-2: the result is rounded to float16 twice (Cast, Mul by scale) and with stash_type=float16
the statistics are float16 sums, a few ulps of values up to ~10 (ulp 2^-7 there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from passes.testing import EquivalenceError, assert_equivalent, assert_pass_sound, random_feeds, run_model
from passes.transforms.decompose_rms_norm import DecomposeRmsNorm
from passes.numerics.verify import compare_outputs
from tests.helpers import init, model, ops, tensor

F32_TOL = {"rtol": 1e-5, "atol": 1e-5}
F16_TOL = {"rtol": 1e-2, "atol": 1e-2}
NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
SHAPES = {"X": [2, 3, 8]}


def _rms_norm(
    *,
    opset: int = 23,
    dims: Sequence[int | str] = ("batch", 3, 8),
    axis: int = -1,
    elem: int = TensorProto.FLOAT,
    seed: int = 0,
    **attrs: object,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    norm_shape = [d if isinstance(d, int) else 1 for d in dims[axis % len(dims):]]
    scale = init("S", rng.standard_normal(norm_shape).astype(NP_TYPES[elem]))
    node = helper.make_node("RMSNormalization", ["X", "S"], ["Y"], axis=axis, **attrs)
    return model([node], [tensor("X", dims, elem)], [tensor("Y", dims, elem)], [scale], opset=opset)


def _ort_loads(m: onnx.ModelProto) -> bool:
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any load failure means the comparison would not use ORT
        return False
    return True


@pytest.mark.parametrize(("form", "powers", "expected"), [
    ("div", "mul", ["Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]),
    ("reciprocal", "mul", ["Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"]),
    ("div", "pow", ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]),
])
def test_structure_forms(form: str, powers: str, expected: list[str]) -> None:
    original = _rms_norm(axis=-2)
    result = DecomposeRmsNorm(form=form, powers=powers)(original)  # type: ignore[arg-type]
    assert ops(result.model) == expected
    (reduce,) = [n for n in result.model.graph.node if n.op_type == "ReduceMean"]
    axes = {t.name: numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}[reduce.input[1]]
    assert axes == [1, 2] and not [a for a in reduce.attribute if a.name == "axes"]
    assert result.model.opset_import[0].version == 23
    assert result.stats == {"rms_norms_decomposed": 1, "RmsNormToPrimitives": 1}
    assert_equivalent(original, result.model, **F32_TOL, input_shapes=SHAPES)


@pytest.mark.parametrize(("stash", "expected"), [
    (TensorProto.FLOAT, ["Cast", "Mul", "ReduceMean", "Add", "Sqrt", "Div", "Cast", "Mul"]),
    (TensorProto.FLOAT16, ["Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]),
])
def test_structure_stash_type_decides_the_casts(stash: int, expected: list[str]) -> None:
    original = _rms_norm(elem=TensorProto.FLOAT16, stash_type=stash)
    result = DecomposeRmsNorm()(original)
    assert ops(result.model) == expected
    assert [n.attribute[0].i for n in result.model.graph.node if n.op_type == "Cast"] == (
        [TensorProto.FLOAT, TensorProto.FLOAT16] if stash == TensorProto.FLOAT else []
    )
    assert_equivalent(original, result.model, **F16_TOL, input_shapes=SHAPES)


def test_numerics_against_onnxruntime_really_compare() -> None:
    original = _rms_norm(epsilon=1e-6)
    assert _ort_loads(original), "onnxruntime runs opset-23 RMSNormalization: the oracle is its kernel"
    decomposed = DecomposeRmsNorm()(original).model
    comparison = assert_equivalent(original, decomposed, **F32_TOL, input_shapes=SHAPES)
    assert np.isfinite(comparison.max_abs_error) and comparison.max_abs_error < 1e-5
    assert [o.shape for o in comparison.outputs] == [(2, 3, 8)]
    (epsilon,) = [t for t in decomposed.graph.initializer if t.data_type == TensorProto.FLOAT and not t.dims]
    epsilon.CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32), epsilon.name))  # a wrong decomposition
    with pytest.raises(EquivalenceError):
        assert_equivalent(original, decomposed, **F32_TOL, input_shapes=SHAPES)


def test_numerics_against_onnx_reference_really_compare() -> None:
    """The fallback oracle: onnx.reference's RMSNormalization against the decomposition under ORT."""
    original = _rms_norm(axis=1, epsilon=1e-3)
    decomposed = DecomposeRmsNorm(form="reciprocal")(original).model
    feeds = random_feeds(original, 3, input_shapes=SHAPES)
    expected = dict(zip(["Y"], ReferenceEvaluator(original).run(None, feeds)))
    comparison = compare_outputs(expected, run_model(decomposed, feeds), **F32_TOL)
    assert comparison.ok and np.isfinite(comparison.max_abs_error) and comparison.max_abs_error < 1e-5
    wrong = DecomposeRmsNorm()(_rms_norm(axis=2, epsilon=1e-3)).model  # normalises over the last axis only
    assert not compare_outputs(expected, run_model(wrong, feeds), **F32_TOL).ok


def test_numerics_match_the_spec_formula() -> None:
    original = _rms_norm(dims=[4, 6], axis=0, epsilon=1e-2)
    decomposed = DecomposeRmsNorm()(original).model
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    scale = numpy_helper.to_array(original.graph.initializer[0])
    expected = x / np.sqrt(np.mean(x * x) + np.float32(1e-2)) * scale
    np.testing.assert_allclose(run_model(decomposed, {"X": x})["Y"], expected, rtol=1e-6, atol=1e-6)


def test_refusal_mixed_precision_scale() -> None:
    """The checker's type inference rejects it (Y is both T and V); an unchecked model still gets a reason."""
    original = _rms_norm(elem=TensorProto.FLOAT16)
    scale = original.graph.initializer[0]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float32), "S"))
    result = DecomposeRmsNorm()(original)
    assert not result.modified and ops(result.model) == ["RMSNormalization"]
    reason = "RmsNormToPrimitives: scale is float32 but X is float16 (mixed precision)"
    assert [r.reason for r in result.refusals] == [reason]


def test_refusal_unknown_rank() -> None:
    nodes = [  # a Reshape to a runtime shape of runtime length: the rank is unknown
        helper.make_node("Reshape", ["X", "shape"], ["h"]),
        helper.make_node("RMSNormalization", ["h", "S"], ["Y"]),
    ]
    inputs = [tensor("X", [2, 4]), tensor("shape", ["r"], TensorProto.INT64)]
    original = model(nodes, inputs, [tensor("Y", [2, 4])], [init("S", np.ones(4, np.float32))], opset=23)
    result = DecomposeRmsNorm()(original)
    assert not result.modified
    assert [r.reason for r in result.refusals] == ["RmsNormToPrimitives: rank of X is unknown"]


@st.composite
def rms_norm_graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, list[int]], int, int]:
    """1-3 RMSNormalizations (chained or siblings) over a rank 1-4 input with dynamic dims."""
    elem = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16]))
    rank = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
    dims: list[int | str] = [f"d{i}" if draw(st.booleans()) else size for i, size in enumerate(sizes)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nodes, initializers, outputs, current = [], [], [], "X"
    for index in range(draw(st.integers(1, 3))):
        axis = draw(st.integers(-rank, rank - 1))
        scale_shape = [size if draw(st.booleans()) else 1 for size in sizes[axis % rank:]]
        scale_shape = scale_shape[draw(st.integers(0, len(scale_shape) - 1)):]
        initializers.append(init(f"S{index}", rng.standard_normal(scale_shape).astype(NP_TYPES[elem])))
        epsilon = 10.0 ** draw(st.floats(-12, -2))
        attrs = {"axis": axis, "epsilon": epsilon, "stash_type": draw(st.sampled_from([TensorProto.FLOAT, elem]))}
        source = current if draw(st.booleans()) else "X"  # chained, or a sibling reading X
        nodes.append(helper.make_node("RMSNormalization", [source, f"S{index}"], [f"Y{index}"], **attrs))
        outputs.append(tensor(f"Y{index}", dims, elem))
        current = f"Y{index}"
    built = model(nodes, [tensor("X", dims, elem)], outputs, initializers, opset=draw(st.sampled_from([23, 24])))
    return built, {"X": sizes}, elem, len(nodes)


@given(rms_norm_graphs())
@example((_rms_norm(dims=[1], epsilon=1e-12), {"X": [1]}, TensorProto.FLOAT, 1))
@example((_rms_norm(dims=["n", 1], axis=0, elem=TensorProto.FLOAT16, stash_type=10), {"X": [5, 1]}, 10, 1))
def test_property_sound_and_fully_decomposed(case: tuple[onnx.ModelProto, dict[str, list[int]], int, int]) -> None:
    original, sizes, elem, count = case
    tolerance = F32_TOL if elem == TensorProto.FLOAT else F16_TOL
    assert _ort_loads(original)  # the comparison is against onnxruntime's kernel, not a fallback
    for form, powers in (("div", "mul"), ("reciprocal", "pow")):
        decompose = DecomposeRmsNorm(form=form, powers=powers)  # type: ignore[arg-type]
        result = assert_pass_sound(decompose, original, **tolerance, input_shapes=sizes)
        assert "RMSNormalization" not in ops(result.model)
        assert result.stats["rms_norms_decomposed"] == count
