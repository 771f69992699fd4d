"""Tests for the `passes` command line: opt, list, verify, inspect, sample, and its error contract.

Commands run in-process through `passes.cli.main(argv)` with `capsys`; one test runs the installed
console script in a fresh interpreter (help, exit codes, import time, no TVM on import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from passes.cli import main
from passes.core.errors import ModelLoadError, PipelineError
from passes.core.io import load_model

REQUIRED_PASSES = (
    "eliminate-dead-code",
    "eliminate-identity",
    "eliminate-common-subexpressions",
    "fold-constants",
    "freeze-shapes",
)
SHAPE = "input_ids=1x16"


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _run_json(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _one_error_line(err: str) -> str:
    """The user-error contract: exactly one stderr line, starting `error:`, no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory, sample_model: Callable[..., onnx.ModelProto]) -> Path:
    """tiny-llama (dynamic batch/seq) on disk; tests must not modify it."""
    path = tmp_path_factory.mktemp("raw") / "tiny.onnx"
    onnx.save_model(sample_model("tiny-llama"), str(path))
    return path


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory, raw: Path) -> Path:
    """`raw` after `passes opt --shape input_ids=1x16` (default pipeline)."""
    path = tmp_path_factory.mktemp("frozen") / "tiny-1x16.onnx"
    assert main(["opt", str(raw), "-o", str(path), "--shape", SHAPE]) == 0
    return path


@pytest.fixture()
def model_copy(tmp_path: Path, raw: Path) -> Path:
    """A private copy of `raw` that a test may overwrite."""
    path = tmp_path / "model.onnx"
    path.write_bytes(raw.read_bytes())
    return path


# --- sample ----------------------------------------------------------------------------------------


def test_sample_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "llama.onnx"
    code, out, err = _run(capsys, "sample", "tiny-llama", "-o", path)
    assert (code, err) == (0, "")
    model = load_model(path)
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert f"wrote {path}" in out and f"{len(model.graph.node)} nodes" in out


def test_sample_into_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "sample", "tiny-llama", "-o", tmp_path / "nowhere" / "x.onnx")
    assert code == 2
    assert "does not exist" in _one_error_line(err)


# --- opt -------------------------------------------------------------------------------------------


def test_opt_shape_verify_json(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "opt.onnx"
    report = _run_json(capsys, "opt", raw, "-o", out_path, "--shape", SHAPE, "--verify")
    assert report["output"] == str(out_path)
    assert report["pipeline"].startswith("freeze-shapes{input_ids=1x16},")
    assert report["passes"] and report["passes"][0]["name"] == "freeze-shapes"
    from passes.infra.pipeline import parse_pipeline

    expected = ["freeze-shapes", *(p.name for p in parse_pipeline("canonicalize").passes())]
    assert list(dict.fromkeys(p["name"] for p in report["passes"])) == list(dict.fromkeys(expected))
    assert report["nodes_before"] == len(onnx.load_model(str(raw)).graph.node)
    optimized = load_model(out_path)
    assert report["nodes_after"] == len(optimized.graph.node) < report["nodes_before"]
    assert report["verification"]["ok"] is True
    assert all(o["ok"] for o in report["verification"]["outputs"])
    dims = [d.dim_value for d in optimized.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 16]


def test_opt_human_output(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "opt", raw, "-o", tmp_path / "opt.onnx", "-p", "eliminate-dead-code")
    assert (code, err) == (0, "")
    assert "eliminate-dead-code" in out
    assert (tmp_path / "opt.onnx").is_file()


def test_opt_explicit_pipeline_and_dump_ir(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "ir"
    report = _run_json(
        capsys, "opt", raw, "-o", tmp_path / "opt.onnx", "-p", "fold-constants,eliminate-dead-code", "--dump-ir", dump
    )
    assert report["pipeline"] == "fold-constants,eliminate-dead-code"
    assert [p["name"] for p in report["passes"]] == ["fold-constants", "eliminate-dead-code"]
    assert sorted(p.name for p in dump.iterdir()) == [
        "00-input.onnx",
        "01-fold-constants.onnx",
        "02-eliminate-dead-code.onnx",
    ]
    assert len(load_model(dump / "00-input.onnx").graph.node) == report["nodes_before"]
    for record in report["passes"]:
        dumped = load_model(dump / f"{record['index']:02d}-{record['name']}.onnx")
        assert len(dumped.graph.node) == record["nodes_after"]


def test_opt_in_place_overwrites_the_input(model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = model_copy.read_bytes()
    code, _, err = _run(capsys, "opt", model_copy, "-o", model_copy, "--in-place", "--shape", SHAPE)
    assert (code, err) == (0, "")
    assert model_copy.read_bytes() != before
    assert len(load_model(model_copy).graph.node) < len(onnx.load_model_from_string(before).graph.node)
    assert [p.name for p in model_copy.parent.iterdir()] == [model_copy.name]


# --- inspect ---------------------------------------------------------------------------------------


def test_inspect_json_raw_sample(raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = _run_json(capsys, "inspect", raw)
    model = onnx.load_model(str(raw))
    assert summary["nodes"] == len(model.graph.node) == sum(summary["ops"].values())
    assert summary["ops"]["MatMul"] > 0 and summary["ops"]["Softmax"] == 2
    assert summary["parameters"] > 0
    wb = summary["weight_bytes"]
    assert wb["fp32"] == 4 * summary["parameters"]
    assert wb["fp32"] == 2 * wb["fp16"] == 4 * wb["int8"] == 8 * wb["int4"]  # 8:4:2:1
    assert {(d["input"], d["dim"]) for d in summary["dynamic_dims"]} == {("input_ids", "batch"), ("input_ids", "seq")}


def test_inspect_json_after_freezing_shapes(frozen: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = _run_json(capsys, "inspect", frozen)
    assert summary["dynamic_dims"] == []
    assert summary["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, 16]}]
    assert summary["parameters"] > 0  # fewer than raw: the 2048-row rotary tables are sliced to 16 rows


def test_inspect_human_output(raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "inspect", raw)
    assert (code, err) == (0, "")
    assert "MatMul" in out and "batch" in out


# --- list ------------------------------------------------------------------------------------------


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    listing = _run_json(capsys, "list")
    passes = listing["passes"]
    assert set(REQUIRED_PASSES) <= set(passes)
    for name in REQUIRED_PASSES:
        assert isinstance(passes[name]["summary"], str) and passes[name]["summary"], name
        assert isinstance(passes[name]["options"], list), name
    fold_options = {o["name"]: o for o in passes["fold-constants"]["options"]}
    assert "max_bytes" in fold_options and fold_options["max_bytes"]["type"] == "int"
    assert passes["eliminate-dead-code"]["options"] == []
    assert "canonicalize" in listing["pipelines"]


# --- verify ----------------------------------------------------------------------------------------


def test_verify_optimized_copy_matches(raw: Path, frozen: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "verify", raw, frozen, "--shape", SHAPE, "--json")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert result["ok"] is True
    assert result["outputs"][0]["shape"] == [1, 16, 256]


@pytest.fixture()
def perturbed(tmp_path: Path, raw: Path) -> Path:
    """`raw` with its embedding table shifted by 0.5."""
    model = onnx.load_model(str(raw))
    for tensor in model.graph.initializer:
        if tensor.name == "embed_tokens.weight":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + np.float32(0.5), tensor.name))
            break
    else:
        pytest.fail("no embed_tokens.weight initializer in the sample")
    path = tmp_path / "perturbed.onnx"
    onnx.save_model(model, str(path))
    return path


def test_verify_perturbed_weights_mismatch(raw: Path, perturbed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "verify", raw, perturbed)
    assert (code, err) == (1, "")
    assert "MISMATCH" in out and "logits" in out

    code, out, _ = _run(capsys, "verify", raw, perturbed, "--json")
    assert code == 1
    result = json.loads(out)
    assert result["ok"] is False
    assert result["outputs"][0]["max_abs_error"] > 0.01


# --- user errors -----------------------------------------------------------------------------------


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-file", ["no such file"]),
        ("not-onnx", ["not an ONNX model"]),
        ("unknown-pass", ["unknown pass 'no-such-pass'", "`passes list` shows all"]),
        ("bad-option", ["'fold-constants'", "'nope'", "max_bytes"]),
        ("unknown-input", ["'nope'", "input_ids"]),
        ("output-folder-missing", ["does not exist"]),
        ("output-is-input", ["refusing to overwrite the input", "--in-place"]),
        ("output-is-input-dotdot", ["refusing to overwrite the input"]),
    ],
)
def test_opt_user_errors(
    tmp_path: Path,
    model_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    expected: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    model, output, extra = str(model_copy), "out.onnx", []
    if case == "missing-file":
        model = "absent.onnx"
    elif case == "not-onnx":
        Path("notes.onnx").write_text("not a model\n")
        model = "notes.onnx"
    elif case == "unknown-pass":
        extra = ["-p", "fold-constants,no-such-pass"]
    elif case == "bad-option":
        extra = ["-p", "fold-constants{nope=1}"]
    elif case == "unknown-input":
        extra = ["--shape", "nope=1x16"]  # the pipeline fails after the model is loaded
    elif case == "output-folder-missing":
        output = "nowhere/out.onnx"
    elif case == "output-is-input":
        output = model
    elif case == "output-is-input-dotdot":
        model, output = "model.onnx", "./sub/../model.onnx"
    before = _listing(tmp_path)
    input_bytes = model_copy.read_bytes()

    code, out, err = _run(capsys, "opt", model, "-o", output, *extra)
    assert code == 2
    line = _one_error_line(err)
    for word in expected:
        assert word in line
    assert out == ""
    assert _listing(tmp_path) == before  # no output, no partial file, no staging folder
    assert model_copy.read_bytes() == input_bytes


@pytest.mark.parametrize("value", ["input_ids=1xZ", "input_ids"])
def test_opt_bad_shape_value_is_one_error_line(
    tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, _, err = _run(capsys, "opt", raw, "-o", tmp_path / "out.onnx", "--shape", value)
    assert code == 2
    assert not (tmp_path / "out.onnx").exists()
    assert value.rsplit("=", 1)[-1] in _one_error_line(err)  # names the bad dims ('1xZ') or the bad spec


def test_bad_shape_value_exits_2_without_output(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "opt", raw, "-o", tmp_path / "out.onnx", "--shape", "input_ids=1xZ")
    assert code == 2
    assert "Traceback" not in err and "1xZ" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [["inspect", "{missing}"], ["verify", "{raw}", "{missing}"], ["inspect", "{text}"]],
    ids=["inspect-missing", "verify-missing", "inspect-not-onnx"],
)
def test_other_commands_user_errors(
    tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    names = {"missing": tmp_path / "absent.onnx", "raw": raw, "text": text}
    code, out, err = _run(capsys, *(a.format(**names) for a in argv))
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert str(names["text"] if "text" in argv[-1] else names["missing"]) in line


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["opt", "{missing}", "-o", "{out}", "--debug"], ModelLoadError),
        (["--debug", "opt", "{raw}", "-o", "{out}", "-p", "no-such-pass"], PipelineError),
    ],
    ids=["missing-file", "unknown-pass"],
)
def test_debug_reraises_user_errors(
    tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str], argv: list[str], error: type[Exception]
) -> None:
    names = {"missing": tmp_path / "absent.onnx", "raw": raw, "out": tmp_path / "out.onnx"}
    args = [a.format(**names) for a in argv]
    with pytest.raises(error):
        main(args)
    assert not (tmp_path / "out.onnx").exists()
    args.remove("--debug")  # the same mistake without --debug is one line
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err)


# --- the installed console script ------------------------------------------------------------------

_IMPORT_PROBE = """
import json, sys, time
start = time.perf_counter()
import passes
seconds = time.perf_counter() - start
passes.optimize
print(json.dumps({"import_s": seconds, "tvm": any(m == "tvm" or m.startswith("tvm.") for m in sys.modules)}))
"""


def test_console_script_help_exit_codes_and_import_cost(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("passes")
    assert script.is_file(), "the `passes` console script is installed next to the interpreter"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    help_run = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert help_run.returncode == 0, help_run.stderr
    for command in ("opt", "list", "verify", "inspect", "sample"):
        assert command in help_run.stdout

    error_run = subprocess.run(
        [script, "inspect", tmp_path / "absent.onnx"], capture_output=True, text=True, env=env, timeout=60
    )
    assert error_run.returncode == 2
    assert error_run.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent.onnx'}: no such file"]

    probe = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path
    )
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["import_s"] < 0.5, f"import passes took {result['import_s']:.3f} s"
    assert result["tvm"] is False, "import passes; passes.optimize must not import tvm"


def test_max_feed_bytes_refuses_large_inputs_up_front_and_ends_with_the_command(
    raw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from passes.numerics.verify import _MAX_FEED_BYTES

    # 1x100000000 int64 token ids: 763 MiB of feeds, refused before any is allocated
    code, _, err = _run(capsys, "verify", raw, raw, "--shape", "input_ids=1x100000000", "--max-feed-bytes", "1M")
    assert code == 2
    assert "would take 762.9 MiB, over the 1.0 MiB budget" in _one_error_line(err)
    code, _, err = _run(capsys, "verify", raw, raw, "--shape", "input_ids=1x16", "--max-feed-bytes", "64")
    assert code == 2 and "would take 128 bytes, over the 64 bytes budget" in _one_error_line(err)
    assert _MAX_FEED_BYTES.get() is None  # the budget does not outlive the command
    code, _, err = _run(capsys, "verify", raw, raw, "--shape", "input_ids=1x16")
    assert code == 0, err
