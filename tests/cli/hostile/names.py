"""Odd names and paths: family `names` (tensor, node, op and file names), and families `output` and
`dump-ir` (odd `-o` and `--dump-ir` targets)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import onnx
from onnx import helper

from ._base import (
    MUST_PASS, MUST_REFUSE, NAME_MAX, OK_OR_ERROR, OPT_OUTPUT, Case, _base_bytes, _bytes_case, _mkdir,
    _model_cases, _proto_case, _rename_tensor, _save, _small_bytes, _write, small_model,
)

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
