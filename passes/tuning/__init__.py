"""`passes.tuning`: resumable autotuning sessions over the kernels of a lowered model (`passes tune`).
May import frontend (prepare_model), lowering, kernels and everything below; never deploy or the CLI.

    report = tune("graph.onnx", "host", "sessions/host", TuneOptions(trials=200))   # or resume it
    lowered = lower(model, target, tuning=load_session("sessions/host").memory)   # build with the records

Candidates are measured on this machine or on devices behind a TVM RPC tracker (`Tracker`); TVM RPC has
no authentication, so keep trackers and servers on loopback or a network you trust.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from passes.core._lazy import lazy_exports

_EXPORTS = {
    "TuningError": "passes.tuning._errors",
    "tune": "passes.tuning._session",
    "TuneOptions": "passes.tuning._session",
    "TuneReport": "passes.tuning._session",
    "TaskReport": "passes.tuning._session",
    "Tracker": "passes.tuning._measure",
    "Measurement": "passes.tuning._measure",
    "SearchConfig": "passes.tuning._search",
    "SessionDatabase": "passes.tuning._database",
}

__all__ = ["Measurement", "SearchConfig", "SessionDatabase", "TaskReport", "TuneOptions", "TuneReport", "Tracker",
           "TuningError", "load_session", "tune"]

if TYPE_CHECKING:
    from passes.tuning._database import SessionDatabase
    from passes.tuning._errors import TuningError
    from passes.tuning._measure import Measurement, Tracker
    from passes.tuning._search import SearchConfig
    from passes.tuning._session import TaskReport, TuneOptions, TuneReport, tune


def load_session(folder: str | os.PathLike[str]) -> SessionDatabase:
    """The records of a `passes tune` session folder; raises TuningError when it has none."""
    from pathlib import Path

    from passes.tuning._database import RECORD_FILE, SessionDatabase
    from passes.tuning._errors import TuningError

    if not (Path(folder) / RECORD_FILE).is_file():
        raise TuningError(f"{folder} is not a tuning session (no {RECORD_FILE}); create one with `passes tune`")
    return SessionDatabase(folder)


__getattr__, __dir__ = lazy_exports("passes.tuning", globals(), _EXPORTS)
