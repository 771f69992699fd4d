"""The graph strategies in passes.testing.strategies: every model is checker-valid and runs in
onnxruntime with finite outputs of the declared shapes, and across examples the strategies produce
each feature the cleanup passes act on (Identity, duplicates, dead nodes, constant subtrees, shape
chains)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from passes.testing import strategies

# Explicit deadline only; max_examples and the rest come from the active profile (tests/conftest.py).
_profile = settings(deadline=None)
# The coverage runs are fixed: derandomized, generation only, a set number of examples.
_COVERAGE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=80,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal feeds shaped by the dims the generator recorded."""
    rng = np.random.default_rng(seed)
    dims = strategies.test_dims(model)
    feeds = {}
    for value in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims[value.name]).astype(dtype)
    return feeds


def _check_and_run(model: onnx.ModelProto) -> None:
    """Full check, then onnxruntime (default optimisations): finite outputs of the declared shape."""
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # dead Constant nodes make onnxruntime warn; they are on purpose
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, _feeds(model))
    for value, array in zip(model.graph.output, outputs, strict=True):
        assert np.isfinite(array).all(), value.name
        declared = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        assert len(declared) == array.ndim, (value.name, declared, array.shape)
        assert all(d is None or d == a for d, a in zip(declared, array.shape, strict=True)), (
            value.name,
            declared,
            array.shape,
        )


def _assert_unique_names(model: onnx.ModelProto) -> None:
    graph = model.graph
    node_names = [n.name for n in graph.node]
    tensors = [v.name for v in graph.input] + [t.name for t in graph.initializer]
    tensors += [o for n in graph.node for o in n.output]
    assert len(set(node_names)) == len(node_names) and all(node_names)
    assert len(set(tensors)) == len(tensors)


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    constants = {t.name for t in graph.initializer}
    for node in graph.node:  # generated graphs are topologically sorted
        if all(i in constants for i in node.input):
            constants.update(node.output)
    return constants


def _live_nodes(graph: onnx.GraphProto) -> set[int]:
    needed = {o.name for o in graph.output}
    live: set[int] = set()
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if any(o in needed for o in node.output):
            live.add(index)
            needed.update(node.input)
    return live


def _reaches_reshape_shape(graph: onnx.GraphProto) -> bool:
    """Some Shape output flows (through shape arithmetic) into a Reshape's shape input."""
    derived: set[str] = set()
    for node in graph.node:
        if node.op_type == "Shape" or any(i in derived for i in node.input):
            if node.op_type == "Reshape":
                if node.input[1] in derived:
                    return True
                continue
            derived.update(node.output)
    return False


def _features(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    found = {node.op_type for node in graph.node}
    keys = [(n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute)) for n in graph.node]
    if len(set(keys)) < len(keys):
        found.add("duplicate")
    if len(_live_nodes(graph)) < len(graph.node):
        found.add("dead")
    constants = _constant_names(graph)
    if any(n.op_type != "Constant" and n.input and n.output[0] in constants for n in graph.node):
        found.add("constant_subtree")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    if any(producers.get(o.name) == "Identity" for o in graph.output):
        found.add("identity_output")
    if _reaches_reshape_shape(graph):
        found.add("shape_chain")
    if any(d.HasField("dim_param") for v in graph.input for d in v.type.tensor_type.shape.dim):
        found.add("dynamic")
    if any(n.op_type == "Shape" and n.attribute for n in graph.node):
        found.add("shape_start_end")
    return found


def _collect(strategy: st.SearchStrategy[onnx.ModelProto], feature: Callable[[onnx.ModelProto], set[str]]) -> set[str]:
    seen: set[str] = set()

    @_COVERAGE
    @given(strategy)
    def collect(model: onnx.ModelProto) -> None:
        seen.update(feature(model))

    collect()
    return seen


@_profile
@given(strategies.onnx_graphs())
def test_onnx_graphs_are_valid_and_run(model: onnx.ModelProto) -> None:
    _check_and_run(model)
    _assert_unique_names(model)
    assert len(model.graph.node) <= 12
    assert 1 <= len(model.graph.output) <= 2


@_profile
@given(strategies.onnx_graphs(max_nodes=30, dtypes=(np.float64,), opsets=(13, 15, 18, 21), allow_dynamic=False))
def test_onnx_graphs_float64_static_bigger(model: onnx.ModelProto) -> None:
    _check_and_run(model)
    _assert_unique_names(model)
    assert len(model.graph.node) <= 30
    assert not any(d.HasField("dim_param") for v in model.graph.input for d in v.type.tensor_type.shape.dim)


@_profile
@given(strategies.onnx_graphs(max_nodes=1))
def test_onnx_graphs_single_node(model: onnx.ModelProto) -> None:
    _check_and_run(model)
    assert len(model.graph.node) == 1
    assert model.graph.node[0].op_type not in ("Identity", "Constant")


@_profile
@given(strategies.shape_chain_graphs(opsets=(13, 15, 17, 18, 21)))
def test_shape_chain_graphs_are_valid_and_run(model: onnx.ModelProto) -> None:
    _check_and_run(model)
    _assert_unique_names(model)
    dims = strategies.test_dims(model)
    assert set(dims) == {v.name for v in model.graph.input}


@_profile
@given(strategies.small_shapes(min_rank=0, max_rank=3, max_dim=2))
def test_small_shapes_respect_bounds(shape: tuple[int, ...]) -> None:
    assert len(shape) <= 3 and all(1 <= d <= 2 for d in shape)


def test_onnx_graphs_cover_cleanup_features() -> None:
    seen = _collect(strategies.onnx_graphs(), _features)
    wanted = {"Identity", "identity_output", "duplicate", "dead", "constant_subtree", "shape_chain", "dynamic"}
    wanted |= {"MatMul", "Div", "Exp", "Softmax", "ReduceMean", "Concat", "Transpose", "Reshape", "Constant"}
    assert wanted <= seen, f"never generated: {sorted(wanted - seen)}"


def test_shape_chain_graphs_cover_shape_idioms() -> None:
    seen = _collect(strategies.shape_chain_graphs(), _features)
    wanted = {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Range", "ConstantOfShape"}
    wanted |= {"Expand", "Equal", "Where", "Reshape", "Tile", "shape_chain", "shape_start_end", "dynamic"}
    assert wanted <= seen, f"never generated: {sorted(wanted - seen)}"


def test_test_dims_reads_metadata_and_defaults_to_empty() -> None:
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    assert strategies.test_dims(model) == {}
    onnx.helper.set_model_props(model, {strategies.TEST_DIMS_KEY: '{"x": [2, 3]}'})
    assert strategies.test_dims(model) == {"x": [2, 3]}


@pytest.mark.parametrize(
    "make",
    [
        lambda: strategies.onnx_graphs(max_nodes=0),
        lambda: strategies.onnx_graphs(opsets=(11,)),
        lambda: strategies.onnx_graphs(dtypes=(np.int32,)),
        lambda: strategies.shape_chain_graphs(opsets=()),
        lambda: strategies.small_shapes(min_rank=3, max_rank=2),
    ],
)
def test_bad_arguments_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()
