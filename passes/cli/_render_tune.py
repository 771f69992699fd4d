"""Rich progress and tables for `passes tune` (only the CLI imports this)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from passes.tuning import TuneReport
    from passes.tuning._search import TaskState

console = Console(highlight=False, stderr=True)
out = Console(highlight=False)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.1f} us"
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"


class TuneProgress:
    """One row per task with trials left: trials done / budget, best latency and GOPS so far, ETA."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"), TextColumn("{task.fields[eta]}"), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self.rows: dict[str, Any] = {}

    def __enter__(self) -> TuneProgress:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def start(self, states: list[TaskState]) -> None:
        busy = [s for s in states if s.budget > 0]
        console.print(f"tuning {len(busy)} of {len(states)} kernels "
                      f"({sum(s.budget for s in busy)} new trials; INT8 kernels first)")
        for state in busy:
            self.rows[state.task.name] = self.progress.add_task(
                escape(_short(state.task.name)), total=state.budget, best="", eta="")

    def update(self, state: TaskState) -> None:
        gops = f", {state.gops:.1f} GOPS" if state.gops else ""
        eta = state.eta_s()
        self.progress.update(self.rows[state.task.name], completed=state.new,
                             best=f"best {_seconds(state.best_s)}{gops}",
                             eta=f"ETA {eta:.0f} s" if eta else "")


def tune_report(report: TuneReport) -> None:
    table = Table(title=f"tuned {report.target} on {report.measured_on}", title_justify="left")
    for column, justify in (("kernel", "left"), ("space", "left"), ("calls", "right"), ("FLOPs", "right"),
                            ("trials", "right"), ("untuned", "right"), ("tuned", "right"), ("speed-up", "right")):
        table.add_column(column, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                         overflow="ellipsis", max_width=28 if column == "kernel" else None)
    searched = [task for task in report.tasks if task.trials_before or task.trials_new]
    rest = [task for task in report.tasks if task not in searched]
    for task in searched:
        trials = f"{task.trials_before}+{task.trials_new}" if task.trials_before else str(task.trials_new)
        speedup = f"{task.speedup:.2f}x" if task.speedup else "-"
        table.add_row(escape(task.name), task.space, str(task.calls), f"{task.flops_share:.1%}", trials,
                      _seconds(task.untuned_s), _seconds(task.tuned_s), speedup)
    out.print(table)
    if rest:
        out.print(f"{len(rest)} more kernels not searched yet ({sum(t.flops_share for t in rest):.1%} of the FLOPs): "
                  f"run again with more --trials")
    out.print(f"{report.trials_new} new trials, {report.measured_again} measured again, {report.records} records "
              f"in {report.session} ({report.seconds:.0f} s)")
    if report.model_latency:
        latency = report.model_latency
        out.print(f"whole model on this machine: {_seconds(latency['untuned_s'])} untuned -> "
                  f"{_seconds(latency['tuned_s'])} tuned ({latency['speedup']:.2f}x)")
    for note in report.notes:
        out.print(f"note: {escape(note)}")


def _short(name: str, width: int = 44) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."
