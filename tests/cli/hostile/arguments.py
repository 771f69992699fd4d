"""Hostile command-line values: families `pipeline`, `shape`, `verify`, `usage` and `run`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._base import (
    ANY_VERIFY, MISMATCH_OR_ERROR, MUST_PASS, MUST_REFUSE, OK_OR_ERROR, OPT_OUTPUT, Case, Setup, _base_bytes,
    _llama_bytes, _mkdir, _rename_tensor, _save, _small_bytes, _write, small_model,
)
from .external import External

def _opt_case(family: str, name: str, extra: Callable[[Path], list[str]] | Sequence[str],
              exits: frozenset[int], base: str = "small", outputs: tuple[str, ...] = OPT_OUTPUT,
              slow: bool = False) -> Case:
    """`passes opt model.onnx -o out.onnx EXTRA...`"""
    def setup(folder: Path) -> list[str]:
        model = _write(folder / "model.onnx", _base_bytes(base))
        args = extra(folder) if callable(extra) else list(extra)
        return ["opt", str(model), "-o", str(folder / "out.onnx"), *args]

    return Case(f"{family}-{name}", family, setup, exits, outputs, slow)


def _label(text: str) -> str:
    """A readable, id-safe label for a hostile value."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-=") else "_" for ch in text)
    return (safe[:24] or "empty").replace("=", "eq")


def _verify_case(family: str, name: str, extra: Sequence[str], exits: frozenset[int], base: str = "small",
                 candidate: Callable[[Path], Path] | None = None) -> Case:
    """`passes verify ref.onnx candidate.onnx EXTRA...` (candidate: the same model unless given)."""
    def setup(folder: Path) -> list[str]:
        reference = _write(folder / "ref.onnx", _base_bytes(base))
        other = candidate(folder) if candidate else _write(folder / "cand.onnx", _base_bytes(base))
        return ["verify", str(reference), str(other), *extra]

    return Case(f"{family}-{name}", family, setup, exits)


def _pipelines() -> Iterator[Case]:
    deep = "fixpoint(" * 2000 + "eliminate-dead-code" + ")" * 2000
    refused = {
        "unclosed-fixpoint": "fixpoint(eliminate-dead-code",
        "open-paren-only": "fixpoint(",
        "stray-close": "eliminate-dead-code)",
        "lone-brace": "{",
        "lone-close-brace": "}",
        "unclosed-options": "fold-constants{max_bytes=1",
        "options-no-value": "fold-constants{max_bytes=}",
        "options-no-key": "fold-constants{=1}",
        "options-bare-key": "fold-constants{max_bytes}",
        "option-twice": "fold-constants{max_bytes=1,max_bytes=2}",
        "unknown-option": "fold-constants{nope=1}",
        "int-option-text": "fold-constants{max_bytes=abc}",
        "int-option-negative": "fold-constants{max_bytes=-1}",
        "int-option-float": "fold-constants{max_bytes=1e999}",
        "bool-option-maybe": "fold-constants{fold_shapes=maybe}",
        "choice-option-bad": "decompose-gelu{powers=cube}",
        "siblings-negative": "fuse-qkv{min_siblings=-5}",
        "unknown-pass": "frobnicate",
        "pass-10k": "p" * 10_000,
        "pass-10k-after-good": "eliminate-dead-code," + "p" * 10_000,
        "fixpoint-2000-deep": deep,
        "fixpoint-2000-open": "fixpoint(" * 2000,
        "parens-2000": "(" * 2000,
        "braces-2000": "{" * 2000,
        "fixpoint-rounds-0": "fixpoint{max_rounds=0}(eliminate-dead-code)",
        "fixpoint-rounds-negative": "fixpoint{max_rounds=-1}(eliminate-dead-code)",
        "fixpoint-rounds-text": "fixpoint{max_rounds=abc}(eliminate-dead-code)",
        "fixpoint-unknown-option": "fixpoint{rounds=2}(eliminate-dead-code)",
        "fixpoint-empty": "fixpoint()",
        "fixpoint-no-parens": "fixpoint",
        "empty": "",
        "blank": "   ",
        "only-comma": ",",
        "leading-commas": ",,eliminate-dead-code",
        "trailing-commas": "eliminate-dead-code,,",
        "space-separated": "eliminate-dead-code fold-constants",
        "named-with-options": "canonicalize{x=1}",
        "fullwidth-letter": "\uff46old-constants",
        "nul-in-name": "fold-constants\x00",
        "newline-in-name": "fold-\nconstants",
        "freeze-bad-shapes": "freeze-shapes{shapes=Q}",
        "quantize-bad-scheme": "quantize-int8{scheme=w4}",
        "quantize-bad-regex": "quantize-int8{skip=[}",
        "quantize-percentile-nan": "quantize-int8{percentile=nan}",
        "quantize-percentile-150": "quantize-int8{percentile=150}",
        "quantize-percentile-negative": "quantize-int8{percentile=-1}",
        "quantize-static-etc-passwd": "quantize-int8{scheme=w8a8-static,calibration=/etc/passwd}",
        "quantize-static-missing-npz": "quantize-int8{scheme=w8a8-static,calibration=/nonexistent/x.npz}",
        "smooth-alpha-2": "smooth-quant{alpha=2}",
        "smooth-alpha-nan": "smooth-quant{alpha=nan}",
    }
    for name, pipeline in refused.items():
        yield _opt_case("pipeline", name, ["-p", pipeline], MUST_REFUSE)
    yield _opt_case("pipeline", "quantize-static-calibration-folder",
                    lambda folder: ["-p", f"quantize-int8{{scheme=w8a8-static,calibration={_mkdir(folder / 'cal')}}}"],
                    MUST_REFUSE)
    yield _opt_case("pipeline", "quantize-static-calibration-model",
                    lambda folder: ["-p", f"quantize-int8{{scheme=w8a8-static,calibration={folder / 'model.onnx'}}}"],
                    MUST_REFUSE)
    unusual = {
        "quantize-dynamic-etc-passwd": "quantize-int8{calibration=/etc/passwd}",
        "int-option-huge": "fold-constants{max_bytes=99999999999999999999999999}",
        "siblings-zero": "fuse-qkv{min_siblings=0}",
        "quantize-samples-0": "quantize-int8{samples=0}",
        "quantize-min-sqnr-inf": "quantize-int8{min_sqnr=inf}",
        "fp16-bool-yes": "to-fp16{keep_io_types=yes}",
        "fp16-block-bracket": "to-fp16{block=[}",
        "upper-case": "FOLD-CONSTANTS",
        "underscores": "fold_constants",
        "fixpoint-rounds-1": "fixpoint{max_rounds=1}(fold-constants)",
        "whitespace-around": "\t eliminate-dead-code ,\n fold-constants \n",
    }
    for name, pipeline in unusual.items():
        yield _opt_case("pipeline", name, ["-p", pipeline], OK_OR_ERROR)
    valid = {
        "dead-code": "eliminate-dead-code",
        "cleanup": "cleanup",
        "nested-fixpoints": "fixpoint(fixpoint(eliminate-dead-code),fixpoint(eliminate-identity))",
        "fixpoint-16-deep": "fixpoint(" * 16 + "eliminate-dead-code" + ")" * 16,
    }
    for name, pipeline in valid.items():
        yield _opt_case("pipeline", name, ["-p", pipeline], MUST_PASS)
    for name, pipeline in {"quantize": "quantize-int8", "smooth-quant": "smooth-quant", "fp16": "to-fp16",
                           "canonicalize": "canonicalize"}.items():
        yield _opt_case("pipeline", f"llama-{name}", ["-p", pipeline], MUST_PASS, base="llama")


def _shapes() -> Iterator[Case]:
    refused = ["X=", "X=0x-1", "=3", "X=axb", "X", "X==1x4", "X=1x", "X=x4", "X=1.5x4", "X=1e3x4", "X=-1x4",
               "X=1x4x5", "X=3x5", "Y=1x4", "X=99999999999999999999x4", "X=1\u00d74", "X=\n", "",
               "X=1x4,X=2x4", "X=0x4x"]
    for index, value in enumerate(refused):
        yield _opt_case("shape", f"opt-{index}-{_label(value)}", ["--shape", value], MUST_REFUSE)
        if index % 3 == 0:
            yield _verify_case("shape", f"verify-{index}-{_label(value)}", ["--shape", value], MUST_REFUSE)
    yield _opt_case("shape", "huge-verify", ["--shape", "X=100000x100000", "--verify"], MUST_REFUSE)
    yield _opt_case("shape", "huge-no-verify", ["--shape", "X=100000x100000"], OK_OR_ERROR)
    yield _opt_case("shape", "tall-verify", ["--shape", "X=100000x4", "--verify"], OK_OR_ERROR)
    yield _opt_case("shape", "valid", ["--shape", "X=3x4"], MUST_PASS)
    yield _opt_case("shape", "valid-verify", ["--shape", "X=3x4", "--verify"], MUST_PASS)
    yield _opt_case("shape", "zero-batch", ["--shape", "X=0x4"], OK_OR_ERROR)
    yield _opt_case("shape", "zero-batch-verify", ["--shape", "X=0x4", "--verify"], OK_OR_ERROR)
    yield _opt_case("shape", "fullwidth-digit", ["--shape", "X=\uff13x4"], OK_OR_ERROR)
    yield _opt_case("shape", "given-twice", ["--shape", "X=1x4", "--shape", "X=2x4"], OK_OR_ERROR)
    yield _opt_case("shape", "spaces", ["--shape", " X = 1x4 "], OK_OR_ERROR)
    yield _verify_case("shape", "verify-huge", ["--shape", "X=100000x100000"], MUST_REFUSE)
    yield _opt_case("shape", "llama-huge-verify", ["--shape", "input_ids=100000x100000", "--verify"],
                    MUST_REFUSE, base="llama")
    yield _opt_case("shape", "llama-rank-3", ["--shape", "input_ids=1x8x3"], MUST_REFUSE, base="llama")
    yield _opt_case("shape", "llama-zero-seq", ["--shape", "input_ids=1x0"], OK_OR_ERROR, base="llama")
    yield _opt_case("shape", "llama-valid-verify", ["--shape", "input_ids=1x8", "--verify"], MUST_PASS, base="llama")
    yield _verify_case("shape", "verify-llama-huge", ["--shape", "input_ids=100000x100000"], MUST_REFUSE,
                       base="llama")


def _verify() -> Iterator[Case]:
    def variant(mutate: Callable[[onnx.ModelProto], None]) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            model = small_model()
            mutate(model)
            return _save(model, folder / "cand.onnx")

        return make

    def sigmoid(model: onnx.ModelProto) -> None:
        model.graph.node[2].op_type = "Sigmoid"

    def cast_double(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Cast", ["Y"], ["c"], to=TensorProto.DOUBLE))
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("c", TensorProto.DOUBLE, ["N", 4]))

    def extra_output(model: onnx.ModelProto) -> None:
        model.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 4]))

    def nan_weights(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].raw_data = np.full(16, np.nan, np.float32).tobytes()

    def custom_op(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Frob", ["Y"], ["f"], domain="com.hostile"))
        model.graph.output[0].name = "f"
        model.opset_import.append(helper.make_opsetid("com.hostile", 1))

    yield _verify_case("verify", "seed-negative", ["--seed", "-1"], MUST_REFUSE)
    yield _verify_case("verify", "seed-2-64", ["--seed", str(2**64)], MUST_REFUSE)
    yield _verify_case("verify", "seed-text", ["--seed", "abc"], MUST_REFUSE)
    yield _verify_case("verify", "same-model", [], MUST_PASS)
    yield _verify_case("verify", "sigmoid-vs-relu", [], frozenset({1}), candidate=variant(sigmoid))
    yield _verify_case("verify", "renamed-input", [], MISMATCH_OR_ERROR, candidate=variant(_rename_tensor("X", "Z")))
    yield _verify_case("verify", "renamed-output", [], MISMATCH_OR_ERROR, candidate=variant(_rename_tensor("Y", "Z")))
    yield _verify_case("verify", "output-double", [], MISMATCH_OR_ERROR, candidate=variant(cast_double))
    yield _verify_case("verify", "extra-output", [], ANY_VERIFY, candidate=variant(extra_output))
    yield _verify_case("verify", "nan-weights", [], frozenset({1}), candidate=variant(nan_weights))
    yield _verify_case("verify", "custom-op", [], MUST_REFUSE, candidate=variant(custom_op))
    yield _verify_case("verify", "missing-candidate", [], MUST_REFUSE, candidate=lambda f: f / "nope.onnx")
    yield _verify_case("verify", "candidate-is-folder", [], MUST_REFUSE, candidate=lambda f: _mkdir(f / "c"))
    yield _verify_case("verify", "rtol-nan", ["--rtol", "nan"], MUST_REFUSE, candidate=variant(sigmoid))
    yield _verify_case("verify", "rtol-negative", ["--rtol", "-1"], MUST_REFUSE, candidate=variant(sigmoid))
    yield _verify_case("verify", "atol-inf", ["--atol", "inf"], MUST_REFUSE, candidate=variant(sigmoid))
    yield _verify_case("verify", "zero-batch", ["--shape", "X=0x4"], OK_OR_ERROR)
    yield _verify_case("verify", "feed-budget-zero", ["--max-feed-bytes", "0"], OK_OR_ERROR)
    yield _verify_case("verify", "feed-budget-text", ["--max-feed-bytes", "lots"], MUST_REFUSE)


def _usage() -> Iterator[Case]:
    def argv(*args: str) -> Setup:
        def setup(folder: Path) -> list[str]:
            model = _write(folder / "model.onnx", _small_bytes())
            return [a.replace("MODEL", str(model)).replace("OUT", str(folder / "out.onnx")) for a in args]

        return setup

    refused = {
        "nothing": (),
        "unknown-command": ("frobnicate",),
        "opt-no-args": ("opt",),
        "opt-no-output": ("opt", "MODEL"),
        "opt-output-no-value": ("opt", "MODEL", "-o"),
        "opt-unknown-flag": ("opt", "MODEL", "-o", "OUT", "--bogus"),
        "opt-rtol-text": ("opt", "MODEL", "-o", "OUT", "--rtol", "abc"),
        "opt-seed-negative": ("opt", "MODEL", "-o", "OUT", "--verify", "--seed", "-1"),
        "opt-two-models": ("opt", "MODEL", "MODEL", "-o", "OUT"),
        "inspect-no-args": ("inspect",),
        "verify-one-model": ("verify", "MODEL"),
        "opt-pipeline-no-value": ("opt", "MODEL", "-o", "OUT", "-p"),
        "opt-feed-budget-text": ("opt", "MODEL", "-o", "OUT", "--verify", "--max-feed-bytes", "lots"),
    }
    for name, args in refused.items():
        yield Case(f"usage-{name}", "usage", argv(*args), MUST_REFUSE)
    yield Case("usage-opt-feed-budget-zero", "usage",
               argv("opt", "MODEL", "-o", "OUT", "--verify", "--max-feed-bytes", "0"), OK_OR_ERROR, OPT_OUTPUT)


def _run() -> Iterator[Case]:
    """`passes run` (TVM): only cases that must fail before any build."""
    def run(model: Callable[[Path], Path], *extra: str) -> Setup:
        def setup(folder: Path) -> list[str]:
            return ["run", str(model(folder)), "--target", "host", "-o", str(folder / "OUT"), *extra]

        return setup

    def llama(folder: Path) -> Path:
        return _write(folder / "model.onnx", _llama_bytes())

    runs: dict[str, Setup] = {
        "empty-model": run(lambda f: _write(f / "model.onnx", b"")),
        "truncated-model": run(lambda f: _write(f / "model.onnx", _llama_bytes()[:1000])),
        "missing-model": run(lambda f: f / "nope.onnx"),
        "external-outside": run(External(location="../outside/w.bin").write),
        "bad-shape": run(llama, "--shape", "input_ids=0x-1"),
        "bad-shape-text": run(llama, "--shape", "input_ids=axb"),
        "unknown-input-shape": run(llama, "--shape", "nope=1x8"),
        "bad-pipeline": run(llama, "-p", "frobnicate"),
        "missing-calibration": run(llama, "-q", "w8a8-static", "--calibration", "/nonexistent/cal.npz"),
    }
    for name, setup in runs.items():
        yield Case(f"run-{name}", "run", setup, MUST_REFUSE, slow=True)

    def unknown_target(folder: Path) -> list[str]:
        return ["run", str(llama(folder)), "--target", "nosuch", "-o", str(folder / "OUT")]

    yield Case("run-unknown-target", "run", unknown_target, MUST_REFUSE, slow=True)
