"""What every hostile case family shares: the `Case` record, the allowed exit codes, the base models and
the helpers that turn one model file into a case per command."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OK_OR_ERROR = frozenset({0, 2})
MUST_REFUSE = frozenset({2})
MUST_PASS = frozenset({0})
MISMATCH_OR_ERROR = frozenset({1, 2})
ANY_VERIFY = frozenset({0, 1, 2})
OPT_OUTPUT = ("out.onnx",)
NAME_MAX = 255

FAMILIES = (
    "truncated", "bitflip", "empty", "not-onnx", "wrong-proto", "bad-dtype", "bad-dims", "bad-data",
    "bad-elem-type", "bad-graph", "bad-opset", "bad-cast", "sparse", "external-data", "names", "pipeline",
    "shape", "output", "dump-ir", "verify", "usage", "run",
)

Setup = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One hostile command line: how to lay out its folder and what outcome is right."""

    id: str
    family: str
    setup: Setup
    exits: frozenset[int] = OK_OR_ERROR
    outputs: tuple[str, ...] = ()  # fnmatch patterns (relative paths) a successful run may create or replace
    slow: bool = False


# --- base models and files -------------------------------------------------------------------------

def small_model() -> onnx.ModelProto:
    """Y = Relu(X @ W + B), X[N,4]; W in raw_data (64 bytes), B in float_data."""
    weights = np.arange(16, dtype=np.float32).reshape(4, 4) / 8.0 - 1.0
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 4], weights.tobytes(), raw=True)
    b = helper.make_tensor("B", TensorProto.FLOAT, [4], [0.5, -0.5, 0.25, -0.25])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "B"], ["a"], name="add"),
         helper.make_node("Relu", ["a"], ["Y"], name="relu")],
        "small",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hostile")
    model.ir_version = 8
    return model


@functools.cache
def _small_bytes() -> bytes:
    return small_model().SerializeToString()


@functools.cache
def _llama_bytes() -> bytes:
    from passes.samples import build_sample

    return build_sample("tiny-llama", layers=1, hidden=32, heads=2, vocab=64).SerializeToString()


def _base_bytes(base: str) -> bytes:
    return _small_bytes() if base == "small" else _llama_bytes()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Serialise as is (onnx.save would try to write external data itself)."""
    return _write(path, model.SerializeToString())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _unblock_fifo(path: Path, seconds: float = 20.0) -> None:
    """Open `path` for writing whenever a reader waits on it, and close it at once (the reader sees EOF),
    so a command that opens the FIFO fails instead of hanging the test run."""
    def loop() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and os.path.lexists(path):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            time.sleep(0.005)

    threading.Thread(target=loop, daemon=True).start()


def _rename_tensor(old: str, new: str) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        graph = model.graph
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.name == old:
                info.name = new
        for tensor in graph.initializer:
            if tensor.name == old:
                tensor.name = new
        for node in graph.node:
            for items in (node.input, node.output):
                for i, name in enumerate(items):
                    if name == old:
                        items[i] = new

    return mutate


# --- commands over one model file ------------------------------------------------------------------

def _ref(folder: Path) -> Path:
    return _write(folder / "ref.onnx", _small_bytes())


COMMANDS = ("opt", "inspect", "verify", "opt-verify")


def _argv(command: str, model: Path, folder: Path, reference: Path | None = None) -> list[str]:
    out = str(folder / "out.onnx")
    if command == "opt":
        return ["opt", str(model), "-o", out]
    if command == "opt-verify":
        return ["opt", str(model), "-o", out, "--verify"]
    if command == "inspect":
        return ["inspect", str(model)]
    return ["verify", str(reference or _ref(folder)), str(model)]


def _command_exits(command: str, exits: frozenset[int]) -> frozenset[int]:
    """verify may also report a mismatch (1) unless the model must be refused outright."""
    return exits | {1} if command == "verify" and exits != MUST_REFUSE else exits


def _model_cases(family: str, name: str, make: Callable[[Path], Path], exits: frozenset[int],
                 commands: Sequence[str] = COMMANDS, base: str = "small") -> Iterator[Case]:
    """One case per command for the model `make(folder)` writes (returning its path)."""
    for command in commands:
        def setup(folder: Path, command: str = command) -> list[str]:
            model = make(folder)
            reference = _write(folder / "ref.onnx", _base_bytes(base)) if command == "verify" else None
            return _argv(command, model, folder, reference)

        outputs = OPT_OUTPUT if command.startswith("opt") else ()
        yield Case(f"{family}-{name}-{command}", family, setup, _command_exits(command, exits), outputs)


def _proto_case(family: str, name: str, mutate: Callable[[onnx.ModelProto], onnx.ModelProto | None],
                exits: frozenset[int], commands: Sequence[str] = COMMANDS) -> Iterator[Case]:
    """Cases for the small model after `mutate` (which may edit in place and return None)."""
    def make(folder: Path) -> Path:
        model = small_model()
        model = mutate(model) or model
        return _save(model, folder / "model.onnx")

    return _model_cases(family, name, make, exits, commands)


def _bytes_case(family: str, name: str, data: Callable[[], bytes], exits: frozenset[int],
                commands: Sequence[str] = COMMANDS, base: str = "small") -> Iterator[Case]:
    return _model_cases(family, name, lambda folder: _write(folder / "model.onnx", data()), exits, commands, base)
