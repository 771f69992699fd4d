"""How fast does tuning converge over our INT8 design space compared with MetaSchedule's default space?

For each distinct INT8 matmul of the sample decoder (tiny-llama, quantized static W8A8 for `host`), in
one run on this machine, side by side and with the same budget, batch and seed:

- ours: `passes.kernels.x86_int8.design_space` of the kernel's ISA over its workload (`shifted_gemm` or `widened_gemm`, packed weights);
- default: MetaSchedule's post-order-apply space (its CPU rules) over the same product written as TVM's
  legalized int8 matmul, C_i32[M, N] = sum_k i32(A_u8[M, k]) * i32(B_s8[k, N]) (what the lowering would
  build without our kernel). TVM's shipped VNNI intrinsic does not verify under its LLVM 22, so the default
  space here has no tensorized variant.

Records best latency after every batch; reports, per kernel and space, the trials needed to reach 95 % of
the best latency either space found (">budget" when never), and the ratio ours / default. Then resumes our
session with the same settings and counts measurements repeated (should be 0).

    python bench/tuning.py [--trials 32] [--batch 8] [--json out/tuning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _default_workload(task: Any) -> Any:
    """TVM's plain int8 matmul of the same sizes as a dispatched VNNI kernel (A[M, K], C[M, N])."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a_info, *_, c_info = ms.arg_info.ArgInfo.from_prim_func(task.workload["main"])
    (m, k), n = (int(d) for d in a_info.shape), int(c_info.shape[1])
    a = te.placeholder((m, k), "uint8", name="A")
    b = te.placeholder((k, n), "int8", name="B")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype("int32") * b[r, j].astype("int32"), axis=r), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")})


def _converge(space_task: Any, args: argparse.Namespace, tvm_target: Any, measure: Any, folder: Path,
              budget: int) -> dict[str, Any]:
    from tvm.s_tir import meta_schedule as ms

    from passes.tuning._database import SessionDatabase
    from passes.tuning._search import SearchConfig, TaskState, context, search

    config = SearchConfig(batch=args.batch, population=args.population, seed=args.seed)
    database = SessionDatabase(folder)
    state = TaskState(space_task, budget)
    curve: list[tuple[int, float]] = []
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=1, tree_method="auto")
    ctx = context(space_task, tvm_target, config, 1)
    search(state, ctx, database, measure, cost_model, config,
           lambda s: curve.append((s.new, s.best_s)) if s.best_s else None)
    return {"curve": curve, "best_s": state.best_s, "trials": state.new, "errors": state.errors,
            "reused": state.reused}


def _repeats(folder: Path) -> int:
    """Records of a session minus distinct candidates: measurements repeated (0 when resume works)."""
    from passes.tuning._database import SessionDatabase

    return SessionDatabase(folder).repeated_measurements()


def _trials_to(curve: list[tuple[int, float]], goal: float) -> int | None:
    return next((trials for trials, best in curve if best <= goal), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=Path("out/tuning.json"))
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnx
    from passes.targets import load_target

    from passes.lowering import lower
    from passes.lowering._dispatch import kernel_families
    from passes.frontend.prepare import prepare_model
    from passes.samples import build_sample
    from passes.tuning import Measurement, TuneOptions
    from passes.tuning._session import _measurer, tuning_target
    from passes.tuning._tasks import TuningTask, extract_tasks

    target = load_target("host")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        model_path = Path(scratch) / "tiny-llama.onnx"
        onnx.save_model(build_sample("tiny-llama"), str(model_path))
        lowered = lower(prepare_model(model_path, target).model, target)
        tasks = [t for t in extract_tasks(lowered.module, lowered.reference_kernels, kernel_families(lowered.dispatched)) if t.int8]
        tvm_target = tuning_target(lowered.tvm_target, target, None)
        options = TuneOptions(builders=max(1, args.threads // 2), measurement=Measurement())
        measure = _measurer(target, tvm_target, options)
        for index, task in enumerate(tasks):
            default = TuningTask(task.name, _default_workload(task), "metaschedule", task.calls, task.flops)
            started = time.perf_counter()
            ours = _converge(task, args, tvm_target, measure, Path(scratch) / f"ours{index}", args.trials)
            theirs = _converge(default, args, tvm_target, measure, Path(scratch) / f"default{index}", args.trials)
            again = _converge(task, args, tvm_target, measure, Path(scratch) / f"ours{index}", args.batch)
            goal = min(ours["best_s"] or float("inf"), theirs["best_s"] or float("inf")) / 0.95
            row = {"kernel": task.name, "flops": task.flops, "ours": ours, "default": theirs,
                   "ours_to_95": _trials_to(ours["curve"], goal), "default_to_95": _trials_to(theirs["curve"], goal),
                   "resumed_new": again["trials"], "resumed_reused": again["reused"],
                   "resumed_measured_again": _repeats(Path(scratch) / f"ours{index}"),
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            print(_line(row, args.trials), flush=True)
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "trials": args.trials, "batch": args.batch, "seed": args.seed, "kernels": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def _line(row: dict[str, Any], budget: int) -> str:
    def trials(value: int | None) -> str:
        return str(value) if value is not None else f">{budget}"

    ours, default = row["ours"], row["default"]
    ratio = (f"{row['ours_to_95'] / row['default_to_95']:.2f}" if row["ours_to_95"] and row["default_to_95"]
             else "ours only" if row["ours_to_95"] else "-")
    return (f"{row['kernel']:26s} ours best {ours['best_s'] * 1e6:8.1f} us in {trials(row['ours_to_95']):>4s} trials"
            f" | default best {default['best_s'] * 1e6:8.1f} us in {trials(row['default_to_95']):>4s} trials"
            f" | ratio {ratio} | resumed +{row['resumed_new']}: {row['resumed_measured_again']} measured again")


if __name__ == "__main__":
    sys.exit(main())
