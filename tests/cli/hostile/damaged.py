"""Damaged and foreign files: families `truncated`, `bitflip`, `empty`, `not-onnx` and `wrong-proto`."""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from ._base import (
    COMMANDS, MUST_REFUSE, OK_OR_ERROR, Case, _base_bytes, _bytes_case, _mkdir, _model_cases, _small_bytes,
    _unblock_fifo, small_model,
)

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
