"""A seeded corpus of hostile and unusual `passes` command lines (issue "Hostile and unusual input").

`cases(seed)` returns `Case`s. Each one writes its files into a fresh folder (`setup(folder) -> argv`,
every path inside that folder, or under /proc where nothing can be written), names the exit codes that
are right for it, and names (as fnmatch patterns relative to the folder) the paths a successful run may
create or replace. `test_hostile.py` runs them in-process and checks the CLI's contract.

Base models: a MatMul/Add/Relu chain (`X[N,4] -> Y[N,4]`, weights in raw_data) and the 1-layer
tiny-llama sample. Everything random comes from `random.Random(seed)`.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import random
import struct
import threading
import time
import zipfile
import zlib
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


# --- base models -----------------------------------------------------------------------------------

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


def _top_level_boundaries(data: bytes) -> set[int]:
    """Offsets where a prefix of `data` ends on a whole top-level protobuf field (a prefix that parses)."""
    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    bounds, pos = {0}, 0
    while pos < len(data):
        tag, pos = varint(pos)
        wire = tag & 7
        if wire == 0:
            _, pos = varint(pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = varint(pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
        bounds.add(pos)
    return bounds


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


# --- families: damaged files -------------------------------------------------------------------------

def _truncated(rng: random.Random) -> Iterator[Case]:
    for base, count in (("small", 28), ("llama", 28)):
        data = _base_bytes(base)
        whole = _top_level_boundaries(data)
        offsets = {1, 2, len(data) // 2, len(data) - 1} | {rng.randrange(1, len(data)) for _ in range(count)}
        for index, offset in enumerate(sorted(offsets)):
            # a prefix ending on a whole top-level field parses; it is refused only if what is left is invalid
            exits = OK_OR_ERROR if offset in whole else MUST_REFUSE
            command = COMMANDS[index % len(COMMANDS)]
            yield from _bytes_case("truncated", f"{base}-at{offset}", lambda d=data, o=offset: d[:o], exits,
                                   [command], base)


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    buf = bytearray(data)
    kind = rng.choice(("flip", "flip", "set", "insert", "delete"))
    spots = sorted(rng.randrange(len(buf)) for _ in range(rng.randint(1, 3)))
    for pos in reversed(spots):
        if kind == "flip":
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == "set":
            buf[pos] = rng.randrange(256)
        elif kind == "insert":
            buf[pos:pos] = bytes([rng.randrange(256)])
        else:
            del buf[pos]
    return f"{kind}{'-'.join(map(str, spots))}", bytes(buf)


def _bitflip(rng: random.Random) -> Iterator[Case]:
    for base, count in (("small", 60), ("llama", 32)):
        data = _base_bytes(base)
        for index in range(count):
            label, mutated = _mutate_bytes(data, rng)
            command = COMMANDS[index % len(COMMANDS)]
            yield from _bytes_case("bitflip", f"{base}-{index}-{label}", lambda m=mutated: m, OK_OR_ERROR,
                                   [command], base)


def _png() -> bytes:
    header = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return header + chunk


def _zip_of_model() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", _small_bytes())
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones((4, 4), np.float32))
    return buffer.getvalue()


def _empty_and_foreign(rng: random.Random) -> Iterator[Case]:
    yield from _bytes_case("empty", "file", lambda: b"", MUST_REFUSE)
    yield from _model_cases("empty", "dev-null", lambda folder: Path("/dev/null"), MUST_REFUSE, ("opt", "inspect"))
    yield from _bytes_case("empty", "whitespace", lambda: b" \n\t\n", MUST_REFUSE, ("opt", "inspect"))
    foreign: dict[str, Callable[[], bytes]] = {
        "text": lambda: b"this is not a model\nreally not\n",
        "png": _png,
        "zip": _zip_of_model,
        "gzip": lambda: gzip.compress(_small_bytes()),
        "json": lambda: b'{"ir_version": 8, "graph": {"node": []}}',
        "npy": _npy,
        "all-ff": lambda: b"\xff" * 512,
        "nul": lambda: b"\x00" * 512,
        "onnx-text": lambda: onnx.printer.to_text(small_model()).encode(),
    }
    for index in range(4):
        blob = bytes(rng.randrange(256) for _ in range(rng.choice((7, 64, 1000))))
        foreign[f"random{index}"] = lambda blob=blob: blob
    for name, data in foreign.items():
        yield from _bytes_case("not-onnx", name, data, MUST_REFUSE, ("opt", "inspect", "verify"))
    yield from _model_cases("not-onnx", "a-folder", lambda folder: _mkdir(folder / "model.onnx"), MUST_REFUSE,
                            ("opt", "inspect", "verify"))
    yield from _model_cases("not-onnx", "fifo", _fifo_model, MUST_REFUSE, ("opt", "inspect"))


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


def _fifo_model(folder: Path) -> Path:
    path = folder / "model.onnx"
    os.mkfifo(path)
    _unblock_fifo(path)
    return path


def _wrong_proto() -> Iterator[Case]:
    model = small_model()
    tensor = model.graph.initializer[0]
    empty_graph = onnx.ModelProto(ir_version=8)
    no_opset = small_model()
    del no_opset.opset_import[:]
    protos: dict[str, Callable[[], bytes]] = {
        "tensor": tensor.SerializeToString,
        "graph": model.graph.SerializeToString,
        "node": model.graph.node[0].SerializeToString,
        "value-info": model.graph.input[0].SerializeToString,
        "empty-model": onnx.ModelProto().SerializeToString,
        "model-without-graph": empty_graph.SerializeToString,
        "model-without-opset": no_opset.SerializeToString,
    }
    for name, data in protos.items():
        yield from _bytes_case("wrong-proto", name, data, MUST_REFUSE, ("opt", "inspect", "verify"))


# --- families: invalid contents ------------------------------------------------------------------------

def _set_dtype(dtype: int) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].data_type = dtype

    return mutate


def _set_dims(dims: Sequence[int]) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        w = model.graph.initializer[0]
        del w.dims[:]
        w.dims.extend(dims)

    return mutate


def _float_data_w(count: int) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        w = model.graph.initializer[0]
        w.ClearField("raw_data")
        w.float_data.extend(float(i) / 16 for i in range(count))

    return mutate


def _raw_len(size: int) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].raw_data = bytes(range(size))

    return mutate


def _invalid_tensors() -> Iterator[Case]:
    for dtype in (99, -1, 0, 2**31 - 1):
        yield from _proto_case("bad-dtype", f"initializer-{dtype}", _set_dtype(dtype), MUST_REFUSE)
    yield from _proto_case("bad-dtype", "initializer-string", _set_dtype(TensorProto.STRING), MUST_REFUSE)
    for dims in ((-4, -4), (4, -4), (-1,), (2**40, 4), (2**62, 2**62), (4, 4, 0)):
        yield from _proto_case("bad-dims", "x".join(map(str, dims)), _set_dims(dims), MUST_REFUSE)
    yield from _proto_case("bad-data", "raw-68-for-64", _raw_len(68), MUST_REFUSE)
    yield from _proto_case("bad-data", "raw-60-for-64", _raw_len(60), MUST_REFUSE)
    yield from _proto_case("bad-data", "raw-0-for-64", _raw_len(0), MUST_REFUSE)
    yield from _proto_case("bad-data", "float-17-for-16", _float_data_w(17), MUST_REFUSE)
    yield from _proto_case("bad-data", "float-15-for-16", _float_data_w(15), MUST_REFUSE)

    def both(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].float_data.extend([1.0] * 16)  # raw_data and float_data at once

    yield from _proto_case("bad-data", "raw-and-float", both, MUST_REFUSE)

    def int64_in_float(model: onnx.ModelProto) -> None:
        w = model.graph.initializer[0]
        w.ClearField("raw_data")
        w.int64_data.extend(range(16))

    yield from _proto_case("bad-data", "int64-data-for-float", int64_in_float, MUST_REFUSE)
    for where in ("input", "output"):
        for elem in (0, 99, -7):
            def mutate(model: onnx.ModelProto, where: str = where, elem: int = elem) -> None:
                info = model.graph.input[0] if where == "input" else model.graph.output[0]
                info.type.tensor_type.elem_type = elem

            # an output without an element type is against the IR spec, but a tool may infer it
            exits = OK_OR_ERROR if (where, elem) == ("output", 0) else MUST_REFUSE
            yield from _proto_case("bad-elem-type", f"{where}-{elem}", mutate, exits)


def _graph_defects() -> Iterator[Case]:
    def cycle(model: onnx.ModelProto) -> None:
        model.graph.node[0].input[0] = "Y"  # MatMul reads Relu's output: mm -> add -> relu -> mm

    def self_loop(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Relu", ["loop"], ["loop"], name="self"))
        model.graph.node[2].input[0] = "loop"

    def ghost(model: onnx.ModelProto) -> None:
        model.graph.node[1].input[1] = "ghost"

    def ghost_output(model: onnx.ModelProto) -> None:
        model.graph.output[0].name = "nowhere"

    def twice(model: onnx.ModelProto) -> None:
        model.graph.output.append(model.graph.output[0])

    def no_outputs(model: onnx.ModelProto) -> None:
        del model.graph.output[:]

    def no_nodes(model: onnx.ModelProto) -> None:
        del model.graph.node[:]

    def produced_twice(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Relu", ["X"], ["a"], name="dup"))

    def duplicate_initializer(model: onnx.ModelProto) -> None:
        model.graph.initializer.append(model.graph.initializer[1])

    def initializer_shadows_input(model: onnx.ModelProto) -> None:
        model.graph.input.append(helper.make_tensor_value_info("B", TensorProto.FLOAT, [4]))

    def subgraph_ghost(model: onnx.ModelProto) -> None:
        branch = helper.make_graph([helper.make_node("Relu", ["phantom"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        model.graph.initializer.append(cond)
        model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
        model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))

    def wrong_attribute_type(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Softmax", ["Y"], ["s"], axis=1.5))
        model.graph.output[0].name = "s"

    def ir_version_zero(model: onnx.ModelProto) -> None:
        model.ir_version = 0

    refused = {"cycle": cycle, "self-loop": self_loop, "undefined-input": ghost, "undefined-output": ghost_output,
               "produced-twice": produced_twice, "duplicate-initializer": duplicate_initializer,
               "subgraph-undefined": subgraph_ghost, "attribute-type": wrong_attribute_type,
               "ir-version-0": ir_version_zero}
    for name, mutate in refused.items():
        yield from _proto_case("bad-graph", name, mutate, MUST_REFUSE)
    unusual = {"output-twice": twice, "no-outputs": no_outputs, "no-nodes": no_nodes,
               "initializer-shadows-input": initializer_shadows_input}
    for name, mutate in unusual.items():
        yield from _proto_case("bad-graph", name, mutate, OK_OR_ERROR)
    # 3 protobuf levels per If: 20 parses, 200 is past protobuf's nesting limit (100)
    yield from _bytes_case("bad-graph", "if-nested-20", lambda: _nested_ifs(20), OK_OR_ERROR)
    yield from _bytes_case("bad-graph", "if-nested-200", lambda: _nested_ifs(200), MUST_REFUSE)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _nested_ifs(depth: int) -> bytes:
    """The small model plus an If whose then_branch nests `depth` Ifs deep, serialised by hand (the
    protobuf API refuses to build messages past its own nesting limit)."""
    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4])

    leaf = helper.make_graph([helper.make_node("Identity", ["X"], ["e"])], "leaf", [], [value("e")])
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["t0"])], "g0", [], [value("t0")])
    branch = graph.SerializeToString()
    node = b""
    for level in range(1, depth + 1):
        then = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
        node = helper.make_node("If", ["cond"], [f"t{level}"], else_branch=leaf).SerializeToString()
        node += _field(5, then + _field(6, branch))  # NodeProto.attribute = 5, AttributeProto.g = 6
        shell = onnx.GraphProto(name=f"g{level}", output=[value(f"t{level}")])
        branch = _field(1, node) + shell.SerializeToString()  # GraphProto.node = 1
    model = small_model()
    model.graph.initializer.append(helper.make_tensor("cond", TensorProto.BOOL, [], [True]))
    model.graph.output.append(value(f"t{depth}"))
    graph_bytes = model.graph.SerializeToString() + _field(1, node)
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph_bytes)  # ModelProto.graph = 7


def _opsets() -> Iterator[Case]:
    def opset(version: int) -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            model.opset_import[0].version = version

        return mutate

    def custom_op(imported: bool, version: int = 1) -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            model.graph.node.append(helper.make_node("Frob", ["Y"], ["f"], domain="com.hostile"))
            model.graph.output[0].name = "f"
            if imported:
                model.opset_import.append(helper.make_opsetid("com.hostile", version))

        return mutate

    def unknown_default_op(model: onnx.ModelProto) -> None:
        model.graph.node[2].op_type = "Frobnicate"

    def ir_future(model: onnx.ModelProto) -> None:
        model.ir_version = 99

    yield from _proto_case("bad-opset", "onnx-99", opset(99), OK_OR_ERROR)
    yield from _proto_case("bad-opset", "onnx-0", opset(0), MUST_REFUSE)
    yield from _proto_case("bad-opset", "onnx-negative", opset(-3), MUST_REFUSE)
    yield from _proto_case("bad-opset", "ir-version-99", ir_future, OK_OR_ERROR)
    yield from _proto_case("bad-opset", "unknown-domain", custom_op(True), OK_OR_ERROR)
    yield from _proto_case("bad-opset", "unknown-domain-v99", custom_op(True, 99), OK_OR_ERROR)
    yield from _proto_case("bad-opset", "domain-not-imported", custom_op(False), MUST_REFUSE)
    yield from _proto_case("bad-opset", "unknown-onnx-op", unknown_default_op, MUST_REFUSE)


def _casts() -> Iterator[Case]:
    for to in (99, -1, 0):
        def mutate(model: onnx.ModelProto, to: int = to) -> None:
            model.graph.node.append(helper.make_node("Cast", ["Y"], ["c"], to=to))
            model.graph.output[0].name = "c"

        yield from _proto_case("bad-cast", f"to-{to}", mutate, MUST_REFUSE)


def _sparse() -> Iterator[Case]:
    def sparse(values: Sequence[float], indices: Sequence[int] | Sequence[Sequence[int]], dims: Sequence[int],
               dtype: int = TensorProto.FLOAT) -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            del model.graph.initializer[0]
            vals = helper.make_tensor("W", dtype, [len(values)], list(values))
            flat = np.asarray(indices, dtype=np.int64)
            idx = helper.make_tensor("W_indices", TensorProto.INT64, list(flat.shape), flat.ravel().tolist())
            model.graph.sparse_initializer.append(helper.make_sparse_tensor(vals, idx, list(dims)))

        return mutate

    valid = {
        "linear": sparse([1.0, 2.0, 3.0], [0, 5, 15], [4, 4]),
        "coordinates": sparse([1.0, -2.0], [[0, 1], [3, 3]], [4, 4]),
        "no-values": sparse([], [], [4, 4]),
        "dense-as-sparse": sparse([1.0] * 16, list(range(16)), [4, 4]),
    }
    for name, mutate in valid.items():
        yield from _proto_case("sparse", name, mutate, OK_OR_ERROR)
    invalid = {
        "index-out-of-range": sparse([1.0], [16], [4, 4]),
        "negative-index": sparse([1.0], [-1], [4, 4]),
        "unsorted": sparse([1.0, 2.0], [9, 3], [4, 4]),
        "repeated-index": sparse([1.0, 2.0], [3, 3], [4, 4]),
        "values-indices-differ": sparse([1.0, 2.0, 3.0], [0, 1], [4, 4]),
        "wrong-dims": sparse([1.0], [0], [5, 5]),
    }
    for name, mutate in invalid.items():
        yield from _proto_case("sparse", name, mutate, MUST_REFUSE)


# --- family: external data -----------------------------------------------------------------------------

W_BYTES = (np.arange(16, dtype=np.float32).reshape(4, 4) / 8.0 - 1.0).tobytes()
PAD = b"\xee" * 16


@dataclass(frozen=True)
class External:
    """How one external-data case lays out its folder: the model at m/model.onnx, `W` external."""

    location: str | Callable[[Path], str] = "w.bin"
    entries: tuple[tuple[str, str], ...] = (("offset", "16"), ("length", "64"))
    files: Callable[[Path], None] | None = None  # lays out data files; default: m/w.bin, valid
    in_memory_location: bool = True  # data_location=EXTERNAL

    def write(self, folder: Path) -> Path:
        model_dir = folder / "m"
        model_dir.mkdir(parents=True, exist_ok=True)
        _write(folder / "outside" / "w.bin", PAD + W_BYTES + PAD)  # what an escape would read
        if self.files is None:
            _write(model_dir / "w.bin", PAD + W_BYTES + PAD)
        else:
            self.files(folder)
        model = small_model()
        w = model.graph.initializer[0]
        w.ClearField("raw_data")
        if self.in_memory_location:
            w.data_location = TensorProto.EXTERNAL
        location = self.location(folder) if callable(self.location) else self.location
        if location is not None:
            entry = w.external_data.add()
            entry.key, entry.value = "location", location
        for key, value in self.entries:
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        return _save(model, model_dir / "model.onnx")


def _files(**links: str) -> Callable[[Path], None]:
    """Lay out m/<name> as symlinks (value 'link:TARGET'), folders ('dir:') or data ('data:N' bytes)."""
    def lay_out(folder: Path) -> None:
        for name, spec in links.items():
            path = folder / "m" / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            kind, _, arg = spec.partition(":")
            if kind == "link":
                path.symlink_to(arg.replace("{folder}", str(folder)))
            elif kind == "dir":
                path.mkdir(exist_ok=True)
            elif kind == "fifo":
                os.mkfifo(path)
                _unblock_fifo(path)
            else:
                _write(path, (PAD + W_BYTES + PAD)[: int(arg)] if arg else PAD + W_BYTES + PAD)

    return lay_out


def _external_layouts() -> dict[str, tuple[External, frozenset[int]]]:
    offset = ("offset", "16")
    length = ("length", "64")
    return {
        "valid": (External(), MUST_PASS),
        "valid-no-offset": (External(entries=(), files=_files(**{"w.bin": "data:64"})), OK_OR_ERROR),
        "dot-slash": (External(location="./w.bin"), OK_OR_ERROR),
        "inner-dotdot": (External(location="sub/../w.bin", files=_files(**{"w.bin": "data", "sub": "dir:"})),
                         OK_OR_ERROR),
        "dotdot-outside": (External(location="../outside/w.bin"), MUST_REFUSE),
        "dotdot-deep": (External(location="../" * 30 + "etc/passwd", entries=(("length", "64"),)), MUST_REFUSE),
        "absolute": (External(location=lambda f: str(f / "outside" / "w.bin")), MUST_REFUSE),
        "absolute-etc-passwd": (External(location="/etc/passwd", entries=(("length", "64"),)), MUST_REFUSE),
        "dev-zero": (External(location="/dev/zero", entries=(("length", "64"),)), MUST_REFUSE),
        "proc-environ": (External(location="/proc/self/environ", entries=(("length", "64"),)), MUST_REFUSE),
        "backslash-dotdot": (External(location="..\\outside\\w.bin"), MUST_REFUSE),
        "symlink-outside": (External(files=_files(**{"w.bin": "link:../outside/w.bin"})), MUST_REFUSE),
        "symlink-absolute": (External(files=_files(**{"w.bin": "link:{folder}/outside/w.bin"})), MUST_REFUSE),
        "symlink-dir-outside": (External(location="d/w.bin", files=_files(d="link:../outside")), MUST_REFUSE),
        "symlink-loop": (External(files=_files(**{"w.bin": "link:loop.bin", "loop.bin": "link:w.bin"})),
                         MUST_REFUSE),
        "symlink-dangling": (External(files=_files(**{"w.bin": "link:nowhere.bin"})), MUST_REFUSE),
        "symlink-benign": (External(files=_files(**{"w.bin": "link:data/real.bin", "data__real.bin": "data"})),
                           OK_OR_ERROR),
        "missing-file": (External(files=_files()), MUST_REFUSE),
        "location-empty": (External(location=""), MUST_REFUSE),
        "location-missing": (External(location=None), MUST_REFUSE),  # type: ignore[arg-type]
        "location-nul": (External(location="w.bin\x00.txt"), MUST_REFUSE),
        "location-folder": (External(location="sub", files=_files(sub="dir:")), MUST_REFUSE),
        "location-fifo": (External(files=_files(**{"w.bin": "fifo:"})), MUST_REFUSE),
        "location-long": (External(location="w" * 300 + ".bin"), MUST_REFUSE),
        "location-is-model": (External(location="model.onnx", entries=(("length", "64"),)), OK_OR_ERROR),
        "offset-negative": (External(entries=(("offset", "-16"), length)), MUST_REFUSE),
        "offset-text": (External(entries=(("offset", "sixteen"), length)), MUST_REFUSE),
        "offset-float": (External(entries=(("offset", "16.0"), length)), MUST_REFUSE),
        "offset-empty": (External(entries=(("offset", ""), length)), MUST_REFUSE),
        "offset-past-end": (External(entries=(("offset", "4096"), length)), MUST_REFUSE),
        "offset-huge": (External(entries=(("offset", str(2**70)), length)), MUST_REFUSE),
        "length-negative": (External(entries=(offset, ("length", "-64"))), MUST_REFUSE),
        "length-text": (External(entries=(offset, ("length", "lots"))), MUST_REFUSE),
        "length-past-end": (External(entries=(offset, ("length", "1000"))), MUST_REFUSE),
        "length-short": (External(entries=(offset, ("length", "32"))), MUST_REFUSE),
        "length-zero": (External(entries=(offset, ("length", "0"))), MUST_REFUSE),
        "file-too-short": (External(files=_files(**{"w.bin": "data:40"})), MUST_REFUSE),
        "unknown-key": (External(entries=(offset, length, ("frob", "1"))), OK_OR_ERROR),
        "dunder-key": (External(entries=(offset, length, ("__class__", "x"))), OK_OR_ERROR),
        "checksum-key": (External(entries=(offset, length, ("checksum", "deadbeef"))), OK_OR_ERROR),
        "location-twice-escape": (External(entries=(offset, length, ("location", "../outside/w.bin"))),
                                  MUST_REFUSE),
        "no-entries": (External(location=None, entries=()), MUST_REFUSE),  # type: ignore[arg-type]
        "entries-without-flag": (External(in_memory_location=False), MUST_REFUSE),
    }


def _external_data() -> Iterator[Case]:
    for name, (layout, exits) in _external_layouts().items():
        commands = ("opt", "inspect", "verify") if name in ("valid", "dotdot-outside", "symlink-outside") else (
            ("opt", "inspect") if exits == MUST_REFUSE else ("opt",))
        yield from _model_cases("external-data", name, layout.write, exits, commands)

    def model_symlink(folder: Path) -> Path:
        External().write(folder)
        link = folder / "link.onnx"
        link.symlink_to("m/model.onnx")
        return link

    yield from _model_cases("external-data", "model-via-symlink", model_symlink, OK_OR_ERROR, ("opt", "inspect"))

    def out_is_data(folder: Path) -> list[str]:
        model = External().write(folder)
        return ["opt", str(model), "-o", str(folder / "m" / "w.bin")]

    yield Case("external-data-output-is-data-file", "external-data", out_is_data, MUST_REFUSE)

    def out_is_data_hardlink(folder: Path) -> list[str]:
        model = External().write(folder)
        os.link(folder / "m" / "w.bin", folder / "w-link.bin")
        return ["opt", str(model), "-o", str(folder / "w-link.bin")]

    yield Case("external-data-output-is-data-hardlink", "external-data", out_is_data_hardlink, MUST_REFUSE)


# --- family: names -------------------------------------------------------------------------------------

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


def _patched(placeholder: bytes, replacement: bytes, mutate: Callable[[onnx.ModelProto], None]) -> Callable[[], bytes]:
    """Serialise after `mutate`, then swap `placeholder` for `replacement` (same length: invalid UTF-8
    cannot be set through the protobuf API, but fits in the wire format)."""
    assert len(placeholder) == len(replacement)

    def data() -> bytes:
        model = small_model()
        mutate(model)
        return model.SerializeToString().replace(placeholder, replacement)

    return data


def _names() -> Iterator[Case]:
    def node_name(name: str) -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            model.graph.node[0].name = name

        return mutate

    def op_type(op: str, domain: str = "") -> Callable[[onnx.ModelProto], None]:
        def mutate(model: onnx.ModelProto) -> None:
            model.graph.node[2].op_type = op
            model.graph.node[2].domain = domain
            if domain:
                model.opset_import.append(helper.make_opsetid(domain, 1))

        return mutate

    yield from _proto_case("names", "tensor-newline", _rename_tensor("X", "X\nerror: fake"), OK_OR_ERROR)
    yield from _proto_case("names", "tensor-ansi", _rename_tensor("m", "\x1b[2J\x1b[31mred"), OK_OR_ERROR)
    yield from _proto_case("names", "tensor-empty", _rename_tensor("X", ""), MUST_REFUSE)
    yield from _proto_case("names", "tensor-10k", _rename_tensor("a", "t" * 10_000), OK_OR_ERROR)
    yield from _proto_case("names", "node-control-chars", node_name("mm\r\x07\x00\x08"), OK_OR_ERROR)
    yield from _proto_case("names", "op-10k", op_type("Op" * 5_000), MUST_REFUSE)
    yield from _proto_case("names", "op-10k-custom-domain", op_type("Op" * 5_000, "com.hostile"), OK_OR_ERROR)
    yield from _proto_case("names", "op-newline", op_type("Relu\nerror: fake"), MUST_REFUSE)
    yield from _bytes_case("names", "tensor-invalid-utf8",
                           _patched(b"QQQQQQ", b"\xff\xfe\xc3(\x80Q", _rename_tensor("a", "QQQQQQ")), OK_OR_ERROR)
    yield from _bytes_case("names", "output-invalid-utf8",
                           _patched(b"QQQQQQ", b"Y\xed\xa0\x80QQ", _rename_tensor("Y", "QQQQQQ")), OK_OR_ERROR)
    yield from _bytes_case("names", "op-invalid-utf8",
                           _patched(b"ReluQQ", b"R\xffl\xfeQQ", op_type("ReluQQ")), MUST_REFUSE)

    def weird_file(label: str, name: str | bytes, exits: frozenset[int]) -> Iterator[Case]:
        def make(folder: Path) -> Path:
            path = folder / (os.fsdecode(name) if isinstance(name, bytes) else name)
            if len(os.fsencode(path.name)) > NAME_MAX:
                return path  # cannot exist: the OS refuses the name
            return _write(path, _small_bytes())

        yield from _model_cases("names", f"file-{label}", make, exits, ("opt", "inspect", "verify"))

    yield from weird_file("newline", "model\nerror: fake.onnx", OK_OR_ERROR)
    yield from weird_file("invalid-utf8", b"model\xff\xfe.onnx", OK_OR_ERROR)
    yield from weird_file("unicode", "модель-模型.onnx", MUST_PASS)
    yield from weird_file("250-chars", "x" * 250 + ".onnx", OK_OR_ERROR)
    yield from weird_file("over-name-max", "x" * 300 + ".onnx", MUST_REFUSE)

    def long_output(folder: Path) -> list[str]:
        model = _write(folder / "model.onnx", _small_bytes())
        return ["opt", str(model), "-o", str(folder / ("o" * 300 + ".onnx"))]

    yield Case("names-output-too-long", "names", long_output, MUST_REFUSE)

    def long_output_path(folder: Path) -> list[str]:
        model = _write(folder / "model.onnx", _small_bytes())
        return ["opt", str(model), "-o", str(folder.joinpath(*["d" * 200] * 25, "out.onnx"))]

    yield Case("names-output-path-over-path-max", "names", long_output_path, MUST_REFUSE)

    def newline_output(folder: Path) -> list[str]:
        model = _write(folder / "model.onnx", _small_bytes())
        return ["opt", str(model), "-o", str(folder / "out\nerror: fake.onnx")]

    yield Case("names-output-newline", "names", newline_output, OK_OR_ERROR, ("out?error: fake.onnx",))


# --- families: command-line values -----------------------------------------------------------------------

def _opt_case(family: str, name: str, extra: Callable[[Path], list[str]] | Sequence[str],
              exits: frozenset[int], base: str = "small", outputs: tuple[str, ...] = OPT_OUTPUT,
              slow: bool = False) -> Case:
    """`passes opt model.onnx -o out.onnx EXTRA...`"""
    def setup(folder: Path) -> list[str]:
        model = _write(folder / "model.onnx", _base_bytes(base))
        args = extra(folder) if callable(extra) else list(extra)
        return ["opt", str(model), "-o", str(folder / "out.onnx"), *args]

    return Case(f"{family}-{name}", family, setup, exits, outputs, slow)


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


def _outputs() -> Iterator[Case]:
    def at(target: Callable[[Path], str], *, extra: Sequence[str] = ()) -> Callable[[Path], list[str]]:
        def setup(folder: Path) -> list[str]:
            model = _write(folder / "m" / "model.onnx", _small_bytes())
            _write(folder / "outside" / "victim.onnx", b"precious")
            return ["opt", str(model), "-o", target(folder), *extra]

        return setup

    def link(name: str, to: str) -> Callable[[Path], str]:
        def target(folder: Path) -> str:
            (folder / name).symlink_to(to.replace("{folder}", str(folder)))
            return str(folder / name)

        return target

    def hardlink(folder: Path) -> str:
        os.link(folder / "m" / "model.onnx", folder / "hard.onnx")
        return str(folder / "hard.onnx")

    def existing(name: str, data: bytes = b"old contents") -> Callable[[Path], str]:
        return lambda folder: str(_write(folder / name, data))

    def read_only(folder: Path) -> str:
        # as root a 0o555 folder stays writable (os.access says so): then writing there is right
        _mkdir(folder / "ro").chmod(0o555)
        return str(folder / "ro" / "out.onnx")

    refused: dict[str, Callable[[Path], str]] = {
        "input-itself": lambda f: str(f / "m" / "model.onnx"),
        "input-other-spelling": lambda f: str(f / "m" / ".." / "m" / "." / "model.onnx"),
        "input-relative": lambda f: "m/model.onnx",
        "input-via-symlink": link("in-link.onnx", "m/model.onnx"),
        "input-via-hardlink": hardlink,
        "existing-folder": lambda f: str(_mkdir(f / "existing")),
        "case-folder": lambda f: str(f),
        "missing-folder": lambda f: str(f / "nope" / "out.onnx"),
        "missing-deep-folder": lambda f: str(f / "nope" / "deeper" / "out.onnx"),
        "trailing-slash": lambda f: str(f / "newdir") + "/",
        "parent-is-file": lambda f: str(f / "m" / "model.onnx" / "out.onnx"),
        "empty-string": lambda f: "",
        "proc-missing": lambda f: "/proc/hostile-nope/out.onnx",
        "proc-self": lambda f: "/proc/self/out.onnx",
        "proc-file": lambda f: "/proc/version",
        "symlink-to-folder": link("folder-link", "m"),
    }
    for name, target in refused.items():
        yield Case(f"output-{name}", "output", at(target), MUST_REFUSE)
    yield Case("output-existing-file", "output", at(existing("old.onnx")), MUST_PASS, ("old.onnx",))
    yield Case("output-dangling-symlink", "output", at(link("out.onnx", "nowhere.onnx")), OK_OR_ERROR, OPT_OUTPUT)
    yield Case("output-symlink-outside", "output", at(link("out.onnx", "{folder}/outside/victim.onnx")),
               OK_OR_ERROR, OPT_OUTPUT)
    yield Case("output-read-only-folder", "output", at(read_only), OK_OR_ERROR, ("ro/out.onnx",))
    yield Case("output-in-place", "output", at(lambda f: str(f / "m" / "model.onnx"), extra=["--in-place"]),
               OK_OR_ERROR, ("m/model.onnx",))
    yield Case("output-same-as-dump-ir", "output", at(lambda f: str(f / "d"), extra=["--dump-ir", "d"]),
               MUST_REFUSE)


def _dump_ir() -> Iterator[Case]:
    def dump(target: Callable[[Path], str], extra: Sequence[str] = (), model: str = "small",
             output: str = "out.onnx") -> Callable[[Path], list[str]]:
        def setup(folder: Path) -> list[str]:
            path = _write(folder / "m" / "model.onnx", _base_bytes(model))
            _write(folder / "outside" / "keep.txt", b"keep")
            return ["opt", str(path), "-o", str(folder / output), "--dump-ir", target(folder), *extra]

        return setup

    def custom_op_model(folder: Path) -> str:
        model = small_model()
        model.graph.node.append(helper.make_node("Frob", ["Y"], ["f"], domain="com.hostile"))
        model.graph.output[0].name = "f"
        model.opset_import.append(helper.make_opsetid("com.hostile", 1))
        _save(model, folder / "m" / "model.onnx")  # onnxruntime cannot run it: --verify fails after dumping
        return str(folder / "dump")

    dumps = ("out.onnx", "dump", "dump/*")
    yield Case("dump-ir-existing-file", "dump-ir", dump(lambda f: str(_write(f / "dump", b"a file"))), MUST_REFUSE)
    yield Case("dump-ir-model-file", "dump-ir", dump(lambda f: str(f / "m" / "model.onnx")), MUST_REFUSE)
    yield Case("dump-ir-proc", "dump-ir", dump(lambda f: "/proc/hostile-dump"), MUST_REFUSE)
    yield Case("dump-ir-proc-self-fd", "dump-ir", dump(lambda f: "/proc/self/fd"), MUST_REFUSE)
    yield Case("dump-ir-under-a-file", "dump-ir", dump(lambda f: str(f / "m" / "model.onnx" / "d")), MUST_REFUSE)
    yield Case("dump-ir-bad-pipeline", "dump-ir", dump(lambda f: str(f / "dump"), ["-p", "frobnicate"]), MUST_REFUSE)
    yield Case("dump-ir-fails-midway", "dump-ir", dump(custom_op_model, ["--verify"]), MUST_REFUSE)
    yield Case("dump-ir-bad-output", "dump-ir", dump(lambda f: str(f / "dump"), output="nope/out.onnx"), MUST_REFUSE)
    yield Case("dump-ir-nested-new", "dump-ir", dump(lambda f: str(f / "d" / "e" / "f")), MUST_PASS,
               ("out.onnx", "d", "d/*"))
    yield Case("dump-ir-model-folder", "dump-ir", dump(lambda f: str(f / "m")), OK_OR_ERROR,
               ("out.onnx", "m/[0-9][0-9]-*.onnx"))
    yield Case("dump-ir-empty-string", "dump-ir", dump(lambda f: ""), OK_OR_ERROR,
               ("out.onnx", "[0-9][0-9]-*.onnx"))
    yield Case("dump-ir-symlink-outside", "dump-ir", dump(_dump_link), OK_OR_ERROR,
               ("out.onnx", "outside/[0-9][0-9]-*.onnx"))
    yield Case("dump-ir-llama-verify", "dump-ir", dump(lambda f: str(f / "dump"), ["--verify"], "llama"),
               MUST_PASS, dumps)


def _dump_link(folder: Path) -> str:
    (folder / "dl").symlink_to("outside")
    return str(folder / "dl")


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


# --- the corpus ------------------------------------------------------------------------------------------

def cases(seed: int = 0) -> list[Case]:
    """Every hostile case; `seed` picks the truncation offsets and byte mutations."""
    rng = random.Random(seed)
    families = (
        _truncated(rng), _bitflip(rng), _empty_and_foreign(rng), _wrong_proto(), _invalid_tensors(),
        _graph_defects(), _opsets(), _casts(), _sparse(), _external_data(), _names(), _pipelines(), _shapes(),
        _outputs(), _dump_ir(), _verify(), _usage(), _run(),
    )
    corpus = [case for family in families for case in family]
    seen: set[str] = set()
    for case in corpus:
        if case.id in seen:
            raise ValueError(f"duplicate hostile case id {case.id!r}")
        seen.add(case.id)
    return corpus
