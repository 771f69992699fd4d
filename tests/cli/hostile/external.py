"""Hostile external data: family `external-data` (escaping locations, symlinks, bad offsets and lengths)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from ._base import (
    MUST_PASS, MUST_REFUSE, OK_OR_ERROR, Case, _model_cases, _save, _unblock_fifo, _write, small_model,
)

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

