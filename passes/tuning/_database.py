"""A tuning session's records: a MetaSchedule JSON database in the session folder that survives SIGKILL.

    DIR/database_workload.json        one workload per line (MetaSchedule's JSONDatabase format)
    DIR/database_tuning_record.json   one measured candidate per line, [workload index, record]

MetaSchedule's own JSONDatabase appends a line per record, so a kill in the middle of a write leaves a
torn last line that no longer loads. Here the records live in a `MemoryDatabase` while tuning and
`flush` rewrites both files whole: each is written to a temporary file beside it, fsynced and renamed
over the old one, workloads first. Workload lines are only ever appended, so whatever instant a kill
lands on, the record file on disk refers only to workloads the workload file on disk has: the folder
always loads, with MetaSchedule's `JSONDatabase` too, and holds every batch flushed before the kill.

A candidate is known by the structural hash of its scheduled module, so a resumed session can tell
which candidates it has measured already and hand back their stored results instead of measuring again.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from passes.lowering._errors import last_line
from passes.tuning._errors import TuningError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


class SessionDatabase:
    """The records of one session folder; `memory` is the MetaSchedule database the search queries."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.memory = ms.database.MemoryDatabase(module_equality="structural")
        self._workloads: list[ms.database.Workload] = []
        self._records: list[ms.database.TuningRecord] = []
        self._measured: dict[int, list[float]] = {}
        self._recorded: Counter[int] = Counter()
        self._load()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def workload_path(self) -> Path:
        return self.folder / WORKLOAD_FILE

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD_FILE

    def workload(self, mod: tvm.IRModule) -> ms.database.Workload:
        """The workload entry of `mod`, committed on first sight."""
        known = self.memory.has_workload(mod)
        workload = self.memory.commit_workload(mod)
        if not known:
            self._workloads.append(workload)
        return workload

    def records(self, mod: tvm.IRModule) -> list[ms.database.TuningRecord]:
        """Every record of the workload `mod`, in the order measured."""
        if not self.memory.has_workload(mod):
            return []
        workload = self.memory.commit_workload(mod)
        return [r for r in self._records if tvm_ffi.structural_equal(r.workload.mod, workload.mod)]

    def measured(self, scheduled: tvm.IRModule) -> list[float] | None:
        """The stored run times (seconds) of a candidate measured before, else None."""
        return self._measured.get(candidate_key(scheduled))

    def commit(self, record: ms.database.TuningRecord, scheduled: tvm.IRModule) -> None:
        key = candidate_key(scheduled)
        self.memory.commit_tuning_record(record)
        self._records.append(record)
        self._recorded[key] += 1
        if record.run_secs is not None:
            self._measured[key] = [float(s) for s in record.run_secs]

    def repeated_measurements(self) -> int:
        """Records of a candidate that was recorded before (0: nothing was measured twice)."""
        return sum(count - 1 for count in self._recorded.values())

    def best(self, mod: tvm.IRModule) -> ms.database.TuningRecord | None:
        if not self.memory.has_workload(mod):
            return None
        top = self.memory.get_top_k(self.memory.commit_workload(mod), 1)
        return top[0] if top else None

    def flush(self) -> None:
        """Write both files atomically (see the module docstring for why the order matters)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".flush-") as scratch:
            staged = ms.database.JSONDatabase(
                path_workload=str(Path(scratch) / WORKLOAD_FILE),
                path_tuning_record=str(Path(scratch) / RECORD_FILE),
                allow_missing=True, module_equality="structural",
            )
            for workload in self._workloads:
                staged.commit_workload(workload.mod)
            for record in self._records:
                staged.commit_tuning_record(record)
            del staged
            for name in (WORKLOAD_FILE, RECORD_FILE):
                _replace_synced(Path(scratch) / name, self.folder / name)

    def _load(self) -> None:
        if not self.record_path.exists() and not self.workload_path.exists():
            return
        register_intrinsics()  # traces name our tensor intrinsics; parsing them needs them registered
        try:
            stored = ms.database.JSONDatabase(
                path_workload=str(self.workload_path), path_tuning_record=str(self.record_path),
                allow_missing=True, module_equality="structural",
            )
            records = list(stored.get_all_tuning_records())
            workloads = _workloads_in_order(self.workload_path)
        except Exception as err:  # TVM raises its own error types for unreadable files
            raise TuningError(f"the tuning database in {self.folder} does not load ({last_line(err)}); "
                              f"move it away to start a new session there") from err
        for workload in workloads:
            self._workloads.append(self.memory.commit_workload(workload.mod))
        for record in records:
            scheduled = _replay(record)
            if scheduled is None:  # a trace that no longer replays (another kernel version): kept, unused
                self._records.append(record)
                continue
            workload = self.memory.commit_workload(record.workload.mod)
            self.commit(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                 record.args_info), scheduled)


def register_intrinsics() -> None:
    """Register the tensor intrinsics of passes.kernels that tuning traces can name."""
    from passes.kernels import arm_int8, x86_int8
    from passes.kernels._x86_intrinsics import register_intrinsic

    for isa in x86_int8.ISAS:
        register_intrinsic(isa)
    arm_int8.register_intrinsics()


def candidate_key(scheduled: tvm.IRModule) -> int:
    return int(tvm_ffi.structural_hash(scheduled))


def _replay(record: ms.database.TuningRecord) -> tvm.IRModule | None:
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception:  # TVM raises its own error types
        return None
    return sch.mod


def _workloads_in_order(path: Path) -> list[ms.database.Workload]:
    """The workloads in file order (JSONDatabase exposes them only through its records)."""
    if not path.exists():
        return []
    workloads = []
    for line in path.read_text().splitlines():
        if line.strip():
            workloads.append(ms.database.Workload.from_json(json.loads(line)))
    return workloads


def _replace_synced(source: Path, destination: Path) -> None:
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(source, destination)
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
