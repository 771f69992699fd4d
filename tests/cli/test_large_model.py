"""A model past protobuf's 2 GiB limit through `inspect`, `opt` and `verify` (issue "Hostile and unusual
input": a valid 2.1 GB model failed with `EncodeError: Failed to serialize proto`).

The model is Y = Relu(X @ W) with W a 16400x32768 float32 initializer in external data: 2,149,580,800
bytes, past 2**31 - 1. The data file is sparse (seeded random rows first, the rest a hole that reads
as zeros), so building it costs no disk writes; every command still reads all of it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from passes.cli import main

ROWS, COLS = 16400, 32768
WEIGHT_BYTES = ROWS * COLS * 4
RANDOM_ROWS = 64
PROTOBUF_LIMIT = 2**31 - 1

pytestmark = pytest.mark.slow


def _large_model(folder: Path) -> Path:
    assert WEIGHT_BYTES > PROTOBUF_LIMIT
    rng = np.random.default_rng(0)
    with open(folder / "w.bin", "wb") as data:
        data.write((rng.standard_normal((RANDOM_ROWS, COLS)).astype(np.float32) * 0.05).tobytes())
        data.truncate(WEIGHT_BYTES)
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[ROWS, COLS],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(WEIGHT_BYTES))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["Y"], name="relu")],
        "large",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, ROWS])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, COLS])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_model_past_2_gib_goes_through_inspect_opt_and_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    model = _large_model(source)
    before = _fingerprint(source)

    code = main(["inspect", str(model), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["parameters"] == ROWS * COLS

    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    code = main(["opt", str(model), "-o", str(output), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    written = sorted(p.name for p in output.parent.iterdir())
    assert len(written) == 2 and written[0] == "model.onnx", written  # the model and one data file
    data = output.parent / written[1]
    assert data.stat().st_size >= WEIGHT_BYTES
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(output.stat().st_mode)
    assert os.path.getsize(output) < 1 << 20  # the weights are not inline

    code = main(["verify", str(model), str(output), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (result,) = json.loads(out)["outputs"]
    assert result["max_abs_error"] == 0.0
    assert _fingerprint(source) == before, "the input model or its data changed"
