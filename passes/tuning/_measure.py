"""Where a session builds and measures candidates: here, or on devices behind a TVM RPC tracker.

Builds run in `builders` worker processes with `build_candidate`, which is MetaSchedule's default build
minus its `import tvm.s_tir.tensor_intrin`: that import registers every shipped tensor intrinsic (~14 s
per worker) and makes the first batch time out on 2 cores. A candidate of ours arrives with its
intrinsic already inlined by `tensorize`, so nothing needs registering to build it.

Local measurements run one candidate at a time in a worker process with `TVM_NUM_THREADS` set to the
cores of this machine (TVM's pool otherwise starts one thread here). RPC measurements go through
MetaSchedule's `RPCRunner`: each candidate asks the tracker for a device registered under `key`, so
every device under one key shares the work. TVM RPC has no authentication: keep trackers and servers
on loopback or on a network you trust.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from passes.lowering import _rpc
from passes.lowering._rpc import Tracker, TrackerError
from passes.tuning._errors import TuningError

__all__ = ["Measurement", "Tracker", "build_candidate", "builder", "count_servers", "local_runner", "rpc_runner"]


@dataclass(frozen=True)
class Measurement:
    """How candidates are timed: each run repeats `number` calls, `repeat` runs, at least `min_repeat_ms`."""

    number: int = 3
    repeat: int = 3
    min_repeat_ms: int = 20
    timeout_s: float = 30.0

    def evaluator(self) -> Any:
        return ms.runner.EvaluatorConfig(number=self.number, repeat=self.repeat,
                                         min_repeat_ms=self.min_repeat_ms, enable_cpu_cache_flush=False)


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> Any:
    """MetaSchedule's default build without registering every tensor intrinsic first."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def builder(workers: int) -> Any:
    return ms.builder.LocalBuilder(f_build=build_candidate, max_workers=max(1, workers), timeout_sec=60.0)


def local_runner(measurement: Measurement) -> Any:
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))  # inherited by the worker
    return ms.runner.LocalRunner(timeout_sec=measurement.timeout_s, evaluator_config=measurement.evaluator())


def rpc_runner(tracker: Tracker, measurement: Measurement, workers: int) -> Any:
    """An RPCRunner on `tracker` measuring `workers` candidates at a time (at most the devices it has)."""
    config = ms.runner.RPCConfig(tracker_host=tracker.host, tracker_port=tracker.port, tracker_key=tracker.key,
                                 session_priority=1, session_timeout_sec=int(measurement.timeout_s * 4))
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=measurement.evaluator(),
                               max_workers=max(1, workers))


def count_servers(tracker: Tracker) -> int:
    """Servers registered under the key (free or busy); raises TuningError when there are none."""
    try:
        return _rpc.count_servers(tracker)
    except TrackerError as err:
        raise TuningError(str(err)) from err
