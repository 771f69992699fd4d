"""How fast is a whole model built by `passes` for this CPU next to onnxruntime on the same model?

Side by side, in one process run, on `--threads` threads (TVM_NUM_THREADS and ORT's intra-op pool):

- passes: `passes run`'s preparation for `host` (the target pipeline, the scheme's quantization), lowered
  and built with the default CPU schedules (`passes/lowering/_cpu_rules.py`, untuned) and, with
  `--tune N`, again after a `passes tune` session of N trials; run with the Relax VM;
- onnxruntime: the same prepared model (so the same quantized graph), all graph optimizations on.

Models: (a) the bundled decoder at a realistic width (`--hidden 1024 --layers 4`), (b) with `--real`, a
Llama of the same sizes exported from `transformers` by the TorchScript exporter (random weights, cached in
out/real-exports; needs the `test` extra). Schemes: fp32 (`none`), W8A8 (`w8a8-static`), W8A16. Shapes:
1x128 (prefill) and 1x1 (a decode-shaped input). Each candidate is timed `--repeat` times after a warm-up;
median and P90 in a table and JSON, with the CPU and the int8 kernel family the build dispatched to.

    python bench/e2e.py [--hidden 1024 --layers 4] [--real] [--schemes none w8a8-static w8a16]
                        [--seq 128 1] [--threads 2] [--tune 64] [--json out/e2e.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timings(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.percentile(times, 90))


def _models(args: argparse.Namespace, folder: Path) -> list[tuple[str, Path]]:
    from passes.core.io import save_model
    from passes.samples import build_sample

    sample = folder / "sample.onnx"
    save_model(build_sample("tiny-llama", hidden=args.hidden, layers=args.layers), sample)
    models = [(f"sample h{args.hidden} x{args.layers}", sample)]
    if args.real:
        from tests.real_models.export import export_model

        cache = Path("out/real-exports")
        cache.mkdir(parents=True, exist_ok=True)
        models.append(("transformers llama h1024 x4", export_model("llama-1024", "torchscript", cache)))
    return models


def _measure(name: str, path: Path, scheme: str, seq: int, args: argparse.Namespace,
             session: Path | None) -> dict[str, object]:
    import onnxruntime as ort

    from passes.frontend.prepare import prepare_model
    from passes.lowering import build, lower, run_host
    from passes.numerics.verify import random_feeds
    from passes.targets import load_target

    host = load_target("host")
    shapes = {"input_ids": (1, seq)}
    prepared = prepare_model(path, host, input_shapes=shapes, quantize=scheme)  # type: ignore[arg-type]
    feeds = random_feeds(prepared.model, 0, input_shapes=prepared.shapes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    peer = ort.InferenceSession(prepared.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    lowered = lower(prepared.model, host)
    built = build(lowered, host)
    row: dict[str, object] = {"model": name, "scheme": scheme, "tokens": seq,
                              "family": ",".join(lowered.dispatched) or "-"}
    row["passes_median_s"], row["passes_p90_s"] = _timings(lambda: run_host(built, feeds), args.repeat)
    row["onnxruntime_median_s"], row["onnxruntime_p90_s"] = _timings(lambda: peer.run(None, feeds), args.repeat)
    if session is not None:
        from passes.tuning import load_session

        tuned = build(lower(prepared.model, host, tuning=load_session(session).memory), host)
        row["tuned_median_s"], row["tuned_p90_s"] = _timings(lambda: run_host(tuned, feeds), args.repeat)
    return row


def _tune(path: Path, scheme: str, seq: int, trials: int, folder: Path) -> Path:
    from passes.tuning import TuneOptions, tune

    session = folder / f"session-{path.stem}-{scheme}-{seq}"
    tune(path, "host", session, TuneOptions(trials=trials, model_latency=False),
         input_shapes={"input_ids": (1, seq)}, quantize=scheme)
    return session


def _render(rows: list[dict[str, object]], cpu: str, threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    tuned = any("tuned_median_s" in row for row in rows)
    table = Table(title=f"Whole model on {cpu}, {threads} threads: median / P90 ms (ratio = passes / onnxruntime)")
    for column in ["model", "scheme", "tokens", "int8 family", "passes", "onnxruntime", "ratio",
                   *(["tuned", "tuned ratio"] if tuned else [])]:
        table.add_column(column, justify="right")
    for row in rows:
        ours, peer = float(row["passes_median_s"]), float(row["onnxruntime_median_s"])
        cells = [str(row["model"]), str(row["scheme"]), str(row["tokens"]), str(row["family"]),
                 f"{ours * 1e3:.1f} / {float(row['passes_p90_s']) * 1e3:.1f}",
                 f"{peer * 1e3:.1f} / {float(row['onnxruntime_p90_s']) * 1e3:.1f}", f"{ours / peer:.2f}x"]
        if tuned:
            value = row.get("tuned_median_s")
            cells += ["-", "-"] if value is None else [f"{float(value) * 1e3:.1f}", f"{float(value) / peer:.2f}x"]
        table.add_row(*cells)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--real", action="store_true", help="add a transformers Llama export of the same sizes")
    parser.add_argument("--schemes", nargs="+", default=["none", "w8a8-static", "w8a16"])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--tune", type=int, default=0, help="also build after a tuning session of this many trials")
    parser.add_argument("--json", type=Path, default=Path("out/e2e.json"))
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from int8_gemm import _cpu

    cpu = _cpu()
    rows = []
    with tempfile.TemporaryDirectory(prefix="passes-e2e-") as scratch:
        folder = Path(scratch)
        for name, path in _models(args, folder):
            for scheme in args.schemes:
                for seq in args.seq:
                    session = _tune(path, scheme, seq, args.tune, folder) if args.tune else None
                    rows.append(_measure(name, path, scheme, seq, args, session))
    _render(rows, f"{cpu['model']} ({' '.join(cpu['int8_flags'])})", args.threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
