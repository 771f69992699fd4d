"""Shared fixtures of the tuning tests: a 1-layer sample on disk and quick measurement settings."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from passes.kernels import x86_int8

#: one call per timing: these tests check the session machinery, not the figures
QUICK = {"number": 1, "repeat": 1, "min_repeat_ms": 0, "timeout_s": 30.0}

#: the x86 int8 family this CPU's host build gets (x86-vnni on Zen 4, x86-avx2 on Zen 3)
HOST_ISA = x86_int8.best_isa()
needs_x86_int8 = pytest.mark.skipif(HOST_ISA is None, reason="this CPU has no AVX2: no x86 int8 kernel to tune")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from passes.samples import build_sample

    path = tmp_path_factory.mktemp("tune-model") / "tiny-llama-1.onnx"
    onnx.save_model(build_sample("tiny-llama", layers=1), str(path))
    return path


def quick_options(trials: int, **overrides: object):  # -> TuneOptions
    from passes.tuning import Measurement, SearchConfig, TuneOptions

    settings = {"trials": trials, "builders": 1, "measurement": Measurement(**QUICK),  # type: ignore[arg-type]
                "search": SearchConfig(batch=4, population=16, seed=0), "model_latency": False, "int8_only": True}
    settings.update(overrides)
    return TuneOptions(**settings)  # type: ignore[arg-type]
