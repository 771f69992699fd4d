"""Tests for `build_sample("tiny-llama", kv_cache=True)`: the decoder-with-past interface, its graph
idioms, and onnxruntime numerics (chunked prefill + decode steps == one call; left padding; GQA)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from passes.cli import main
from passes.core.errors import SampleError
from passes.core.io import load_model
from passes.samples import build_sample

IDIOMS = ("torchscript", "dynamo")
LAYERS, HIDDEN, HEADS, VOCAB = 2, 64, 4, 256
HEAD_DIM = HIDDEN // HEADS
KV_HEADS = (4, 2)  # multi-head, and grouped-query attention (two query heads per K/V head)
# The same float32 function evaluated in different chunkings (or with masked-out extra keys): only
# summation-order noise is expected (observed <= 2e-7 on logits of magnitude ~0.1).
ATOL = 1e-5
FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64


@functools.lru_cache(maxsize=None)
def _model(idiom: str, kv_heads: int = HEADS, kv_cache: bool = True) -> onnx.ModelProto:
    return build_sample("tiny-llama", idiom=idiom, layers=LAYERS, hidden=HIDDEN, heads=HEADS,
                        vocab=VOCAB, seed=0, kv_cache=kv_cache, kv_heads=kv_heads)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def _cached_session(idiom: str, kv_heads: int = HEADS, kv_cache: bool = True) -> ort.InferenceSession:
    return _session(_model(idiom, kv_heads, kv_cache))


def _empty_past(batch: int, kv_heads: int) -> list[np.ndarray]:
    return [np.zeros((batch, kv_heads, 0, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]


def _step(session: ort.InferenceSession, ids: np.ndarray, past: list[np.ndarray],
          mask: np.ndarray | None = None,
          positions: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call: `ids` [batch, seq] after `past` (2 * LAYERS arrays); returns logits and presents."""
    batch, seq = ids.shape
    past_len = past[0].shape[2]
    if mask is None:
        mask = np.ones((batch, past_len + seq), np.int64)
    if positions is None:
        positions = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions)}
    for layer in range(LAYERS):
        feeds[f"past_key_values.{layer}.key"] = past[2 * layer]
        feeds[f"past_key_values.{layer}.value"] = past[2 * layer + 1]
    logits, *present = session.run(None, feeds)
    return logits, present


def _tokens(batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


# --- structure -------------------------------------------------------------------------------------


def _dims(info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("idiom", IDIOMS)
def test_interface(idiom: str, kv_heads: int) -> None:
    model = _model(idiom, kv_heads)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [
        17 if idiom == "torchscript" else 18]
    cache = ["batch", kv_heads, "past", HEAD_DIM]
    expected_inputs = [("input_ids", INT64, ["batch", "seq"]), ("attention_mask", INT64, ["batch", "total"]),
                       ("position_ids", INT64, ["batch", "seq"])]
    expected_outputs = [("logits", FLOAT, ["batch", "seq", VOCAB])]
    for layer in range(LAYERS):
        expected_inputs += [(f"past_key_values.{layer}.{kind}", FLOAT, cache) for kind in ("key", "value")]
        expected_outputs += [(f"present.{layer}.{kind}", FLOAT, ["batch", kv_heads, "total", HEAD_DIM])
                             for kind in ("key", "value")]
    got_inputs = [(i.name, i.type.tensor_type.elem_type, _dims(i)) for i in model.graph.input]
    got_outputs = [(o.name, o.type.tensor_type.elem_type, _dims(o)) for o in model.graph.output]
    assert got_inputs == expected_inputs
    assert got_outputs == expected_outputs


@pytest.mark.parametrize("idiom", IDIOMS)
def test_graph_idioms(idiom: str) -> None:
    model = _model(idiom, 2)
    nodes = model.graph.node
    producers = {out: node for node in nodes for out in node.output}
    for layer in range(LAYERS):  # present = Concat(past, new, axis=-2)
        for kind in ("key", "value"):
            concat = producers[f"present.{layer}.{kind}"]
            assert concat.op_type == "Concat" and concat.input[0] == f"past_key_values.{layer}.{kind}"
            assert [a.i for a in concat.attribute if a.name == "axis"] == [-2]
    # one padded causal mask for all layers: Where(visible, 0, float32 min), added to every layer's scores
    wheres = [n for n in nodes if n.op_type == "Where" and producers[n.input[0]].op_type == "And"]
    assert len(wheres) == 1
    assert sum(wheres[0].output[0] in n.input and n.op_type == "Add" for n in nodes) == LAYERS
    assert not any(n.op_type == "Greater" for n in nodes)  # no per-layer causal mask
    # the past length is read off the first past key in the idiom's dim spelling
    shape = [n for n in nodes if n.op_type == "Shape" and n.input[0] == "past_key_values.0.key"]
    assert shape
    attrs = {a.name: a.i for a in shape[0].attribute}
    assert attrs == ({"start": 2, "end": 3} if idiom == "dynamo" else {})
    # rotary angles are gathered at position_ids, with no Range-made positions
    assert any(n.op_type == "Gather" and n.input[1] == "position_ids" for n in nodes)
    # grouped-query attention repeats K/V heads with Unsqueeze -> Expand -> Reshape (2 per layer)
    assert sum(n.op_type == "Expand" for n in nodes) == 2 * LAYERS


def test_kv_heads_equal_to_heads_adds_no_repeat() -> None:
    assert not any(n.op_type == "Expand" for n in _model("torchscript", HEADS).graph.node)


def test_deterministic_and_same_weights_as_plain_sample() -> None:
    cached = _model("dynamo", 2)
    assert build_sample("tiny-llama", idiom="dynamo", kv_cache=True, kv_heads=2).SerializeToString() == (
        cached.SerializeToString())
    def weights(model: onnx.ModelProto) -> dict[str, bytes]:  # named parameters, not shared `val_N` constants
        return {i.name: i.raw_data for i in model.graph.initializer if not i.name.startswith("val_")}

    assert weights(cached) == weights(_model("dynamo", 2, kv_cache=False))


# --- numerics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("idiom", IDIOMS)
def test_empty_past_matches_plain_sample(idiom: str, kv_heads: int) -> None:
    ids = _tokens(2, 7, seed=1)
    logits, present = _step(_cached_session(idiom, kv_heads), ids, _empty_past(2, kv_heads))
    plain = _cached_session(idiom, kv_heads, False).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(logits, plain, rtol=0, atol=ATOL)
    assert [p.shape for p in present] == [(2, kv_heads, 7, HEAD_DIM)] * (2 * LAYERS)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("idiom", IDIOMS)
def test_chunked_prefill_and_decode_match_one_call(idiom: str, kv_heads: int) -> None:
    session = _cached_session(idiom, kv_heads)
    ids = _tokens(2, 12, seed=2)
    whole, whole_present = _step(session, ids, _empty_past(2, kv_heads))
    chunks, past = [], _empty_past(2, kv_heads)
    for start, end in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:  # prefill in 2 chunks, 4 decodes
        logits, past = _step(session, ids[:, start:end], past)
        assert logits.shape == (2, end - start, VOCAB)
        assert past[0].shape == (2, kv_heads, end, HEAD_DIM)
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), whole, rtol=0, atol=ATOL)
    for got, want in zip(past, whole_present):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("idiom", IDIOMS)
def test_left_padding_leaves_valid_positions_unchanged(idiom: str, kv_heads: int) -> None:
    """Row 1 is row 0's last `n - pad` tokens behind `pad` padding tokens (mask 0, HF position ids);
    its valid logits equal an unpadded run of those tokens, during prefill and the decode steps after."""
    session = _cached_session(idiom, kv_heads)
    n, pad, steps = 8, 3, 3
    ids = _tokens(2, n + steps, seed=3)
    ids[1, pad:] = ids[0, pad:]
    ids[1, :pad] = (ids[0, :pad] + 11) % VOCAB  # padding tokens: any ids, none may leak into valid rows
    mask = np.ones((2, n), np.int64)
    mask[1, :pad] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # HF: cumsum - 1, padding at a valid index
    padded, past = _step(session, ids[:, :n], _empty_past(2, kv_heads), mask, positions)
    alone, alone_past = _step(session, ids[1:, pad:n], _empty_past(1, kv_heads))
    np.testing.assert_allclose(padded[1:, pad:], alone, rtol=0, atol=ATOL)
    assert np.isfinite(padded).all()  # fully masked padding rows stay finite (min, not -inf)
    for t in range(n, n + steps):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = mask.sum(axis=1, keepdims=True) - 1
        padded, past = _step(session, ids[:, t:t + 1], past, mask, positions)
        alone, alone_past = _step(session, ids[1:, t:t + 1], alone_past)
        np.testing.assert_allclose(padded[1:], alone, rtol=0, atol=ATOL)
    unpadded, _ = _step(session, ids[:1, :n + steps], _empty_past(1, kv_heads))
    np.testing.assert_allclose(padded[:1, 0], unpadded[:, -1], rtol=0, atol=ATOL)  # row 0 unaffected


def test_masked_key_is_ignored_and_position_ids_are_read() -> None:
    session = _cached_session("torchscript", 2)
    ids = _tokens(1, 6, seed=4)
    base, _ = _step(session, ids, _empty_past(1, 2))
    mask = np.ones((1, 6), np.int64)
    mask[0, 2] = 0
    hidden, _ = _step(session, ids, _empty_past(1, 2), mask)
    changed = ids.copy()
    changed[0, 2] = (changed[0, 2] + 5) % VOCAB
    hidden_changed, _ = _step(session, changed, _empty_past(1, 2), mask)
    np.testing.assert_allclose(hidden[:, 3:], hidden_changed[:, 3:], rtol=0, atol=ATOL)
    np.testing.assert_allclose(hidden[:, :2], base[:, :2], rtol=0, atol=ATOL)  # earlier queries never saw it
    assert np.abs(hidden[:, 3:] - base[:, 3:]).max() > 1e-4
    # (positions index the rotary table sliced to the total length, as HF's `cos_cached[:kv_seq_len]`)
    shifted, _ = _step(session, ids, _empty_past(1, 2), positions=np.array([[1, 2, 3, 4, 5, 5]]))
    assert np.abs(shifted - base).max() > 1e-4  # rotary angles follow position_ids


@pytest.mark.parametrize("idiom", IDIOMS)
def test_grouped_heads_serve_consecutive_query_heads(idiom: str) -> None:
    """A kv_heads=2 model equals the kv_heads=4 model whose K/V head h is the grouped model's head h // 2
    (HF `repeat_kv` order), so the repeat pairs query and key/value heads as Llama does."""
    grouped, full = _model(idiom, 2), onnx.ModelProto()
    full.CopyFrom(_model(idiom, HEADS))
    weights = {i.name: numpy_helper.to_array(i) for i in grouped.graph.initializer}
    copied = 0
    for init in full.graph.initializer:
        if init.name.startswith("val_"):  # dynamo's shared shape constants differ; parameters are named
            continue
        array = weights[init.name]
        if re.search(r"\.[kv]_proj\.(weight|bias)$", init.name):  # [..., 2 * HEAD_DIM] -> [..., 4 * HEAD_DIM]
            heads = array.reshape(*array.shape[:-1], 2, HEAD_DIM)
            array = np.repeat(heads, 2, axis=-2).reshape(*array.shape[:-1], HEADS * HEAD_DIM)
            copied += 1
        init.CopyFrom(numpy_helper.from_array(array, init.name))
    assert copied == 4 * LAYERS
    ids = _tokens(2, 6, seed=5)
    got, _ = _step(_cached_session(idiom, 2), ids, _empty_past(2, 2))
    want, _ = _step(_session(full), ids, _empty_past(2, HEADS))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


# --- options and the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "tiny-bert", "kv_cache": True}, "kv_cache is a tiny-llama option"),
        ({"name": "tiny-bert", "kv_heads": 2}, "kv_heads is a tiny-llama option"),
        ({"name": "tiny-llama", "kv_heads": 3}, "valid kv_heads for heads=4: 1, 2, 4"),
        ({"name": "tiny-llama", "kv_heads": 0}, "kv_heads must be an integer >= 1"),
        ({"name": "tiny-llama", "kv_cache": "yes"}, "kv_cache must be True or False"),
    ],
)
def test_bad_options_raise_sample_error(kwargs: dict[str, object], fragment: str) -> None:
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    with pytest.raises(SampleError, match=re.escape(fragment)):
        build_sample(name, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("idiom", IDIOMS)
def test_cli_writes_kv_sample(idiom: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.onnx"
    code = main(["sample", "tiny-llama", "--kv-cache", "--idiom", idiom, "--kv-heads", "2", "-o", str(path)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    model = load_model(path)
    assert f"wrote {path}" in out and "kv cache" in out and f"{len(model.graph.node)} nodes" in out
    assert model.SerializeToString() == _model(idiom, 2).SerializeToString()


def test_cli_refuses_kv_cache_for_bert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sample", "tiny-bert", "--kv-cache", "-o", str(tmp_path / "x.onnx")])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: kv_cache is a tiny-llama option")
    assert not (tmp_path / "x.onnx").exists()
