"""INT8 on a real trained LLM: SmolLM2-135M-Instruct (30 layers), perplexity at 1x128 on English text.

Text is Python's own `pydoc_data.topics` (~465 k characters of English prose, installed with Python):
the first half calibrates, 8 windows of 128 tokens spread over the second half evaluate. Integer
matmuls are evaluated exactly (`passes.numerics.exact`). The bars (issue 12), perplexity change against
float on the same windows:

    w8a8-dynamic (per-token, smoothed; the default of the w8a8 targets)   <= +3 %   (measured +1.6 %)
    w8a8-static  (smoothed, sensitive layers W8A16)                       <= +3 %   (measured +1.2 %)
    w8a16                                                                 <= +0.5 % (measured -0.4 %)

and without smoothing and per-token scales the same model loses far more (measured: per-tensor
dynamic +48 %, static +61 %), which the test keeps as evidence that the fixes are what makes the bar
(`bench/int8_quality.py` prints the whole table).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from passes.frontend.prepare import DEFAULT_MIN_LAYER_SQNR, DEFAULT_SMOOTH, QuantizeSettings, prepare_model
from passes.infra.manager import PassManager
from passes.infra.pipeline import parse_pipeline
from passes.numerics.perplexity import eval_windows, perplexity
from passes.targets import load_target
from passes.transforms.quantize_int8 import QuantizeInt8
from passes.transforms.smooth_quant import SmoothQuant
from tests.real_models.smollm2 import export_smollm2, missing_requirements

pytestmark = pytest.mark.slow

SHAPE = {"input_ids": (1, 128)}
WINDOWS = 8
CALIBRATION_WINDOWS = 4


@dataclass(frozen=True)
class Real:
    path: Path
    tokenizer: Path
    calibration: Path
    text: Path
    float_model: onnx.ModelProto
    rows: list[np.ndarray]
    float_ppl: float


@pytest.fixture(scope="module")
def real(real_exports_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Real]:
    missing = missing_requirements()
    if missing and not list(real_exports_dir.glob("smollm2-135m-*/model.onnx")):
        pytest.skip(f"the SmolLM2 export needs {', '.join(missing)}")
    path, tokenizer = export_smollm2(real_exports_dir)
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    folder = tmp_path_factory.mktemp("text")
    (folder / "calibration.txt").write_text(text[: len(text) // 2], encoding="utf-8")
    (folder / "eval.txt").write_text(text[len(text) // 2:], encoding="utf-8")
    prepared = prepare_model(path, load_target("sd8gen2"), input_shapes=SHAPE, quantize="none")
    rows = eval_windows(prepared.model, folder / "eval.txt", tokenizer, WINDOWS)
    yield Real(path, tokenizer, folder / "calibration.txt", folder / "eval.txt", prepared.model, rows,
               perplexity(prepared.model, np.stack(rows)).perplexity)


def _quantized(real: Real, scheme: str, *, smooth: float, min_sqnr: float,
               activations: str = "per-token") -> tuple[onnx.ModelProto, dict]:
    calibration = {"calibration": str(real.calibration), "tokenizer": str(real.tokenizer), "samples": CALIBRATION_WINDOWS}
    elements = [SmoothQuant(alpha=smooth, **calibration)] if smooth else []
    elements.append(QuantizeInt8(scheme=scheme, min_sqnr=min_sqnr, activations=activations, **calibration))  # type: ignore[arg-type]
    result = PassManager([*elements, *parse_pipeline("cleanup").elements]).run(real.float_model)
    return result.model, {p.name: p.stats for p in result.report.passes}


def _increase(real: Real, model: onnx.ModelProto) -> float:
    return 100.0 * (perplexity(model, np.stack(real.rows)).perplexity / real.float_ppl - 1.0)


def test_the_sd8gen2_default_keeps_perplexity_within_3_percent(real: Real) -> None:
    """What `passes run --target sd8gen2 --calibration TEXT --tokenizer DIR --text TEXT` does, gate included."""
    settings = QuantizeSettings(calibration=real.calibration, tokenizer=real.tokenizer, text=real.text,
                                max_ppl_increase=3.0)
    prepared = prepare_model(real.path, load_target("sd8gen2"), input_shapes=SHAPE, settings=settings)
    q = prepared.quantization
    assert q is not None and q["scheme"] == "w8a8-dynamic" and q["activations"] == "per-token"
    assert q["smoothing"]["activations"] == 91  # 30 x (QKV, gate/up, down) + the final norm before lm_head
    assert q["mixed_precision"]["w8a8_layers"] >= 115  # of 121 matmuls: nearly all stay int8
    assert q["perplexity"]["float"] == pytest.approx(real.float_ppl, rel=1e-6)
    assert q["perplexity"]["increase_pct"] <= 3.0, q["perplexity"]
    assert q["warnings"] == [] and q["output_sqnr_db"] > 15.0


def test_static_w8a8_with_smoothing_and_mixed_precision_within_3_percent(real: Real) -> None:
    model, stats = _quantized(real, "w8a8-static", smooth=DEFAULT_SMOOTH, min_sqnr=DEFAULT_MIN_LAYER_SQNR)
    quantize = stats["quantize-int8"]
    assert quantize["w8a8_layers"] + quantize["fallback_layers"] == 121 and quantize["w8a8_layers"] >= 60
    assert _increase(real, model) <= 3.0


def test_w8a16_within_half_a_percent(real: Real) -> None:
    model, _ = _quantized(real, "w8a16", smooth=0.0, min_sqnr=0.0)
    assert abs(_increase(real, model)) <= 0.5


def test_without_the_fixes_per_tensor_int8_fails_the_bar(real: Real) -> None:
    """The measure has teeth: per-tensor dynamic W8A8 with no smoothing loses > 20 % on this model."""
    model, _ = _quantized(real, "w8a8-dynamic", smooth=0.0, min_sqnr=0.0, activations="per-tensor")
    assert _increase(real, model) > 20.0


def test_smoothing_adds_no_op_on_the_real_model(real: Real) -> None:
    result = SmoothQuant(calibration=str(real.calibration), tokenizer=str(real.tokenizer), samples=1)(real.float_model)
    assert result.stats["activations_smoothed"] == 91
    before = sorted(node.op_type for node in real.float_model.graph.node)
    assert sorted(node.op_type for node in result.model.graph.node) == before
