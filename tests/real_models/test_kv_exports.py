"""The KV-cache exports of `kv_export.py`: their interface (names, dtypes, dynamic dims), and in onnxruntime
a prefill followed by decode steps fed with the returned presents against the no-cache exports of
`export.py` (same config and seed, so the same weights), a prefill split in two against one call, and
left padding through `attention_mask`. SmolLM2-135M: the interface, and greedy decoding with the cache.

Tolerances, float32 with the same weights on both sides (measured errors in brackets):
    tiny models    rtol 1e-4, atol 1e-5   (<= 2e-7 on logits of magnitude ~0.5)
    SmolLM2        rtol 1e-4, atol 1e-3   (smollm2.py's; ~6e-5 on logits of magnitude ~25)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.real_models.export import EXPORTERS, OPSETS, Exporter
from tests.real_models.kv_export import (
    KV_ARCHS,
    SMOLLM2_ATOL,
    SMOLLM2_RTOL,
    TINY_ATOL,
    TINY_RTOL,
    KVDims,
    prefill_then_decode,
    run_with_past,
    tiny_dims,
)

pytestmark = pytest.mark.slow

CASES = [(arch, exporter) for arch in KV_ARCHS for exporter in EXPORTERS]
IDS = [f"{arch}-{exporter}" for arch, exporter in CASES]
SMOLLM2_DIMS = KVDims(layers=30, kv_heads=3, head_dim=64, vocab=49152)
Run = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]


def _runner(path: Path) -> Run:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def _assert_interface(path: Path, dims: KVDims, opset: int) -> None:
    model = onnx.load_model(str(path), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    inputs, outputs = list(model.graph.input), list(model.graph.output)
    assert [value.name for value in inputs] == dims.input_names
    assert [value.name for value in outputs] == dims.output_names
    int64, float32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert [value.type.tensor_type.elem_type for value in inputs] == [int64] * 3 + [float32] * 2 * dims.layers
    assert all(value.type.tensor_type.elem_type == float32 for value in outputs)
    assert _dims(inputs[0]) == ["batch", "seq"]
    assert _dims(inputs[1]) == ["batch", "total"]
    assert _dims(inputs[2]) == ["batch", "seq"]
    assert all(_dims(value) == ["batch", dims.kv_heads, "past", dims.head_dim] for value in inputs[3:])
    assert _dims(outputs[0]) == ["batch", "seq", dims.vocab]
    assert all(_dims(value) == ["batch", dims.kv_heads, "total", dims.head_dim] for value in outputs[1:])


def _decode_loop(run: Run, dims: KVDims, ids: np.ndarray, prompt: int) -> list[np.ndarray]:
    """Last logits [batch, vocab] after each of the tokens ids[:, prompt:], fed one at a time with the presents
    of the previous call (the first call prefills ids[:, :prompt] with a past of length 0)."""
    batch, total = ids.shape
    feeds = dims.feeds(batch, 0, prompt)
    feeds["input_ids"] = ids[:, :prompt]
    presents = list(run(feeds))[1:]
    steps = []
    for position in range(prompt, total):
        feeds = dims.feeds(batch, position, 1)
        feeds.update(input_ids=ids[:, position:position + 1], **dict(zip(dims.input_names[3:], presents)))
        logits, *presents = run(feeds)
        assert presents[0].shape == (batch, dims.kv_heads, position + 1, dims.head_dim)
        steps.append(logits[:, -1])
    return steps


@pytest.mark.parametrize(("arch", "exporter"), CASES, ids=IDS)
def test_the_interface(arch: str, exporter: Exporter, real_kv_export: Callable[[str, Exporter], Path]) -> None:
    _assert_interface(real_kv_export(arch, exporter), tiny_dims(arch), OPSETS[exporter])


def test_one_decode_step_reproduces_the_no_cache_logits(
        tiny_llama_kv: Path, real_export: Callable[[str, Exporter], Path]) -> None:
    dims = tiny_dims("llama")
    ids = np.random.default_rng(0).integers(0, dims.vocab, size=(2, 9), dtype=np.int64)
    got = prefill_then_decode(_runner(tiny_llama_kv), dims, ids)
    expected = _runner(real_export("llama", "torchscript"))({"input_ids": ids})[0][:, -1]
    np.testing.assert_allclose(got, expected, rtol=TINY_RTOL, atol=TINY_ATOL)


@pytest.mark.parametrize(("arch", "exporter"), CASES, ids=IDS)
def test_decode_steps_reproduce_the_no_cache_export(
        arch: str, exporter: Exporter, real_kv_export: Callable[[str, Exporter], Path],
        real_export: Callable[[str, Exporter], Path]) -> None:
    dims = tiny_dims(arch)
    ids = np.random.default_rng(1).integers(0, dims.vocab, size=(2, 10), dtype=np.int64)
    steps = _decode_loop(_runner(real_kv_export(arch, exporter)), dims, ids, prompt=6)
    no_cache = _runner(real_export(arch, exporter))
    for position, got in enumerate(steps, start=6):
        expected = no_cache({"input_ids": ids[:, :position + 1]})[0][:, -1]
        np.testing.assert_allclose(got, expected, rtol=TINY_RTOL, atol=TINY_ATOL, err_msg=f"token {position}")


@pytest.mark.parametrize(("arch", "exporter"), CASES, ids=IDS)
def test_a_prefill_split_in_two_matches_one_call(
        arch: str, exporter: Exporter, real_kv_export: Callable[[str, Exporter], Path]) -> None:
    dims, run = tiny_dims(arch), _runner(real_kv_export(arch, exporter))
    ids = np.random.default_rng(2).integers(0, dims.vocab, size=(2, 10), dtype=np.int64)
    whole = dims.feeds(2, 0, 10)
    whole["input_ids"] = ids
    expected = list(run(whole))
    got = run_with_past(run, dims, ids, past=4)
    np.testing.assert_allclose(got, expected[0][:, 4:], rtol=TINY_RTOL, atol=TINY_ATOL)


def test_left_padding_is_masked(tiny_llama_kv: Path) -> None:
    """Row 0 is 3 pad tokens then 5 real ones (positions from the mask, as transformers' generate makes
    them): its real tokens' logits, and a decode step after them, match the 5 tokens run alone."""
    dims, run = tiny_dims("llama"), _runner(tiny_llama_kv)
    rng = np.random.default_rng(3)
    tokens, other = rng.integers(0, dims.vocab, size=6), rng.integers(0, dims.vocab, size=9)
    padded = dims.feeds(2, 0, 8)
    padded["input_ids"] = np.stack([np.concatenate([[0, 0, 0], tokens[:5]]), other[:8]])
    padded["attention_mask"][0, :3] = 0
    padded["position_ids"][0] = [1, 1, 1, 0, 1, 2, 3, 4]
    alone = dims.feeds(1, 0, 6)
    alone["input_ids"] = tokens[None, :]
    expected = run(alone)[0][0]
    logits, *presents = run(padded)
    np.testing.assert_allclose(logits[0, 3:], expected[:5], rtol=TINY_RTOL, atol=TINY_ATOL)
    step = {"input_ids": np.array([[tokens[5]], [other[8]]]), "attention_mask": np.ones((2, 9), np.int64),
            "position_ids": np.array([[5], [8]]), **dict(zip(dims.input_names[3:], presents))}
    step["attention_mask"][0, :3] = 0
    np.testing.assert_allclose(run(step)[0][0, -1], expected[5], rtol=TINY_RTOL, atol=TINY_ATOL)


def test_smollm2_kv_interface(smollm2_kv: tuple[Path, Path]) -> None:
    model_path, tokenizer_dir = smollm2_kv
    _assert_interface(model_path, SMOLLM2_DIMS, 17)
    assert (tokenizer_dir / "tokenizer.json").is_file()


def test_smollm2_greedy_decoding_with_the_cache(smollm2_kv: tuple[Path, Path]) -> None:
    """Four greedy tokens, each fed the previous call's presents, match one call over the whole sequence,
    and the model knows its geography."""
    from tokenizers import Tokenizer

    model_path, tokenizer_dir = smollm2_kv
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    run, dims = _runner(model_path), SMOLLM2_DIMS
    ids = np.array([tokenizer.encode("The capital of France is").ids], dtype=np.int64)
    prompt = ids.shape[1]
    feeds = dims.feeds(1, 0, prompt)
    feeds["input_ids"] = ids
    logits, *presents = run(feeds)
    for _ in range(4):
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
        step = dims.feeds(1, ids.shape[1] - 1, 1)
        step.update(input_ids=ids[:, -1:], **dict(zip(dims.input_names[3:], presents)))
        logits, *presents = run(step)
    assert tokenizer.decode(ids[0, prompt:].tolist()).startswith(" Paris")
    whole = dims.feeds(1, 0, ids.shape[1])
    whole["input_ids"] = ids
    np.testing.assert_allclose(logits[:, -1], run(whole)[0][:, -1], rtol=SMOLLM2_RTOL, atol=SMOLLM2_ATOL)
