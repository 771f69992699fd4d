"""Generators from real exports: transformers' Llama and Qwen2 with a KV cache (TorchScript and dynamo,
random weights) and the trained SmolLM2-135M (30 layers).

- static-kv-cache on each export reproduces the export's own growing cache (logits to float32
  rounding: rtol=1e-4, atol=1e-4 x max |logits|; 1e-4 because the exporters' graphs fold differently);
- `passes run --target host -q none` builds a generator whose greedy tokens equal onnxruntime's on the
  original export with its own cache (argmax compared exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from passes.deploy.generate import generate_tokens
from passes.deploy.run import run_for_target
from passes.transforms.static_kv_cache import StaticKvCache
from tests.helpers import greedy_with_growing_cache, run_growing_cache, run_static_cache

pytestmark = pytest.mark.slow

RTOL = 1e-4


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_reproduces_the_exports_growing_cache(real_kv_export: Callable[[str, str], Path], arch: str,
                                                            exporter: str) -> None:
    original = onnx.load_model(str(real_kv_export(arch, exporter)))
    result = StaticKvCache(capacity=24)(original)
    assert result.modified and result.stats["caches"] == 4 and result.stats["masks_replaced"] == 2
    tokens = np.random.default_rng(0).integers(0, 256, 13).astype(np.int64)
    for past in (0, 9, 12):
        expected, got = run_growing_cache(original, tokens, past), run_static_cache(result.model, tokens, past, 24, seed=3)
        scale = float(np.abs(expected["logits"]).max())
        np.testing.assert_allclose(got["logits"], expected["logits"], rtol=RTOL, atol=1e-4 * scale)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_tiny_llama_generator_tokens_equal_onnxruntime(real_kv_export: Callable[[str, str], Path], exporter: str,
                                                       tmp_path: Path) -> None:
    export = real_kv_export("llama", exporter)
    report = run_for_target(export, "host", tmp_path, quantize="none", context=40, prefill_chunk=8)
    assert report.host_check["passed"]
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 10)]
    generated = generate_tokens(tmp_path / "host", prompt_ids=prompt, max_new_tokens=24)
    assert generated.tokens == greedy_with_growing_cache(export, prompt, 24)
    assert generated.reference["tokens_equal"]


def test_smollm2_generator_32_tokens_equal_onnxruntime(smollm2_kv: tuple[Path, Path], tmp_path: Path) -> None:
    """The trained model, fp32: 32 greedy tokens after a real prompt equal onnxruntime's on the export."""
    model, tokenizer = smollm2_kv
    report = run_for_target(model, "host", tmp_path, quantize="none", context=64, prefill_chunk=16)
    assert report.host_check["passed"] and report.generator["cache_writes_in_place"] == 120  # 60 caches x 2
    assert report.generator["code_share_of_weights"] < 0.10  # the bar: model.tar < 10 % of the weights
    generated = generate_tokens(tmp_path / "host", prompt="The capital of France is", tokenizer=tokenizer,
                                max_new_tokens=32)
    assert generated.text is not None and generated.text.startswith(" Paris")
    assert generated.tokens == greedy_with_growing_cache(model, list(generated.prompt_tokens), 32)
