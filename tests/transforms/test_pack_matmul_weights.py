"""pack-matmul-weights: structure, numerics, refusal, property.

Tolerance: the packed matmul computes each output as the same dot product over K (bytes move, sums do not),
but onnxruntime picks a different kernel for a batched matmul, so float32 compares at rtol=1e-5 and
atol=1e-5 x max |y| (sums of up to 256 seeded standard-normal products)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

from passes.testing import assert_equivalent, assert_pass_sound, run_model
from passes.transforms.pack_matmul_weights import PackMatmulWeights
from tests.helpers import init, model, ops, tensor

RTOL = 1e-5


def _decode(rows: list[int], depth: int, columns: int, seed: int = 0, dtype: type = np.float32) -> onnx.ModelProto:
    weight = np.random.default_rng(seed).standard_normal((depth, columns)).astype(dtype)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="head")]
    return model(nodes, [tensor("x", [*rows, depth], elem)], [tensor("y", [*rows, columns], elem)], [init("w", weight)])


def _atol(original: onnx.ModelProto) -> float:
    feeds = {"x": np.random.default_rng(1).standard_normal([d.dim_value for d in
                                                             original.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    return 1e-5 * float(np.abs(run_model(original, feeds)["y"]).max())


# -- structure ------------------------------------------------------------------------------------
def test_structure_a_decode_matmul_reads_contiguous_panels() -> None:
    original = _decode([1, 1], 64, 512)
    result = PackMatmulWeights(panel=128)(original)
    assert ops(result.model) == ["MatMul", "Reshape"]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    packed = weights[result.model.graph.node[0].input[1]]
    w = onnx.numpy_helper.to_array(original.graph.initializer[0])
    assert packed.shape == (4, 64, 128) and packed.flags.c_contiguous
    np.testing.assert_array_equal(packed[2, :, 5], w[:, 2 * 128 + 5])  # P[p, k, j] = W[k, p*t + j]
    assert list(weights[result.model.graph.node[1].input[1]]) == [1, 1, 512]
    assert result.model.graph.output[0].name == "y" and result.stats == {"matmuls_packed": 1}


@pytest.mark.parametrize("rows", [[1], [1, 1], [1, 1, 1]])
def test_structure_every_rank_of_one_row_keeps_the_output_shape(rows: list[int]) -> None:
    original = _decode(rows, 32, 256)
    result = assert_pass_sound(PackMatmulWeights(panel=64), original, rtol=RTOL, atol=_atol(original))
    inferred = onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [*rows, 256]


# -- numerics -------------------------------------------------------------------------------------
def test_numerics_an_lm_head_sized_matmul_is_unchanged() -> None:
    original = _decode([1, 1], 256, 32000 // 8)  # 4000 columns, 125 panels of 32
    result = PackMatmulWeights(panel=32)(original)
    assert result.stats["matmuls_packed"] == 1
    assert_equivalent(original, result.model, rtol=RTOL, atol=_atol(original))


# -- refusal --------------------------------------------------------------------------------------
def test_refusal_matmuls_that_are_not_one_row_with_a_constant_weight_are_left() -> None:
    prefill = _decode([1, 8], 32, 256)
    symbolic = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["batch", 32])],
                     [tensor("y", ["batch", 256])], [init("w", np.ones((32, 256), np.float32))])
    two_inputs = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [1, 32]), tensor("w", [32, 256])],
                       [tensor("y", [1, 256])])
    integer = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [1, 32], onnx.TensorProto.INT32)],
                    [tensor("y", [1, 256], onnx.TensorProto.INT32)], [init("w", np.ones((32, 256), np.int32))])
    for original in (prefill, symbolic, two_inputs, integer):
        result = PackMatmulWeights(panel=64)(original)
        assert not result.modified and not result.refusals and ops(result.model) == ["MatMul"]


def test_refusal_columns_that_do_not_fill_whole_panels_say_so() -> None:
    for columns in (100, 64):  # not a multiple; a single panel (nothing to pack)
        result = PackMatmulWeights(panel=64)(_decode([1], 16, columns))
        assert not result.modified
        assert [r.reason for r in result.refusals] == [
            f"{columns} columns are not a multiple of the 64-column panel larger than one"]


# -- property -------------------------------------------------------------------------------------
@given(st.integers(1, 3), st.integers(1, 96), st.sampled_from([8, 16, 32]), st.integers(2, 9), st.integers(0, 2**16))
def test_property_packing_preserves_every_output(rank: int, depth: int, panel: int, panels: int, seed: int) -> None:
    original = _decode([1] * rank, depth, panel * panels, seed)
    result = assert_pass_sound(PackMatmulWeights(panel=panel), original, rtol=RTOL, atol=_atol(original))
    assert ops(result.model) == ["MatMul", "Reshape"]
