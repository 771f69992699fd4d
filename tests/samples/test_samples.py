"""Tests for `passes.samples`: validity, exporter idioms, numerics, determinism and graph size."""

from __future__ import annotations

import functools
import re
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from passes.core.errors import SampleError
from passes.samples import SAMPLE_NAMES, build_sample, describe_samples

IDIOMS = ("torchscript", "dynamo")
CASES = [(name, idiom) for name in SAMPLE_NAMES for idiom in IDIOMS]
EXPECTED_OPSET = {
    ("tiny-llama", "torchscript"): 17,
    ("tiny-bert", "torchscript"): 14,
    ("tiny-llama", "dynamo"): 18,
    ("tiny-bert", "dynamo"): 18,
}
# float32 outputs of the same graph on the same inputs; only reassociation-level noise expected.
ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _model(name: str, idiom: str, seed: int = 0) -> onnx.ModelProto:
    return build_sample(name, idiom=idiom, seed=seed)


@functools.lru_cache(maxsize=None)
def _session(name: str, idiom: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(_model(name, idiom).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _feeds(name: str, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, 256, size=(batch, seq), dtype=np.int64)}
    if name == "tiny-bert":
        feeds["attention_mask"] = np.ones((batch, seq), dtype=np.int64)
    return feeds


def _run(name: str, idiom: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return _session(name, idiom).run(None, feeds)[0]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _reaches_shape(producers: dict[str, onnx.NodeProto], tensor: str) -> bool:
    """Whether `tensor` is computed (transitively) from a `Shape` node."""
    stack, seen = [tensor], set()
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        if node.op_type == "Shape":
            return True
        seen.add(node.name)
        stack.extend(node.input)
    return False


@pytest.mark.parametrize(("name", "idiom"), CASES)
def test_checker_opset_and_symbolic_inputs(name: str, idiom: str) -> None:
    model = _model(name, idiom)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [
        EXPECTED_OPSET[(name, idiom)]
    ]
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "seq"]
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64


@pytest.mark.parametrize(("name", "idiom"), CASES)
def test_reduce_mean_axes_spelling(name: str, idiom: str) -> None:
    model = _model(name, idiom)
    initializers = {init.name for init in model.graph.initializer}
    reduce_means = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    assert reduce_means
    for node in reduce_means:
        has_attr = any(a.name == "axes" for a in node.attribute)
        if idiom == "torchscript":
            assert has_attr and len(node.input) == 1
        else:
            assert not has_attr and len(node.input) == 2 and node.input[1] in initializers


@pytest.mark.parametrize(("name", "idiom"), CASES)
def test_dynamic_shape_chains(name: str, idiom: str) -> None:
    model = _model(name, idiom)
    initializers = {init.name for init in model.graph.initializer}
    producers = _producers(model)
    shapes = [n for n in model.graph.node if n.op_type == "Shape"]
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert shapes and reshapes
    for node in reshapes:
        assert node.input[1] not in initializers
        assert _reaches_shape(producers, node.input[1]), node.name
    sliced = [any(a.name == "start" for a in n.attribute) for n in shapes]
    assert all(sliced) if idiom == "dynamo" else not any(sliced)


def test_idiom_specific_rms_norm() -> None:
    torchscript = {n.op_type for n in _model("tiny-llama", "torchscript").graph.node}
    dynamo = {n.op_type for n in _model("tiny-llama", "dynamo").graph.node}
    assert "Constant" in torchscript and "Reciprocal" not in torchscript
    assert {"Cast", "Reciprocal"} <= dynamo and "Constant" not in dynamo


@pytest.mark.parametrize(("name", "idiom"), CASES)
@pytest.mark.parametrize(("batch", "seq"), [(1, 8), (2, 5)])
def test_runs_in_onnxruntime(name: str, idiom: str, batch: int, seq: int) -> None:
    out = _run(name, idiom, _feeds(name, batch, seq))
    last = 256 if name == "tiny-llama" else 64
    assert out.shape == (batch, seq, last)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_idioms_compute_the_same_function(name: str) -> None:
    feeds = _feeds(name, 2, 5, seed=3)
    np.testing.assert_allclose(_run(name, "torchscript", feeds), _run(name, "dynamo", feeds),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("idiom", IDIOMS)
def test_llama_mask_is_causal(idiom: str) -> None:
    feeds = _feeds("tiny-llama", 1, 8, seed=1)
    changed = {"input_ids": feeds["input_ids"].copy()}
    changed["input_ids"][0, 5] = (changed["input_ids"][0, 5] + 7) % 256
    before, after = _run("tiny-llama", idiom, feeds), _run("tiny-llama", idiom, changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=0, atol=ATOL)
    assert np.abs(before[:, 5:] - after[:, 5:]).max() > 1e-3  # the change is visible where allowed


@pytest.mark.parametrize("idiom", IDIOMS)
def test_bert_ignores_masked_tokens(idiom: str) -> None:
    feeds = _feeds("tiny-bert", 1, 8, seed=2)
    feeds["attention_mask"][0, 6:] = 0
    changed = dict(feeds, input_ids=feeds["input_ids"].copy())
    changed["input_ids"][0, 7] = (changed["input_ids"][0, 7] + 7) % 256
    before, after = _run("tiny-bert", idiom, feeds), _run("tiny-bert", idiom, changed)
    np.testing.assert_allclose(before[:, :6], after[:, :6], rtol=0, atol=ATOL)


@pytest.mark.parametrize(("name", "idiom"), CASES)
def test_deterministic_in_seed(name: str, idiom: str) -> None:
    first = build_sample(name, idiom=idiom, seed=7).SerializeToString()
    assert build_sample(name, idiom=idiom, seed=7).SerializeToString() == first
    weights = {i.name: i.raw_data for i in build_sample(name, idiom=idiom, seed=7).graph.initializer}
    other = {i.name: i.raw_data for i in build_sample(name, idiom=idiom, seed=8).graph.initializer}
    assert weights.keys() == other.keys()
    assert any(weights[k] != other[k] for k in weights)


@pytest.mark.parametrize(("name", "idiom"), CASES)
def test_names_are_unique_and_readable(name: str, idiom: str) -> None:
    nodes = _model(name, idiom).graph.node
    names = [n.name for n in nodes]
    assert len(set(names)) == len(names)
    proj = "/layers.1/self_attn/q_proj/MatMul" if name == "tiny-llama" else (
        "/encoder/layer.1/attention/self/query/MatMul")
    assert proj in names


def test_llama_node_count_is_linear_and_calibrated() -> None:
    counts = {n: len(build_sample("tiny-llama", layers=n).graph.node) for n in (1, 2, 8)}
    per_layer = counts[2] - counts[1]
    assert counts[8] - counts[2] == 6 * per_layer
    started = time.perf_counter()
    big = build_sample("tiny-llama", layers=32)
    elapsed = time.perf_counter() - started
    assert len(big.graph.node) == counts[2] + 30 * per_layer
    assert 6000 <= len(big.graph.node) <= 8000
    assert elapsed < 2.0


def test_describe_samples() -> None:
    descriptions = describe_samples()
    assert tuple(descriptions) == SAMPLE_NAMES
    assert all(text and "\n" not in text for text in descriptions.values())


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "tiny-gpt"}, "tiny-llama, tiny-bert"),
        ({"name": "tiny-llama", "idiom": "fx"}, "torchscript, dynamo"),
        ({"name": "tiny-bert", "hidden": 65, "heads": 4}, "valid heads for hidden=65: 1, 5, 13, 65"),
        ({"name": "tiny-llama", "layers": 0}, "layers must be an integer >= 1"),
        ({"name": "tiny-llama", "hidden": 12, "heads": 4}, "even head dim"),
        ({"name": "tiny-bert", "intermediate": -1}, "intermediate"),
        ({"name": "tiny-bert", "seed": -1}, "seed"),
    ],
)
def test_bad_parameters_raise_sample_error(kwargs: dict[str, object], fragment: str) -> None:
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    with pytest.raises(SampleError, match=re.escape(fragment)) as info:
        build_sample(name, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
