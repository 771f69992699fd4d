"""The AVX2-only paths executed on an emulated AMD Zen 3 (`qemu-x86_64 -cpu EPYC-Milan`: AVX2, no
AVX-512, no VNNI), whatever CPU runs the suite: there onnxruntime's u8 x s8 MatMulInteger saturates
(which is why it is not the oracle), the exact reference does not, the host target detects `znver3`,
its int8 matmuls go to the `x86-avx2` kernel, and the built model equals the exact reference and numpy
bit for bit; the CPU W8A16 kernel runs there too. One subprocess, about a minute under emulation.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU on an x86-64 host"),
    pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-x86_64 (Debian qemu-user) is not installed"),
]

SCRIPT = Path(__file__).with_name("zen3_script.py")


def test_zen3_avx2_paths_run_exact_under_emulation() -> None:
    env = {**os.environ, "TVM_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(["qemu-x86_64", "-cpu", "EPYC-Milan", sys.executable, str(SCRIPT)],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    found = json.loads(lines[-1])
    assert found["mcpu"] == "znver3" and found["family"] == "x86-avx2" and found["dispatched"] == ["x86-avx2"]
    assert found["onnxruntime"] != found["true"], "onnxruntime did not saturate: the emulated CPU has VNNI?"
    assert found["reference"] == found["true"]
    assert found["build_exact"] and found["build_numpy"]
    assert found["w8a16_close"]  # the CPU W8A16 kernel's float vectors and int8 widening on AVX2
