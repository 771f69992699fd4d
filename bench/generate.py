"""Greedy generation with a KV cache: a `passes run` host generator next to onnxruntime running the
ORIGINAL export with its own (growing, Concat) cache, on the same threads, in one process run.

- passes: `passes run MODEL --target host --context C --prefill-chunk P -q SCHEME`, then the build's
  prefill and decode (caches written in place, weights from params/) through the Relax VM;
- onnxruntime: the export as exported, all graph optimisations on, `intra_op_num_threads` = threads; the
  prompt in one call, then one token per call with the presents fed back as the past.

Tokens must be equal for fp32 (`-q none`); decode tokens/s is the best of `--repeat` interleaved runs of
`--new` tokens each (the machine's speed drifts; interleaving keeps the tools on equal terms). The table
and the JSON name the CPU, the threads and the int8 kernel family the build dispatched to.

    python bench/generate.py [--model PATH | --smollm2] [--context 256 --prefill-chunk 32]
                             [--schemes none] [--prompt 16] [--new 32] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class OriginalExport:
    """onnxruntime on the export as exported: past_key_values in, present out, the cache grows by Concat."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.pasts = [name for name in self.inputs if name.startswith("past_key_values")]

    def generate(self, prompt: list[int], new: int) -> tuple[list[int], float, list[float]]:
        caches = {}
        for name in self.pasts:
            dims = self.inputs[name].shape
            caches[name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
        tokens, times, position = list(prompt), [], 0
        started = time.perf_counter()
        step = list(prompt)
        out: list[int] = []
        prefill = 0.0
        while len(out) < new:
            total = position + len(step)
            feeds = {"input_ids": np.array([step], np.int64), "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.arange(position, total, dtype=np.int64)[None]} | caches
            begin = time.perf_counter()
            results = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
            if position == 0:
                prefill = time.perf_counter() - started
            else:
                times.append(time.perf_counter() - begin)
            caches = {past: results[past.replace("past_key_values", "present")] for past in self.pasts}
            token = int(np.argmax(results["logits"][0, -1]))
            out.append(token)
            position, step = total, [token]
        del tokens
        return out, prefill, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a KV-cache export (default: the bundled sample)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M's KV export (needs the test extra)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prefill-chunk", type=int, default=32)
    parser.add_argument("--schemes", nargs="+", default=["none"])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (seeded)")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("out/generate.json"))
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from int8_gemm import _cpu
    from rich.console import Console
    from rich.table import Table

    from passes.deploy.run import run_for_target
    from passes.lowering._generate import HostGenerator

    folder = Path(tempfile.mkdtemp(prefix="passes-generate-bench-"))
    model = args.model
    if args.smollm2:
        from tests.real_models.kv_export import export_smollm2_kv

        model, _ = export_smollm2_kv(Path(".pytest_cache/d/real-exports"))
    if model is None:
        from passes.core.io import save_model
        from passes.samples import build_sample

        model = save_model(build_sample("tiny-llama", kv_cache=True, hidden=512, layers=4, kv_heads=2, vocab=8000),
                           folder / "sample_kv.onnx")
    reference = OriginalExport(model, args.threads)
    vocab = reference.session.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 256
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, args.prompt)]
    rows = []
    for scheme in args.schemes:
        started = time.perf_counter()
        report = run_for_target(model, "host", folder / scheme, quantize=scheme, context=args.context,
                                prefill_chunk=args.prefill_chunk)
        build_seconds = time.perf_counter() - started
        ours = HostGenerator.from_folder(folder / scheme / "host")
        best: dict[str, dict[str, float]] = {"passes": {}, "onnxruntime": {}}
        tokens = {}
        for _ in range(args.repeat):
            result = ours.generate(prompt, args.new)
            tokens["passes"] = result.tokens
            _keep_best(best["passes"], len(prompt) / result.prefill_seconds, result.decode_seconds)
            out, prefill, times = reference.generate(prompt, args.new)
            tokens["onnxruntime"] = out
            _keep_best(best["onnxruntime"], len(prompt) / prefill, times)
        gen = report.generator or {}
        rows.append({"model": str(model.name if not args.smollm2 else "SmolLM2-135M"), "scheme": scheme,
                     "family": ",".join(report.dispatched) or "-", "build_seconds": build_seconds,
                     "tokens_equal": tokens["passes"] == tokens["onnxruntime"], "tokens": tokens,
                     "passes": best["passes"], "onnxruntime": best["onnxruntime"],
                     "decode_ratio": best["passes"]["decode_tok_s"] / best["onnxruntime"]["decode_tok_s"],
                     "prefill_ratio": best["passes"]["prefill_tok_s"] / best["onnxruntime"]["prefill_tok_s"],
                     "params_bytes": gen.get("weights", {}).get("bytes"), "code_bytes": gen.get("code_bytes")})
    cpu = _cpu()
    table = Table(title=f"Greedy generation on {cpu['model']} ({' '.join(cpu['int8_flags'])}), {args.threads} threads, "
                        f"prompt {args.prompt}, {args.new} new tokens, best of {args.repeat} interleaved "
                        f"(ratio = passes / onnxruntime tok/s)")
    for column in ("model", "scheme", "int8 family", "tokens equal", "decode tok/s passes", "onnxruntime",
                   "ratio", "prefill tok/s passes", "onnxruntime", "ratio", "P50 ms"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model"], row["scheme"], row["family"], str(row["tokens_equal"]),
                      f"{row['passes']['decode_tok_s']:.1f}", f"{row['onnxruntime']['decode_tok_s']:.1f}",
                      f"{row['decode_ratio']:.2f}", f"{row['passes']['prefill_tok_s']:.1f}",
                      f"{row['onnxruntime']['prefill_tok_s']:.1f}", f"{row['prefill_ratio']:.2f}",
                      f"{row['passes']['p50_ms']:.2f}")
    Console().print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    return 0


def _keep_best(best: dict[str, float], prefill: float, decode_seconds: list[float]) -> None:
    decode = len(decode_seconds) / sum(decode_seconds)
    if decode > best.get("decode_tok_s", 0.0):
        best.update(decode_tok_s=decode, p50_ms=float(np.median(decode_seconds) * 1e3))
    best["prefill_tok_s"] = max(best.get("prefill_tok_s", 0.0), prefill)


if __name__ == "__main__":
    sys.exit(main())
