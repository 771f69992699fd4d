"""Does `passes run` build a 1.1B-parameter generator on this machine, and at what cost?

A Llama export with TinyLlama-1.1B's shapes (hidden 2048, 22 layers, GQA 32 / 4 heads, MLP 5632, vocab
32000; random weights, > 4 GB of float32 in external data) and a KV cache, from the bundled sample
builder (the TorchScript idiom). `passes run` for each target runs in a child process under
`/usr/bin/time -v`: wall time and peak resident memory come from the kernel's accounting of that process.
The bar (issue "Generate text"): under 15 minutes and under 16 GB each, on 2 cores and 24 GB.

    python bench/scale_generator.py [--targets sd8gen2 host] [--context 512] [--prefill-chunk 64]
                                    [--quantize auto] [--json out/scale.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINYLLAMA = {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000}


def build_export(folder: Path) -> tuple[Path, int]:
    from passes.core.io import save_model
    from passes.samples import build_sample

    model = build_sample("tiny-llama", kv_cache=True, **TINYLLAMA)
    parameters = sum(int(__import__("numpy").prod(t.dims)) for t in model.graph.initializer)
    path = save_model(model, folder / "tinyllama-kv.onnx", external_data=True)
    return path, parameters


def _parameters(path: Path) -> int:
    import numpy as np
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def run_target(model: Path, target: str, out: Path, args: argparse.Namespace) -> dict[str, object]:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "passes.cli", "run", str(model), "--target", target,
               "-o", str(out), "--context", str(args.context), "--prefill-chunk", str(args.prefill_chunk),
               "--quantize", args.quantize, "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    row: dict[str, object] = {"target": target, "ok": done.returncode == 0, "wall_s": wall,
                              "peak_rss_gb": int(peak.group(1)) / 2**20 if peak else None}
    if done.returncode == 0:
        report = json.loads(done.stdout)
        row["build_s"] = report["build_seconds"]
        row["generator"] = report["generator"]
        row["host_check"] = report["host_check"]
        row["quantization"] = (report["quantization"] or {}).get("scheme")
    else:
        lines = done.stderr.splitlines()
        row["error"] = [line for line in lines if line.startswith("error")][:1] or \
            [line for line in lines if "signal" in line or "Exit status" in line] or lines[-25:]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["sd8gen2", "host"])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--json", type=Path, default=Path("out/scale.json"))
    parser.add_argument("--keep", type=Path, default=None, help="build (or reuse) the export in this folder")
    args = parser.parse_args(argv)
    from int8_gemm import _cpu
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="passes-scale-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if (folder / "tinyllama-kv.onnx").is_file():
            model = folder / "tinyllama-kv.onnx"
            parameters = _parameters(model)
        else:
            model, parameters = build_export(folder)
        export_s = time.perf_counter() - started
        rows = [run_target(model, target, Path(scratch) / "out", args) for target in args.targets]
    table = Table(title=f"passes run on a {parameters / 1e9:.2f}B-parameter Llama KV export ({_cpu()['model']}, "
                        f"context {args.context}, prefill chunk {args.prefill_chunk}; export built in {export_s:.0f} s)")
    for column in ("target", "ok", "wall", "peak RSS", "params/", "model.tar", "host check"):
        table.add_column(column)
    for row in rows:
        gen = row.get("generator") or {}
        check = row.get("host_check")
        table.add_row(str(row["target"]), str(row["ok"]), f"{row['wall_s'] / 60:.1f} min",
                      f"{row['peak_rss_gb']:.1f} GB" if row["peak_rss_gb"] else "?",
                      f"{gen.get('weights', {}).get('bytes', 0) / 1e9:.2f} GB" if gen else "-",
                      f"{gen.get('code_bytes', 0) / 1e6:.1f} MB" if gen else "-",
                      "-" if not check else ("passed" if check["passed"] else "FAILED"))
    Console().print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"parameters": parameters, "export_seconds": export_s, "rows": rows,
                                     "cpu": _cpu()}, indent=2, default=str) + "\n")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
