"""Ctrl-C and a full disk: exit 130 or 2 with one line, and nothing half-written left behind.

- a real SIGINT to a `passes opt` subprocess in the middle of its pipeline;
- an interrupt between the data file and the model file of an external-data save (the one moment a
  reader could see a model without its data);
- writing to a 256 KiB tmpfs (a real ENOSPC; needs mount rights, skipped with the reason without them),
  and ENOSPC raised by fsync, which runs everywhere.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.cli import main
from passes.core import io as passes_io
from passes.core.errors import ModelSaveError

CHAIN_NODES = 60_000  # `opt` takes ~10 s on it: the interrupt lands inside the pipeline
INTERRUPT_AFTER_S = 4.0


def _chain(path: Path, nodes: int) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"r{i}") for i in range(nodes)],
        "chain",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(f"t{nodes}", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def _weighted(path: Path, elements: int) -> Path:
    """Y = X + W with W of `elements` float32 values."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal(elements).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"], name="add")],
        "weighted",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [elements])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [elements])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.slow
def test_sigint_during_opt_exits_130_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    model = _chain(tmp_path / "chain.onnx", CHAIN_NODES)
    before = _listing(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "passes.cli", "opt", str(model), "-o", str(tmp_path / "out.onnx")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    time.sleep(INTERRUPT_AFTER_S)
    assert process.poll() is None, "opt finished before the interrupt: the chain is too short for this machine"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err == "interrupted: nothing was written\n"
    assert _listing(tmp_path) == before


def test_an_interrupt_between_data_and_model_leaves_the_old_pair(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.load_model(str(_weighted(tmp_path / "src.onnx", 4096)))
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    passes_io.save_model(model, output, external_data=True)
    before = _listing(output.parent)
    assert len(before) == 2  # the model and its data file

    replace = os.replace
    calls: list[str] = []

    def interrupted_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(Path(dst).name)
        if Path(dst).name == output.name:  # the data file has moved; the model has not
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(passes_io.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        passes_io.save_model(model, output, external_data=True)
    assert len(calls) == 2
    assert _listing(output.parent) == before, "the new data file or the staging folder was left behind"


def test_enospc_while_writing_is_one_line_and_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    model = _weighted(tmp_path / "model.onnx", 1024)
    before = _listing(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(passes_io.os, "fsync", full)
    code = main(["opt", str(model), "-o", str(tmp_path / "out.onnx")])
    _, err = capfd.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "No space left on device" in err
    assert _listing(tmp_path) == before


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Path:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 256 KiB tmpfs here ({done.stderr.strip() or 'mount failed'}): the fsync test covers ENOSPC")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_fails_with_one_line_and_leaves_the_disk_as_it_was(
    tmp_path: Path, tiny_disk: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = _weighted(tmp_path / "model.onnx", 256 * 1024)  # 1 MiB of weights for a 256 KiB disk
    code = main(["opt", str(model), "-o", str(tiny_disk / "out.onnx")])
    _, err = capfd.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "No space left on device" in err
    assert list(tiny_disk.iterdir()) == []
    with pytest.raises(ModelSaveError, match="No space left on device"):
        passes_io.save_model(onnx.load_model(str(model)), tiny_disk / "lib.onnx")
    assert list(tiny_disk.iterdir()) == []
