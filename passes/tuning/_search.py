"""The search of one task: MetaSchedule's evolutionary search over the task's design space, candidates
built and measured in batches, every batch committed to the session database and flushed to disk.

    new trials of a task <= its budget; a candidate measured before (same scheduled module) is answered
    from the database and not measured again

The cost model (XGBoost) is shared by the tasks of a session and, on resume, first learns from the
records already stored, so a resumed session picks up where the last one stood.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from passes.kernels import x86_int8
from passes.tuning._database import SessionDatabase
from passes.tuning._tasks import KERNEL_SPACES, TuningTask


@dataclass(frozen=True)
class SearchConfig:
    """Batch size, population and seed of the evolutionary search."""

    batch: int = 8
    population: int = 64
    seed: int = 0


@dataclass
class TaskState:
    """What a display shows of one task while it is searched."""

    task: TuningTask
    budget: int
    before: int = 0  # trials stored by earlier runs
    new: int = 0  # measured in this run
    reused: int = 0  # proposed again and answered from the database
    best_s: float | None = None
    errors: int = 0
    started: float | None = None

    @property
    def gops(self) -> float | None:
        return self.task.flops / self.best_s / 1e9 if self.best_s else None

    def eta_s(self) -> float | None:
        if self.started is None or not self.new:
            return None
        return (time.perf_counter() - self.started) / self.new * max(self.budget - self.new, 0)


def space_generator(task: TuningTask) -> Any:
    if task.space in KERNEL_SPACES:
        return ms.space_generator.ScheduleFn(
            x86_int8.design_space(x86_int8.isa_named(task.space)), sch_rules=[], postprocs=[],
            mutator_probs={ms.mutator.MutateTileSize(): 1.0},
        )
    return "post-order-apply"


def context(task: TuningTask, target: tvm.target.Target, config: SearchConfig, threads: int) -> Any:
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=config.population, init_min_unmeasured=max(4, config.population // 4),
        genetic_num_iters=2,
    )
    return ms.TuneContext(mod=task.workload, target=target, space_generator=space_generator(task),
                          search_strategy=strategy, task_name=task.name, num_threads=threads,
                          rand_state=config.seed).clone()


def warm_start(ctx: Any, records: list[Any], cost_model: Any) -> None:
    """Teach the cost model the stored records of this task (nothing is measured)."""
    measured = [r for r in records if r.run_secs is not None]
    if not measured:
        return
    candidates = [r.as_measure_candidate() for r in measured]
    results = [ms.runner.RunnerResult(run_secs=list(r.run_secs), error_msg=None) for r in measured]
    cost_model.update(ctx, candidates, results)


def search(state: TaskState, ctx: Any, database: SessionDatabase, measure: Callable[[list[Any]], list[Any]],
           cost_model: Any, config: SearchConfig, on_batch: Callable[[TaskState], None]) -> None:
    """Search until `state.budget` new trials are measured or the space has nothing new to propose."""
    workload = database.workload(state.task.workload)
    records = database.records(state.task.workload)
    warm_start(ctx, records, cost_model)
    state.started = time.perf_counter()
    ctx.pre_tuning(max_trials=state.budget + len(records) + config.batch, num_trials_per_iter=config.batch,
                   design_spaces=ctx.generate_design_space(), database=database.memory, cost_model=cost_model)
    try:
        while state.new < state.budget:
            candidates = ctx.generate_measure_candidates()
            if not candidates:
                break
            results, fresh = _measure_new(state, candidates, database, measure)
            for index in fresh:
                candidate = candidates[index]
                database.commit(ms.database.TuningRecord(candidate.sch.trace, workload, results[index].run_secs,
                                                         ctx.target, candidate.args_info), candidate.sch.mod)
            database.flush()
            cost_model.update(ctx, candidates, results)
            ctx.notify_runner_results(candidates, results)
            _update_best(state, database)
            on_batch(state)
    finally:
        ctx.post_tuning()


def _measure_new(state: TaskState, candidates: list[Any], database: SessionDatabase,
                 measure: Callable[[list[Any]], list[Any]]) -> tuple[list[Any], list[int]]:
    """(runner results for `candidates`, indices measured now): stored results from the database, the
    rest measured now up to what is left of the budget (candidates past it get an error result)."""
    results: list[Any] = [None] * len(candidates)
    fresh = []
    for index, candidate in enumerate(candidates):
        stored = database.measured(candidate.sch.mod)
        if stored is not None:
            results[index] = ms.runner.RunnerResult(run_secs=stored, error_msg=None)
            state.reused += 1
        elif state.new + len(fresh) < state.budget:
            fresh.append(index)
    for index, result in zip(fresh, measure([candidates[i] for i in fresh])):
        results[index] = result
        state.new += 1
        state.errors += result.error_msg is not None
    skipped = ms.runner.RunnerResult(run_secs=None, error_msg="not measured: the budget was spent")
    return [result if result is not None else skipped for result in results], fresh


def _update_best(state: TaskState, database: SessionDatabase) -> None:
    best = database.best(state.task.workload)
    if best is not None and best.run_secs:
        state.best_s = sum(float(s) for s in best.run_secs) / len(best.run_secs)
