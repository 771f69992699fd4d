"""group-query-attention: structure, numerics, refusal, property.

Graphs: the KV-cache sample (GQA: 4 query heads over 1 or 2 K/V heads) made static by static-kv-cache
and frozen (the Expand shapes constant), as a generator's phases are. Tolerance: float32, each output the
same dot product over the same operands (only the matmul's batch layout changes): rtol=1e-6,
atol=1e-6 x max |output|.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

from passes.api import optimize
from passes.samples import build_sample
from passes.testing import run_model
from passes.transforms.group_query_attention import GroupQueryAttention
from passes.transforms.static_kv_cache import StaticKvCache
from tests.helpers import init, model, tensor

TOL = 1e-6


def _frozen(kv_heads: int = 2, seq: int = 3, capacity: int = 16, idiom: str = "torchscript",
            layers: int = 2) -> onnx.ModelProto:
    static = StaticKvCache(capacity=capacity)(build_sample("tiny-llama", kv_cache=True, kv_heads=kv_heads,
                                                           idiom=idiom, layers=layers)).model
    shapes = {"input_ids": (1, seq), "attention_mask": (1, capacity), "position_ids": (1, seq), "cache_position": (seq,)}
    shapes |= {v.name: (1, kv_heads, capacity, 16) for v in static.graph.input if v.name.startswith("past")}
    return optimize(static, "canonicalize", input_shapes=shapes)


def _feeds(m: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in m.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones(dims, np.int64)
        elif value.name == "input_ids":
            feeds[value.name] = rng.integers(0, 256, dims)
        else:  # positions: the new tokens sit after 5 held ones
            feeds[value.name] = (np.arange(dims[-1]) + 5).reshape(dims)
    return feeds


def _assert_same(before: onnx.ModelProto, after: onnx.ModelProto, seed: int = 0) -> None:
    feeds = _feeds(before, seed)
    expected, got = run_model(before, feeds), run_model(after, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=TOL, atol=TOL * float(np.abs(value).max()))


# -- structure ------------------------------------------------------------------------------------
def test_structure_the_repeated_copies_are_gone() -> None:
    frozen = _frozen()
    result = GroupQueryAttention()(frozen)
    assert result.stats == {"matmuls_grouped": 4}  # QK^T and PV in each of 2 layers
    ops_before = [n.op_type for n in frozen.graph.node]
    ops_after = [n.op_type for n in result.model.graph.node]
    assert ops_before.count("Expand") - ops_after.count("Expand") == 4
    producers = {o: n for n in result.model.graph.node for o in n.output}
    for node in result.model.graph.node:
        if node.op_type == "MatMul" and node.input[0] in producers and producers[node.input[0]].name.endswith("stack"):
            assert producers[node.input[0]].op_type == "Reshape"
    onnx.checker.check_model(result.model, full_check=True)


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kv_heads", "seq"), [(1, 1), (2, 1), (2, 5)])
def test_numerics_equal_outputs(kv_heads: int, seq: int) -> None:
    frozen = _frozen(kv_heads, seq)
    _assert_same(frozen, GroupQueryAttention()(frozen).model)


# -- refusal --------------------------------------------------------------------------------------
def test_refusal_full_heads_have_nothing_to_group() -> None:
    assert not GroupQueryAttention()(_frozen(kv_heads=4)).modified


def test_refusal_a_repeated_copy_read_twice_stays() -> None:
    """The copy is also a graph output: removing it would change the interface."""
    nodes = [helper.make_node("Unsqueeze", ["k", "axis"], ["k5"]),
             helper.make_node("Expand", ["k5", "shape5"], ["kx"]),
             helper.make_node("Reshape", ["kx", "shape4"], ["kr"]),
             helper.make_node("MatMul", ["q", "kr"], ["y"])]
    m = model(nodes, [tensor("q", [1, 4, 3, 8]), tensor("k", [1, 2, 8, 5])], [tensor("y", [1, 4, 3, 5]),
                                                                              tensor("kr", [1, 4, 8, 5])],
              [init("axis", np.array([2], np.int64)), init("shape5", np.array([1, 2, 2, 8, 5], np.int64)),
               init("shape4", np.array([1, 4, 8, 5], np.int64))])
    assert not GroupQueryAttention()(m).modified


# -- property -------------------------------------------------------------------------------------
@given(kv_heads=st.sampled_from([1, 2]), seq=st.integers(1, 4), spare=st.integers(0, 6), layers=st.integers(1, 2),
       seed=st.integers(0, 3))
def test_property_equal_valid_and_idempotent(kv_heads: int, seq: int, spare: int, layers: int, seed: int) -> None:
    frozen = _frozen(kv_heads, seq, capacity=seq + 5 + spare, layers=layers)
    result = GroupQueryAttention()(frozen)
    assert result.stats["matmuls_grouped"] == 2 * layers
    onnx.checker.check_model(result.model, full_check=True)
    _assert_same(frozen, result.model, seed)
    assert not GroupQueryAttention()(result.model).modified
