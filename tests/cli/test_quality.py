"""The command line's quality surface: `passes accuracy` (perplexity of float vs quantized on text) and
`passes run`'s perplexity report, warnings and gates (`--max-ppl-increase`, `--min-sqnr`), which fail with
one error line and write nothing. The tokenizer is the word-level one of tests/numerics/test_perplexity.py
over ids the bundled sample's 256-token vocabulary holds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from passes.cli import main
from passes.core.io import save_model
from passes.infra.manager import PassManager
from passes.transforms.quantize_int8 import QuantizeInt8
from tests.numerics.test_perplexity import text_of, word_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, sample_model: Callable[..., onnx.ModelProto]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quality")
    frozen = PassManager("canonicalize", input_shapes={"input_ids": (1, 32)}).run(sample_model("tiny-llama")).model
    save_model(frozen, folder / "float.onnx")
    save_model(QuantizeInt8(scheme="w8a8-dynamic")(frozen).model, folder / "int8.onnx")
    save_model(sample_model("tiny-llama"), folder / "dynamic.onnx")
    damaged = onnx.ModelProto()
    damaged.CopyFrom(frozen)
    head = next(n for n in reversed(damaged.graph.node) if n.op_type == "MatMul")
    weight = next(t for t in damaged.graph.initializer if t.name == head.input[1])
    noisy = numpy_helper.to_array(weight) + np.random.default_rng(0).normal(0, 5.0, tuple(weight.dims)).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), weight.name))
    save_model(damaged, folder / "damaged.onnx")
    (folder / "eval.txt").write_text(text_of(4000, seed=1))
    (folder / "calibration.txt").write_text(text_of(4000, seed=2))
    return {"float": folder / "float.onnx", "int8": folder / "int8.onnx", "dynamic": folder / "dynamic.onnx",
            "damaged": folder / "damaged.onnx",
            "eval": folder / "eval.txt", "calibration": folder / "calibration.txt",
            "tokenizer": word_tokenizer(folder / "tok")}


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_accuracy_reports_perplexity_and_layers(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "accuracy", files["float"], files["int8"], "--text", files["eval"],
                          "--tokenizer", files["tokenizer"], "--windows", "4", "--json")
    assert code == 0, err
    report = json.loads(out)
    ppl = report["perplexity"]
    assert ppl["windows"] == 4 and ppl["window"] == 32 and ppl["tokens"] == 4 * 31
    assert ppl["float"] > 1 and abs(ppl["increase_pct"]) < 5  # random weights: int8 barely moves it
    assert report["sqnr"]["min_output_sqnr_db"] > 25
    assert sum(layer["quantized"] for layer in report["sqnr"]["layers"]) == 9  # the attention matmuls stay float
    code, out, _ = _run(capsys, "accuracy", files["float"], files["int8"], "--text", files["eval"],
                        "--tokenizer", files["tokenizer"], "--windows", "2")
    assert code == 0 and "perplexity on 2 windows x 32 tokens" in out and "least accurate quantized layers" in out


def test_accuracy_gate_exits_1(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = _run(capsys, "accuracy", files["float"], files["float"], "--text", files["eval"],
                      "--tokenizer", files["tokenizer"], "--windows", "2", "--max-ppl-increase", "0")
    assert code == 0  # the same model: +0 %
    code, _, err = _run(capsys, "accuracy", files["float"], files["damaged"], "--text", files["eval"],
                        "--tokenizer", files["tokenizer"], "--windows", "2", "--max-ppl-increase", "10")
    assert code == 1 and "above --max-ppl-increase 10 %" in err  # lm_head drowned in noise


def test_accuracy_bad_tokenizer_is_one_error_line(files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "accuracy", files["float"], files["int8"], "--text", files["eval"],
                        "--tokenizer", tmp_path / "missing")
    assert code == 2 and "no tokenizer at" in _one_error_line(err)


def test_run_reports_perplexity_with_text_calibration(files: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "run", files["dynamic"], "--target", "host", "-o", tmp_path, "--shape",
                          "input_ids=1x32", "--calibration", files["calibration"], "--tokenizer", files["tokenizer"],
                          "--text", files["eval"], "--max-ppl-increase", "50", "--json")
    assert code == 0, err
    q = json.loads(out)["quantization"]
    assert q["calibration"] == "text" and q["accuracy_inputs"] == "2 windows of --text"
    assert q["perplexity"]["windows"] == 8 and q["smoothing"]["activations"] > 0
    assert (tmp_path / "host" / "report.json").is_file()


@pytest.mark.parametrize(("options", "message"), [
    (["--min-sqnr", "150"], "below --min-sqnr 150 dB; nothing written"),
    (["--max-ppl-increase", "5"], "--max-ppl-increase needs --text FILE and --tokenizer DIR"),
    (["--text", "eval"], "--text needs --tokenizer DIR"),
])
def test_run_gates_fail_with_one_line_and_write_nothing(files: dict[str, Path], tmp_path: Path, options: list[str],
                                                        message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [files["eval"] if option == "eval" else option for option in options]
    code, _, err = _run(capsys, "run", files["dynamic"], "--target", "host", "-o", tmp_path / "out", "--shape",
                        "input_ids=1x32", *argv)
    assert code == 2 and message in _one_error_line(err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
