"""How fast is `canonicalize` next to its peers, and how does its cost grow with graph size?

Side by side, in one process run, on the bundled tiny-llama decoder at 2, 8 and 32 layers (the 32-layer
TorchScript-idiom graph has ~6,500 nodes): our default pipeline (`passes.optimize`, checker on, and
with the checker off), onnxsim, onnxslim, onnxruntime's offline optimizer (ORT_ENABLE_EXTENDED, writing the
optimized model), and onnxoptimizer. Each tool is warmed up once (imports excluded); each timing is
the best of `--repeat` runs, the tools taking turns. Prints a table with
ratios against onnxsim and growth against the smallest graph, and writes JSON. A control beside them: the
time per node of a bare walk over the imported graph, whose growth is what the machine's caches add to
work that is linear by construction (it varies with what else the host runs).

    python bench/pipeline_speed.py [--layers 2 8 32] [--real] [--repeat 3] [--json out/pipeline_speed.json]

`--real` adds the tiny random-weight Llama/Qwen2/GPT-2/BERT exports of the test suite (TorchScript and
dynamo exporters; needs the `test` extra, exported once into out/real-exports).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

import passes
from passes.infra.manager import PassManager
from passes.samples import build_sample


def _interleaved(model: onnx.ModelProto, repeat: int) -> dict[str, float]:
    """Each tool's best of `repeat` runs, the tools taking turns within each repeat: on a shared machine
    whose speed drifts over minutes, a slow spell then costs every tool alike instead of one."""
    best = dict.fromkeys(TOOLS, float("inf"))
    for _ in range(repeat):
        for name, fn in TOOLS.items():
            gc.collect()  # the last tool's garbage is collected here, not inside the next tool's timing
            start = time.perf_counter()
            fn(model)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _bare_walk_ns(model: onnx.ModelProto, repeat: int) -> float:
    """A control, not a tool: nanoseconds per node of one bare walk over the imported graph (every node,
    its inputs, their readers), best of `repeat`. Its growth from the first row says how much dearer the
    machine makes each node of a larger graph (caches) for work that is linear by construction."""
    from passes.core import ir

    graph = ir.import_graph(model)
    best = float("inf")
    for _ in range(max(repeat, 5)):
        start = time.perf_counter()
        readers = 0
        for node in graph.nodes:
            for tensor in node.inputs:
                readers += len(tensor.outputs)
        best = min(best, time.perf_counter() - start)
    return best * 1e9 / len(graph.nodes)


def _onnxsim(model: onnx.ModelProto) -> None:
    import onnxsim

    onnxsim.simplify(model)


def _onnxslim(model: onnx.ModelProto) -> None:
    import onnxslim

    onnxslim.slim(model)


def _ort_offline(model: onnx.ModelProto) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _onnxoptimizer(model: onnx.ModelProto) -> None:
    import onnxoptimizer

    onnxoptimizer.optimize(model)


TOOLS: dict[str, Callable[[onnx.ModelProto], object]] = {
    "ours": passes.optimize,
    "ours -chk": lambda m: PassManager(check=False).run(m),
    "onnxsim": _onnxsim,
    "onnxslim": _onnxslim,
    "ORT": _ort_offline,
    "onnxopt": _onnxoptimizer,
}


def _models(layers: list[int], real: bool) -> list[tuple[str, onnx.ModelProto]]:
    models = [(f"tiny-llama x{count}", build_sample("tiny-llama", layers=count)) for count in layers]
    if real:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
        from tests.real_models.export import ARCHS, EXPORTERS, export_model

        cache = Path("out/real-exports")
        cache.mkdir(parents=True, exist_ok=True)
        for arch in ARCHS:
            for exporter in EXPORTERS:
                models.append((f"{arch} {exporter}", passes.load_model(export_model(arch, exporter, cache))))
    return models


def run(layers: list[int], repeat: int, real: bool = False) -> dict[str, object]:
    from int8_gemm import _cpu  # this CPU's model name and int8 flags, as the other benches record them

    warm_up = build_sample("tiny-llama", layers=1)
    for fn in TOOLS.values():  # imports and first-call set-up are not what we compare
        fn(warm_up)
    rows = []
    for label, model in _models(layers, real):
        nodes_after = len(passes.optimize(model).graph.node)
        times = _interleaved(model, repeat)
        rows.append({"model": label, "nodes": len(model.graph.node), "nodes_after": nodes_after, "seconds": times,
                     "walk_ns_per_node": _bare_walk_ns(model, repeat)})
    return {
        "bench": "pipeline_speed",
        "machine": {"cpu": _cpu(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "repeat": repeat,
        "rows": rows,
    }


def render(result: dict[str, object]) -> None:
    rows = result["rows"]
    assert isinstance(rows, list)
    base = rows[0]
    machine = result["machine"]
    assert isinstance(machine, dict)
    table = Table(
        title=f"canonicalize vs peers on {machine['cpu']['model']}, seconds, best of {result['repeat']} "
        "(ours -chk: without the per-pass checker; ORT: onnxruntime offline optimizer)"
    )
    table.add_column("model")
    table.add_column("nodes", justify="right")
    for name in TOOLS:
        table.add_column(name, justify="right")
    table.add_column("ours/onnxsim", justify="right")
    table.add_column("ours/onnxslim", justify="right")
    table.add_column("growth vs first row: nodes / ours / onnxsim", justify="right")
    table.add_column("bare walk ns/node (growth)", justify="right")
    for row in rows:
        secs = row["seconds"]
        ratio = secs["ours"] / secs["onnxsim"]
        growth = [row["nodes"] / base["nodes"], secs["ours"] / base["seconds"]["ours"],
                  secs["onnxsim"] / base["seconds"]["onnxsim"]]
        walk = row["walk_ns_per_node"]
        table.add_row(
            row["model"], f"{row['nodes']} -> {row['nodes_after']}",
            *(f"{secs[name]:.3f}" for name in TOOLS),
            f"{ratio:.2f}x", f"{secs['ours'] / secs['onnxslim']:.2f}x", " / ".join(f"{g:.1f}x" for g in growth),
            f"{walk:.0f} ({walk / base['walk_ns_per_node']:.2f}x)",
        )
    console = Console()
    if not console.is_terminal:  # a pipe or a log: the whole table, not one cut to 80 columns
        console = Console(width=200)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also time the real PyTorch exports")
    parser.add_argument("--json", type=Path, default=Path("out/pipeline_speed.json"))
    args = parser.parse_args()
    result = run(args.layers, args.repeat, args.real)
    render(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
