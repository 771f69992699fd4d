"""`passes tune`: a resumable autotuning session for one model and target, in one folder.

    report = tune("graph.onnx", "host", "sessions/llama-host", TuneOptions(trials=200))

The model goes through what `passes run` does (pipeline, quantization, lowering); its kernels become
tasks (`_tasks`), INT8 kernels first. The trial budget of a run is split over the tasks by their share of
the model's FLOPs, counting what earlier runs measured, so resuming with more trials tops up the tasks
that are behind. Each task's untuned latency is measured once per session and kept in `session.json`;
records go to the session's MetaSchedule JSON database (`_database`), flushed after every batch, so a
run killed at any moment loses at most the batch in flight and the next run goes on from the records
without measuring anything twice. Ends with the model itself: its latency built with the default
schedules and with the session's best ones (when the target is this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tvm

from passes.lowering._dispatch import kernel_families
from passes.lowering._errors import LoweringError, last_line
from passes.tuning import _measure
from passes.tuning._database import SessionDatabase
from passes.tuning._errors import TuningError
from passes.tuning._measure import Measurement, Tracker
from passes.tuning._search import SearchConfig, TaskState, context, search
from passes.tuning._tasks import TuningTask, default_schedule, extract_tasks

SESSION_FILE = "session.json"
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class TuneOptions:
    """Budget and measurement of one run: `trials` new measurements in all, spread over the tasks."""

    trials: int = 64
    builders: int = max(1, (os.cpu_count() or 2) // 2)
    tracker: Tracker | None = None
    measurement: Measurement = field(default_factory=Measurement)
    search: SearchConfig = field(default_factory=SearchConfig)
    model_latency: bool = True  # time the whole model untuned vs tuned at the end (local targets)
    int8_only: bool = False  # tune only the kernels dispatched to passes.kernels


@dataclass
class TaskReport:
    name: str
    space: str
    calls: int
    flops: float
    flops_share: float
    trials_before: int
    trials_new: int
    reused: int
    errors: int
    untuned_s: float | None
    tuned_s: float | None

    @property
    def speedup(self) -> float | None:
        return self.untuned_s / self.tuned_s if self.untuned_s and self.tuned_s else None


@dataclass
class TuneReport:
    """Everything a run did; `report.json` in the session folder is `to_dict()`."""

    target: str
    model: str
    session: str
    measured_on: str
    trials_new: int
    measured_again: int
    records: int
    seconds: float
    tasks: list[TaskReport]
    model_latency: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, task in zip(data["tasks"], self.tasks):
            row["speedup"] = task.speedup
        return data


def tune(model_path: str | os.PathLike[str], target_spec: str | os.PathLike[str], session_dir: str | os.PathLike[str],
         options: TuneOptions | None = None, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
         quantize: str = "auto", calibration: str | os.PathLike[str] | None = None,
         on_start: Callable[[list[TaskState]], None] | None = None,
         on_progress: Callable[[TaskState], None] | None = None) -> TuneReport:
    """Tune the kernels of `model_path` for `target_spec`, continuing the session in `session_dir`."""
    from passes.lowering import lower
    from passes.frontend.prepare import prepare_model
    from passes.targets import load_target

    options = options or TuneOptions()
    if options.trials < 0:
        raise TuningError(f"--trials must be >= 0, got {options.trials}")
    target = load_target(target_spec)
    servers = _measure.count_servers(options.tracker) if options.tracker is not None else 0
    measured_on = _where(target, options.tracker, servers)
    folder = Path(session_dir)
    _check_session_dir(folder, Path(model_path))
    database = SessionDatabase(folder)
    repeated_before = database.repeated_measurements()
    started = time.perf_counter()
    prepared = prepare_model(model_path, target, input_shapes=input_shapes, quantize=quantize,  # type: ignore[arg-type]
                             calibration=calibration)
    lowered = lower(prepared.model, target)
    tasks = [t for t in extract_tasks(lowered.module, lowered.reference_kernels, kernel_families(lowered.dispatched))
             if t.int8 or not options.int8_only]
    if not tasks:
        raise TuningError(f"{model_path} has no kernel to tune for {target.name}")
    states = [TaskState(task, 0, before=len(database.records(task.workload))) for task in tasks]
    for state, budget in zip(states, allocate(tasks, [s.before for s in states], options.trials)):
        state.budget = budget
    tvm_target = tuning_target(lowered.tvm_target, target, options.tracker)
    measure = _measurer(target, tvm_target, options, servers)
    session = _Session.load(folder)
    _measure_baselines(states, lowered, measure, session, database, tvm_target, target)
    if on_start:
        on_start(states)
    _search_all(states, tvm_target, database, measure, options, on_progress or (lambda _: None))
    report = _report(target.name, str(model_path), folder, measured_on, states, database, session,
                     database.repeated_measurements() - repeated_before, time.perf_counter() - started)
    if options.model_latency and options.tracker is None:
        report.model_latency = _model_latency(prepared.model, target, database)
    _write_json(folder / REPORT_FILE, report.to_dict())
    return report


def allocate(tasks: Sequence[TuningTask], done: Sequence[int], trials: int) -> list[int]:
    """New trials per task: each task's share of all trials (earlier + these) follows its FLOPs share,
    topping up the tasks furthest behind; the shares of tasks already ahead go to the others."""
    total_weight = sum(task.weight for task in tasks) or 1.0
    goal = sum(done) + trials
    wanted = [max(0.0, goal * task.weight / total_weight - before) for task, before in zip(tasks, done)]
    scale = trials / sum(wanted) if sum(wanted) > 0 else 0.0
    budgets = [int(w * scale) for w in wanted]
    order = sorted(range(len(tasks)), key=lambda i: (-(wanted[i] * scale - budgets[i]), i))
    for i in order[: trials - sum(budgets)]:
        budgets[i] += 1
    return budgets


def tuning_target(tvm_target: tvm.target.Target, target: Any, tracker: Tracker | None) -> tvm.target.Target:
    """The TVM target with the core count MetaSchedule's CPU rules need (`num-cores`): this machine's
    when measuring here, the target description's CPU cores over RPC."""
    if tvm_target.kind.name != "llvm" or "num-cores" in tvm_target.attrs:
        return tvm_target
    cores = os.cpu_count() if tracker is None else getattr(getattr(target, "cpu", None), "cores", None)
    config = dict(tvm_target.export())
    config["num-cores"] = int(cores or 1)
    return tvm.target.Target(config)


def _where(target: Any, tracker: Tracker | None, servers: int) -> str:
    """Where candidates are measured; refuses targets with nothing to measure them on."""
    if tracker is not None:
        return f"TVM RPC tracker {tracker}, {servers} device(s)"
    from passes.lowering._build import is_this_machine

    if target.backend == "llvm" and is_this_machine(target.tvm_target()):
        return "this machine"
    kind = (f"a GPU target ({target.backend})" if target.device == "gpu"
            else f"a CPU of another architecture ({target.tvm_target().attrs.get('mtriple', '?')})")
    raise TuningError(
        f"target {target.name} is {kind} and this machine cannot measure it: register the device with a TVM RPC "
        f"tracker and pass --tracker HOST:PORT --key KEY, or run `passes tune` on a machine that has the device"
    )


def _measurer(target: Any, tvm_target: tvm.target.Target, options: TuneOptions,
              servers: int = 0) -> Callable[[list[Any]], list[Any]]:
    """measure(candidates) -> runner results: build with the session's builder, run locally or over RPC
    (on up to `servers` devices at a time)."""
    from tvm.s_tir import meta_schedule as ms

    builder = _measure.builder(options.builders)
    runner = (_measure.rpc_runner(options.tracker, options.measurement, min(options.builders * 2, servers))
              if options.tracker is not None else _measure.local_runner(options.measurement))
    device = "cpu" if target.device == "cpu" else target.backend

    def measure(candidates: list[Any]) -> list[Any]:
        if not candidates:
            return []
        built = builder.build([ms.builder.BuilderInput(c.sch.mod, tvm_target) for c in candidates])
        try:
            results: list[Any] = [None] * len(candidates)
            inputs, where = [], []
            for index, (candidate, done) in enumerate(zip(candidates, built)):
                if done.error_msg is not None:
                    results[index] = ms.runner.RunnerResult(run_secs=None, error_msg=f"build: {done.error_msg}")
                    continue
                inputs.append(ms.runner.RunnerInput(done.artifact_path, device, candidate.args_info))
                where.append(index)
            for index, future in zip(where, runner.run(inputs)):
                results[index] = future.result()
            return results
        finally:  # MetaSchedule's own task scheduler removes what its builder made; this loop replaces it
            for done in built:
                if done.artifact_path is not None:
                    shutil.rmtree(os.path.dirname(done.artifact_path), ignore_errors=True)

    return measure


def _measure_baselines(states: list[TaskState], lowered: Any, measure: Callable[[list[Any]], list[Any]],
                       session: _Session, database: SessionDatabase, tvm_target: tvm.target.Target,
                       target: Any) -> None:
    """Time each task's untuned kernel once per session. On CPUs the untuned schedule is stored as a
    record too, so a record is only ever applied when it beats what the build had without it."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    missing = [s for s in states if session.baseline(s.task) is None and s.task.name in lowered.kernels]
    if not missing:
        return
    schedules = []
    for state in missing:
        if lowered.device == "cpu":
            schedules.append(default_schedule(state.task, target, lowered.tvm_target))
        else:  # a GPU kernel as the target's default rules scheduled it (no trace to store)
            schedules.append(s_tir.Schedule(lowered.kernels[state.task.name].with_attr("global_symbol", "main")))
    candidates = [ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod)) for sch in schedules]
    for state, sch, candidate, result in zip(missing, schedules, candidates, measure(candidates)):
        if not result.run_secs:
            continue
        session.set_baseline(state.task, sum(float(s) for s in result.run_secs) / len(result.run_secs))
        if lowered.device == "cpu" and database.measured(sch.mod) is None:
            database.commit(ms.database.TuningRecord(sch.trace, database.workload(state.task.workload),
                                                     result.run_secs, tvm_target, candidate.args_info), sch.mod)
    database.flush()
    session.save()


def _search_all(states: list[TaskState], tvm_target: tvm.target.Target, database: SessionDatabase,
                measure: Callable[[list[Any]], list[Any]], options: TuneOptions,
                on_progress: Callable[[TaskState], None]) -> None:
    from tvm.s_tir import meta_schedule as ms

    cost_model = ms.cost_model.XGBModel(num_tuning_cores=max(1, (os.cpu_count() or 2) // 2), tree_method="auto")
    for state in states:
        if state.budget <= 0:
            continue
        ctx = context(state.task, tvm_target, options.search, max(1, (os.cpu_count() or 2) // 2))
        search(state, ctx, database, measure, cost_model, options.search, on_progress)


def _model_latency(model: Any, target: Any, database: SessionDatabase) -> dict[str, float] | None:
    """Seconds per call of the whole model, built untuned and with the session's records (VM, this CPU)."""
    from passes.lowering import build, lower
    from passes.numerics.verify import random_feeds

    try:
        feeds = random_feeds(model, 0)
        untuned = _time_model(build(lower(model, target), target), feeds)
        tuned = _time_model(build(lower(model, target, tuning=database.memory), target), feeds)
    except LoweringError:
        raise
    except Exception as err:  # TVM's errors from running a build
        raise TuningError(f"timing the built model failed: {last_line(err)}") from err
    return {"untuned_s": untuned, "tuned_s": tuned, "speedup": untuned / tuned if tuned else 0.0}


def _time_model(built: Any, feeds: Mapping[str, Any]) -> float:
    from tvm import relax

    machine = relax.VirtualMachine(built.executable, tvm.cpu())
    arguments = [tvm.runtime.tensor(feeds[spec.name]) for spec in built.lowered.inputs]
    timer = machine.time_evaluator("main", tvm.cpu(), number=5, repeat=5, min_repeat_ms=50)
    return float(sorted(timer(*arguments).results)[2])  # the median of 5 repeats


def _report(target: str, model: str, folder: Path, measured_on: str, states: list[TaskState],
            database: SessionDatabase, session: _Session, measured_again: int, seconds: float) -> TuneReport:
    total = sum(s.task.weight for s in states) or 1.0
    rows = [TaskReport(s.task.name, s.task.space, s.task.calls, s.task.flops, s.task.weight / total, s.before, s.new,
                       s.reused, s.errors, session.baseline(s.task), _best(database, s.task)) for s in states]
    return TuneReport(target, model, str(folder), measured_on, sum(s.new for s in states),
                      measured_again, len(database), seconds, rows)


def _best(database: SessionDatabase, task: TuningTask) -> float | None:
    best = database.best(task.workload)
    return sum(float(s) for s in best.run_secs) / len(best.run_secs) if best is not None and best.run_secs else None


class _Session:
    """`session.json`: the untuned latency of each task, by workload hash (measured once per session)."""

    def __init__(self, path: Path, baselines: dict[str, float]) -> None:
        self.path, self.baselines = path, baselines

    @classmethod
    def load(cls, folder: Path) -> _Session:
        path = folder / SESSION_FILE
        if not path.exists():
            return cls(path, {})
        try:
            data = json.loads(path.read_text())
            return cls(path, {str(k): float(v) for k, v in data.get("untuned_s", {}).items()})
        except (ValueError, AttributeError, TypeError) as err:
            raise TuningError(f"{path} is not a passes tuning session file ({err})") from err

    def baseline(self, task: TuningTask) -> float | None:
        return self.baselines.get(_key(task))

    def set_baseline(self, task: TuningTask, seconds: float) -> None:
        self.baselines[_key(task)] = seconds

    def save(self) -> None:
        _write_json(self.path, {"format": 1, "untuned_s": self.baselines})


def _key(task: TuningTask) -> str:
    import tvm_ffi

    return str(int(tvm_ffi.structural_hash(task.workload)))


def _check_session_dir(folder: Path, model_path: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise TuningError(f"session folder {folder} exists and is not a folder")
    if folder.resolve() == model_path.resolve().parent and not (folder / SESSION_FILE).exists() and any(
            p.suffix != ".onnx" for p in folder.iterdir()):
        raise TuningError(f"use a folder of its own for the session, not {folder} (it holds the model and other files)")
    folder.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: Any) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".partial-", suffix=".json", delete=False) as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)
