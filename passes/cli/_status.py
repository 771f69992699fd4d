"""A one-line, transient status on stderr for long CLI work: which stage, which pass, how many nodes,
how long so far. Shown only on a terminal (a pipe or a log gets nothing from it) and never with --json;
it disappears when the command ends, so the report below it is all that stays."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

from passes.infra.manager import Instrument, PassRecord, PipelineReport, StepView
from passes.infra._pass import Pass

_console = Console(highlight=False, stderr=True)


class Status:
    """`stage(text)` names what runs now; `instrument` follows a pipeline pass by pass."""

    def __init__(self, live: object | None) -> None:
        self._live = live
        self._stage = ""
        self._start = time.perf_counter()
        self.instrument = _PassStatus(self)

    def stage(self, text: str) -> None:
        self._stage = text
        self._show(text)

    def _show(self, text: str) -> None:
        if self._live is not None:
            elapsed = time.perf_counter() - self._start
            self._live.update(f"{escape(text)} [dim]({elapsed:.0f} s)[/dim]")  # type: ignore[attr-defined]


class _PassStatus(Instrument):
    def __init__(self, status: Status) -> None:
        self.status = status
        self.count = 0
        self.nodes = 0

    def before_pipeline(self, original: object, report: PipelineReport) -> None:
        self.nodes = report.nodes_before

    def before_pass(self, pass_: Pass, round_: int | None) -> None:
        self.count += 1
        where = f", round {round_}" if round_ else ""
        self.status._show(f"pass {self.count}: {pass_.name}{where} on {self.nodes:,} nodes")

    def after_pass(self, pass_: Pass, view: StepView, record: PassRecord) -> None:
        self.nodes = record.nodes_after


@contextlib.contextmanager
def status(enabled: bool = True) -> Iterator[Status]:
    """A `Status` shown on stderr while the block runs (a silent one off a terminal or when disabled)."""
    if not enabled or not _console.is_terminal:
        yield Status(None)
        return
    with _console.status("starting", spinner="dots") as live:
        yield Status(live)
