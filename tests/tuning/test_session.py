"""`passes tune` sessions on the host: records, resume without re-measuring, budgets, applying records."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passes.tuning import TuningError, load_session, tune
from passes.tuning._database import RECORD_FILE, WORKLOAD_FILE, SessionDatabase
from passes.tuning._session import allocate
from passes.tuning._tasks import TuningTask
from tests.tuning.conftest import HOST_ISA, needs_x86_int8, quick_options


def _task(weight: float) -> TuningTask:
    import tvm

    return TuningTask("t", tvm.IRModule(), "metaschedule", 1, weight)


@given(st.lists(st.floats(1.0, 1e9), min_size=1, max_size=12), st.integers(0, 500), st.data())
def test_allocate_spends_the_budget_exactly_and_never_negative(weights, trials, data):
    done = data.draw(st.lists(st.integers(0, 300), min_size=len(weights), max_size=len(weights)))
    budgets = allocate([_task(w) for w in weights], done, trials)
    assert sum(budgets) == trials
    assert min(budgets) >= 0


def test_allocate_follows_flops_and_tops_up_tasks_behind():
    tasks = [_task(3.0), _task(1.0)]
    assert allocate(tasks, [0, 0], 40) == [30, 10]
    # the first task already has its share of 80 trials: the next 40 go to the second
    assert allocate(tasks, [60, 0], 20) == [0, 20]


@needs_x86_int8
def test_a_session_records_resumes_and_never_measures_a_candidate_twice(small_model, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"  # the temporary folder of this process and of the builder's workers
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    session = tmp_path / "session"
    first = tune(small_model, "host", session, quick_options(8))
    assert not [p for p in scratch.iterdir() if p.is_dir()], "the candidates' build folders were left behind"
    assert first.trials_new == 8
    assert {task.space for task in first.tasks} == {HOST_ISA.family}
    assert (session / WORKLOAD_FILE).is_file() and (session / RECORD_FILE).is_file()
    records_after_first = len(load_session(session))
    # every task has its untuned schedule stored, and at least one tuned record where it got trials
    assert all(task.untuned_s and task.tuned_s for task in first.tasks)
    assert all(task.tuned_s <= task.untuned_s for task in first.tasks)  # the best includes the default

    second = tune(small_model, "host", session, quick_options(8))
    assert second.trials_new == 8
    assert sum(task.trials_before for task in second.tasks) == records_after_first
    assert len(load_session(session)) == records_after_first + 8  # baselines are not measured again
    assert load_session(session).repeated_measurements() == 0, "a candidate was measured twice"
    report = json.loads((session / "report.json").read_text())
    assert report["trials_new"] == 8 and report["measured_again"] == 0


@needs_x86_int8
@pytest.mark.parametrize("scheme", ["w8a8-static", "auto"])
def test_run_with_tuning_applies_the_records_and_stays_bit_exact(small_model, tmp_path, scheme):
    """Static W8A8's epilogue is one multiply by a constant: bit-exact with the reference. The default
    (per-token scales) multiplies by the weight's and the row's scale, which the build may round in
    another order: within an ulp of the output's magnitude."""
    from passes.deploy.run import run_for_target

    session = tmp_path / "session"
    tune(small_model, "host", session, quick_options(4), quantize=scheme)
    report = run_for_target(small_model, "host", tmp_path / "out", tuning=session, quantize=scheme)
    assert report.tuning is not None
    assert report.tuning["kernels_tuned"] >= 1
    assert all(name.startswith(HOST_ISA.family.removeprefix("x86-") + "_gemm") for name in report.tuning["tuned"])
    assert report.host_check is not None and report.host_check["ok"]
    worst = max(output["max_abs_error"] for output in report.host_check["outputs"])
    if scheme == "w8a8-static":
        assert worst == 0.0  # int8 x int8 -> int32 then the same float epilogue: bit-exact with onnxruntime
    else:
        # no code flipped (else the criterion would be SQNR) and the epilogue differs by ulps at most
        assert report.host_check["criterion"] == "allclose" and worst < 1e-5


def test_run_with_a_folder_that_is_no_session_fails_with_one_line(small_model, tmp_path):
    from passes.deploy.run import run_for_target

    with pytest.raises(TuningError, match="is not a tuning session"):
        run_for_target(small_model, "host", tmp_path / "out", tuning=tmp_path)
    assert not (tmp_path / "out" / "host").exists()


def test_a_gpu_target_without_a_device_is_refused_naming_both_fixes(small_model, tmp_path):
    with pytest.raises(TuningError) as refused:
        tune(small_model, "sd8gen2", tmp_path / "s", quick_options(4))
    message = str(refused.value)
    assert "--tracker HOST:PORT --key KEY" in message
    assert "on a machine that has the device" in message
    assert not (tmp_path / "s").exists()


def test_an_unreadable_database_is_a_tuning_error(tmp_path):
    (tmp_path / WORKLOAD_FILE).write_text("not json\n")
    (tmp_path / RECORD_FILE).write_text("")
    with pytest.raises(TuningError, match="does not load"):
        SessionDatabase(tmp_path)


@pytest.mark.parametrize("family", ["x86-vnni", "x86-avxvnni", "x86-avx2"])
def test_every_point_of_each_x86_design_space_is_bit_exact(family: str):
    import tvm
    from passes.kernels import x86_int8
    from tvm import s_tir

    isa = x86_int8.isa_named(family)
    if not x86_int8.has_feature(isa):
        pytest.skip(f"this CPU has no {isa.feature} to run the {family} design space on")
    rng = np.random.default_rng(7)
    for m, k, n, seed in ((1, 36, 80, 1), (5, 64, 48, 2), (16, 20, 128, 3)):
        tiles = x86_int8.default_tiles(isa, m)
        workload = tvm.IRModule({"main": isa.gemm_func(isa.shape(m, k, n, tiles))})
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        packed = x86_int8.pack_weights(isa, b, cols=tiles.cols)
        for space in x86_int8.design_space(isa)(s_tir.Schedule(workload, seed=seed)):
            kernel = tvm.compile(space.mod, target=x86_int8.host_target())
            out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
            kernel(*(tvm.runtime.tensor(x) for x in (a, *packed.arrays())), out)
            np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ b.astype(np.int32))