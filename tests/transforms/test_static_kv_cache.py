"""static-kv-cache: structure, numerics, refusal, property.

The rewritten graph is compared with the ORIGINAL one run the way its exporter meant: a prompt prefilled
with an empty past, then a chunk fed the presents as the past (the cache grows by Concat). The static
graph runs the same two calls against a fixed-capacity cache whose unused slots hold seeded garbage
(they must not matter). Tolerance: float32, the same sums in another order (the masked slots add
exact zeros): rtol=1e-5, atol=1e-5 x max |output| for the logits and the cache entries written (layer 0's
are copies of the same projections; later layers' inherit the attention's rounding).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from passes.samples import build_sample
from passes.transforms.static_kv_cache import CACHE_POSITION, StaticKvCache
from tests.helpers import init, model, run_growing_cache, run_static_cache, tensor

RTOL = 1e-5


def _sample(idiom: str = "torchscript", kv_heads: int = 2, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    return build_sample("tiny-llama", idiom=idiom, kv_cache=True, kv_heads=kv_heads, layers=layers, seed=seed)


def _assert_same(original: onnx.ModelProto, static: onnx.ModelProto, past: int, chunk: int, capacity: int,
                 seed: int = 0) -> None:
    tokens = np.random.default_rng(seed).integers(0, 256, past + chunk).astype(np.int64)
    expected, got = run_growing_cache(original, tokens, past), run_static_cache(static, tokens, past, capacity)
    scale = float(np.abs(expected["logits"]).max())
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=RTOL, atol=1e-5 * scale)
    for name, value in expected.items():
        if name.startswith("present"):
            np.testing.assert_allclose(got[name][:, :, :past + chunk], value, rtol=RTOL,
                                       atol=1e-5 * float(np.abs(value).max()))


# -- structure ------------------------------------------------------------------------------------
@pytest.mark.parametrize("idiom", ["torchscript", "dynamo"])
def test_structure_concat_caches_become_scatters_at_cache_position(idiom: str) -> None:
    original = _sample(idiom)
    result = StaticKvCache(capacity=32)(original)
    got = result.model
    assert result.stats == {"caches": 4, "masks_replaced": 2, "capacity": 32}
    counts = [n.op_type for n in got.graph.node]
    assert counts.count("ScatterElements") == 4
    assert not any(n.op_type == "Concat" and n.input[0].startswith("past") for n in got.graph.node)
    inputs = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in got.graph.input}
    assert list(inputs)[:4] == ["input_ids", "attention_mask", "position_ids", CACHE_POSITION]
    assert inputs[CACHE_POSITION] == [inputs["input_ids"][1]]  # one slot per new token
    assert inputs["attention_mask"] == ["batch", 32]
    assert inputs["past_key_values.0.key"] == ["batch", 2, 32, 16]
    outputs = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in got.graph.output}
    assert outputs["present.1.value"] == ["batch", 2, 32, 16]
    producers = {o: n for n in got.graph.node for o in n.output}
    for softmax in (n for n in got.graph.node if n.op_type == "Softmax"):
        add = producers[softmax.input[0]]
        assert add.op_type == "Add" and producers[add.input[1]].op_type == "Where"
    onnx.checker.check_model(got, full_check=True)


def test_structure_a_second_run_changes_nothing() -> None:
    once = StaticKvCache(capacity=16)(_sample()).model
    again = StaticKvCache(capacity=16)(once)
    assert not again.modified


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("idiom", "kv_heads"), [("torchscript", 2), ("dynamo", 4), ("torchscript", 1)])
@pytest.mark.parametrize(("past", "chunk"), [(0, 5), (6, 1), (5, 3)])
def test_numerics_equal_to_the_growing_cache(idiom: str, kv_heads: int, past: int, chunk: int) -> None:
    original = _sample(idiom, kv_heads)
    static = StaticKvCache(capacity=16)(original).model
    _assert_same(original, static, past, chunk, capacity=16)


def test_numerics_a_full_cache_reads_every_slot() -> None:
    original = _sample()
    static = StaticKvCache(capacity=9)(original).model
    _assert_same(original, static, past=8, chunk=1, capacity=9)


# -- refusal --------------------------------------------------------------------------------------
def _attention(with_positions: bool, reads_length: bool, mask_rank: int = 2) -> onnx.ModelProto:
    """present = Concat(past, new); probs = Softmax(q @ present^T + bias); optionally an output that reads
    the past's length, and a position_ids input."""
    nodes = [
        helper.make_node("Concat", ["past", "new"], ["present"], axis=2),
        helper.make_node("Transpose", ["present"], ["keys_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "keys_t"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("ReduceSum", ["attention_mask", "axes"], ["held"], keepdims=0),
    ]
    inputs = [tensor("q", [1, 1, "s", 2]), tensor("new", [1, 1, "s", 2]), tensor("past", [1, 1, "p", 2]),
              tensor("bias", [1, 1, "s", "t"]),
              tensor("attention_mask", [1, "t"] if mask_rank == 2 else [1, 1, "t"], TensorProto.INT64)]
    outputs = [tensor("probs", [1, 1, "s", "t"]), tensor("present", [1, 1, "t", 2]),
               tensor("held", [1] * (mask_rank - 1), TensorProto.INT64)]
    if reads_length:
        nodes.append(helper.make_node("Shape", ["past"], ["past_shape"]))
        outputs.append(tensor("past_shape", [4], TensorProto.INT64))
    if with_positions:
        inputs.append(tensor("position_ids", [1, "s"], TensorProto.INT64))
    return model(nodes, inputs, outputs, [init("axes", np.array([-1], np.int64))])


def test_refusal_positions_from_the_past_length_need_a_position_ids_input() -> None:
    result = StaticKvCache(capacity=8)(_attention(with_positions=False, reads_length=True))
    assert not result.modified
    assert "no position_ids input" in result.refusals[0].reason


def test_refusal_lifted_by_a_position_ids_input() -> None:
    assert StaticKvCache(capacity=8)(_attention(with_positions=True, reads_length=True)).modified


def test_refusal_a_cache_no_attention_reads() -> None:
    nodes = [helper.make_node("Concat", ["past", "new"], ["present"], axis=2)]
    m = model(nodes, [tensor("past", [1, 2, "p", 4]), tensor("new", [1, 2, 1, 4])], [tensor("present", [1, 2, "t", 4])])
    result = StaticKvCache(capacity=8)(m)
    assert not result.modified and "no Softmax over the cached keys" in result.refusals[0].reason


def test_refusal_a_mask_that_is_not_batch_by_total() -> None:
    result = StaticKvCache(capacity=8)(_attention(with_positions=True, reads_length=False, mask_rank=3))
    assert not result.modified and "is not a [batch, total] mask" in result.refusals[0].reason


def test_refusal_a_graph_that_has_cache_position_already() -> None:
    m = _attention(with_positions=True, reads_length=False)
    m.graph.input.append(tensor(CACHE_POSITION, ["s"], TensorProto.INT64))
    result = StaticKvCache(capacity=8)(m)
    assert not result.modified and "already has this input" in result.refusals[0].reason


# -- property -------------------------------------------------------------------------------------
@given(idiom=st.sampled_from(["torchscript", "dynamo"]), kv_heads=st.sampled_from([1, 2, 4]),
       layers=st.integers(1, 2), past=st.integers(0, 6), chunk=st.integers(1, 4), spare=st.integers(0, 5),
       seed=st.integers(0, 3))
def test_property_equal_to_the_growing_cache_and_idempotent(idiom: str, kv_heads: int, layers: int, past: int,
                                                            chunk: int, spare: int, seed: int) -> None:
    original = _sample(idiom, kv_heads, layers, seed)
    capacity = past + chunk + spare
    result = StaticKvCache(capacity=capacity)(original)
    onnx.checker.check_model(result.model, full_check=True)
    _assert_same(original, result.model, past, chunk, capacity, seed)
    assert not StaticKvCache(capacity=capacity)(result.model).modified
