"""A session killed with SIGKILL at any moment leaves a database that loads (ours and MetaSchedule's own
JSONDatabase), and the resumed session measures nothing twice; measuring over TVM RPC on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from passes.tuning import Tracker, load_session, tune
from passes.tuning._database import RECORD_FILE, WORKLOAD_FILE, register_intrinsics
from tests.helpers import free_port, rpc_tracker
from tests.tuning.conftest import needs_x86_int8, quick_options

CLI = [sys.executable, "-m", "passes.cli"]


def _loads_everywhere(session: Path) -> int:
    """Records in `session`, checked to load with MetaSchedule's JSONDatabase and with ours."""
    from tvm.s_tir import meta_schedule as ms

    register_intrinsics()
    theirs = ms.database.JSONDatabase(path_workload=str(session / WORKLOAD_FILE),
                                      path_tuning_record=str(session / RECORD_FILE), allow_missing=True)
    ours = load_session(session)
    assert len(theirs.get_all_tuning_records()) == len(ours)
    return len(ours)


@needs_x86_int8
def test_sigkill_at_any_moment_leaves_a_database_that_loads_and_resumes(small_model, tmp_path):
    session = tmp_path / "session"
    command = [*CLI, "tune", str(small_model), "-t", "host", "-s", str(session), "-n", "400", "--batch", "2",
               "--int8-only", "--builders", "1", "--json"]
    seen = []
    # kills into the set-up (a fixed delay), then at moments after the records file first appears: the
    # baselines and the search, however slow the machine is today
    for wait_for_records, delay in ((False, 6.0), (True, 0.3), (True, 4.0)):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.monotonic() + 180.0
        while wait_for_records and not (session / RECORD_FILE).exists() and process.poll() is None:
            assert time.monotonic() < deadline, "the session wrote no records in 180 s"
            time.sleep(0.1)
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if (session / RECORD_FILE).exists():
            seen.append(_loads_everywhere(session))
    assert seen, "no run got as far as writing records before its kill"
    assert seen == sorted(seen)  # records only ever accumulate
    before = _loads_everywhere(session)
    resumed = tune(small_model, "host", session, quick_options(4))
    assert resumed.trials_new == 4
    resumed_db = load_session(session)
    assert resumed_db.repeated_measurements() == 0, "the resumed session measured a candidate again"
    assert len(resumed_db) >= before + 4


@needs_x86_int8
def test_tuning_through_an_rpc_tracker_on_loopback_uses_every_server(small_model, tmp_path):
    with rpc_tracker(tmp_path, "passes-test", servers=2) as (tracker, logs):
        report = tune(small_model, "host", tmp_path / "session", quick_options(8, tracker=tracker, builders=2))
    assert report.measured_on.startswith("TVM RPC tracker 127.0.0.1")
    assert report.trials_new == 8
    loads = [log.read_text().count("load_module") for log in logs]
    assert all(count > 0 for count in loads), f"modules loaded per server: {loads}"
    assert all(task.tuned_s for task in report.tasks if task.trials_new)


def test_a_tracker_that_does_not_answer_is_one_clear_error(small_model, tmp_path):
    from passes.tuning import TuningError

    tracker = Tracker("127.0.0.1", free_port(), "nobody")
    with pytest.raises(TuningError, match="no TVM RPC tracker answers"):
        tune(small_model, "host", tmp_path / "s", quick_options(2, tracker=tracker))


def test_cli_refuses_a_gpu_target_in_one_line(small_model, tmp_path):
    done = subprocess.run([*CLI, "tune", str(small_model), "-t", "sd8gen2", "-s", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: target sd8gen2 is a GPU target (opencl)")
    assert "Traceback" not in done.stderr
