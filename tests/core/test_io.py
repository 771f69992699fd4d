"""Tests for `passes.core.io`: safe loading (bad files, bad graphs, external data) and atomic saving."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes.core.io as pio
from passes.core.errors import ModelLoadError, ModelSaveError
from passes.core.io import load_model, load_model_with_info, save_model

OPSET = [helper.make_opsetid("", 17)]
WEIGHT = np.arange(256, dtype=np.float32) / 7.0  # 1 KiB: a tensor the external-data tests can cut short


def _model(
    nodes: list[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    shape: tuple[int, ...] = (256,),
) -> onnx.ModelProto:
    """x -> nodes -> y, float32 of `shape`."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=OPSET)


def _external_weight(location: str, *, offset: int | None = None, length: int | None = None) -> onnx.TensorProto:
    """A float32[256] initializer 'w' whose bytes live in `location`."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[WEIGHT.size])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    return tensor


def _external_model(folder: Path, location: str, **where: int) -> Path:
    """Save `y = x + w` with w in external data at `location` to folder/model.onnx (no data written)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], [_external_weight(location, **where)])
    onnx.save_model(model, str(path))
    return path


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _listing(folder: Path) -> dict[str, str]:
    """name -> sha256 of the contents ("dir" for folders): compares a folder before and after."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in folder.iterdir()}


def _load_error(path: Path, **kwargs: bool) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a load error is one line"
    assert str(path) in message, "a load error names the file"
    return message


# --- loading: valid files -------------------------------------------------------------------------


def test_load_valid_model_equals_onnx_load(sample_file: Path) -> None:
    loaded = load_model_with_info(sample_file)
    assert loaded.path == sample_file
    assert loaded.external_data_files == ()
    assert loaded.model == onnx.load_model(str(sample_file))
    assert load_model(str(sample_file)) == loaded.model  # str paths work too


# --- loading: files that are not ONNX --------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _load_error(tmp_path / "absent.onnx")


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    assert "no such file" in _load_error(tmp_path)


@pytest.mark.parametrize(
    "kind",
    ["text", "random-bytes", "truncated", "empty"],
)
def test_rejects_non_onnx_and_truncated_files(tmp_path: Path, sample_file: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.onnx"
    if kind == "text":
        path.write_text("this is a README, not a model\n")
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        data = sample_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    message = _load_error(path)
    assert "not an ONNX model" in message
    if kind == "truncated":
        assert "truncated" in message


# --- loading: graphs that are not valid ------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (helper.make_node("NoSuchOp", ["x"], ["y"]), "No Op registered for NoSuchOp"),
        (helper.make_node("Softmax", ["x"], ["y"], axis=1.5), "Mismatched attribute type"),
    ],
    ids=["unknown-op", "wrong-attribute-type"],
)
def test_rejects_checker_failures(tmp_path: Path, node: onnx.NodeProto, expected: str) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save_model(_model([node]), str(path))
    message = _load_error(path)
    assert "fails the ONNX checker" in message
    assert expected in message
    # check=False skips only the checker: the same file loads
    assert load_model(path, check=False).graph.node[0].op_type == node.op_type


def test_rejects_cycle(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Identity", ["b"], ["y"], name="out"),
    ]
    path = tmp_path / "cycle.onnx"
    onnx.save_model(_model(nodes), str(path))
    message = _load_error(path, check=False)  # structure checks run even without the checker
    assert "cycle" in message
    assert "'first'" in message or "'second'" in message


def test_rejects_missing_initializer(tmp_path: Path) -> None:
    path = tmp_path / "dangling.onnx"
    onnx.save_model(_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")]), str(path))
    message = _load_error(path)
    assert "'w'" in message and "'add'" in message
    assert "missing initializer" in message


def test_rejects_output_nobody_produces(tmp_path: Path) -> None:
    path = tmp_path / "no-output.onnx"
    onnx.save_model(_model([helper.make_node("Relu", ["x"], ["z"])]), str(path))
    assert "'y' is never produced" in _load_error(path)


# --- loading: external data ------------------------------------------------------------------------


def test_loads_valid_external_data(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "w.bin", offset=0, length=WEIGHT.nbytes)
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes())
    loaded = load_model_with_info(path)
    assert loaded.external_data_files == ("w.bin",)
    tensor = loaded.model.graph.initializer[0]
    assert tensor.data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), WEIGHT)


def test_loads_external_data_at_an_offset(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "w.bin", offset=16, length=WEIGHT.nbytes)
    (tmp_path / "w.bin").write_bytes(b"\xff" * 16 + WEIGHT.tobytes())
    np.testing.assert_array_equal(_weights(load_model(path))["w"], WEIGHT)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "nested-dotdot"])
def test_rejects_external_data_outside_the_folder(tmp_path: Path, how: str) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(WEIGHT.tobytes())  # the file exists: only its location is wrong
    location = {"dotdot": "../secret.bin", "absolute": str(outside), "nested-dotdot": "sub/../../secret.bin"}[how]
    (tmp_path / "model" / "sub").mkdir(parents=True)
    path = _external_model(tmp_path / "model", location)
    message = _load_error(path)
    assert "outside the model's folder" in message
    assert "'w'" in message and location in message


def test_rejects_external_data_symlink_that_leaves_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(WEIGHT.tobytes())
    path = _external_model(tmp_path / "model", "w.bin")
    (tmp_path / "model" / "w.bin").symlink_to(outside)
    assert "resolves outside the model's folder" in _load_error(path)


def test_rejects_missing_external_data_file(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "w.bin")
    message = _load_error(path)
    assert "'w.bin' does not exist" in message


@pytest.mark.parametrize(
    ("where", "data", "expected"),
    [
        ({"offset": 0, "length": WEIGHT.nbytes}, WEIGHT[:10].tobytes(), "reads past the end"),
        ({"offset": 512, "length": WEIGHT.nbytes}, WEIGHT.tobytes(), "reads past the end"),
        ({"offset": 4096}, WEIGHT.tobytes(), "starts past the end of 'w.bin' (offset 4096, 1024 bytes)"),
        ({}, WEIGHT[:10].tobytes(), "has 40 bytes, its shape needs 1024"),  # no length recorded
    ],
    ids=["short-file", "offset-plus-length-past-end", "offset-past-end", "short-file-no-length"],
)
def test_rejects_too_short_external_data(tmp_path: Path, where: dict[str, int], data: bytes, expected: str) -> None:
    path = _external_model(tmp_path, "w.bin", **where)
    (tmp_path / "w.bin").write_bytes(data)
    assert expected in _load_error(path)


@pytest.mark.parametrize("mode", ["large-model", "check-false"])
def test_rejects_too_short_external_data_without_length_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    path = _external_model(tmp_path, "w.bin")
    (tmp_path / "w.bin").write_bytes(WEIGHT[:10].tobytes())  # 40 of the 1024 bytes w needs
    if mode == "large-model":
        monkeypatch.setattr(pio, "PROTOBUF_LIMIT", 64)  # as if the model were over 2 GB
        load = lambda: load_model(path)  # noqa: E731
    else:
        load = lambda: load_model(path, check=False)  # noqa: E731
    with pytest.raises(ModelLoadError, match="w"):
        load()


# --- saving ----------------------------------------------------------------------------------------


def _staging_dirs(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def test_save_writes_a_loadable_model_and_no_staging(
    tmp_path: Path, sample_model: Callable[..., onnx.ModelProto]
) -> None:
    model = sample_model("tiny-llama")
    path = tmp_path / "out.onnx"
    assert save_model(model, path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert load_model(path) == model


def test_save_replaces_an_existing_output(tmp_path: Path) -> None:
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old")
    model = _model([helper.make_node("Relu", ["x"], ["y"])])
    save_model(model, str(path))
    assert load_model(path) == model
    assert _staging_dirs(tmp_path, "out.onnx") == []


def test_large_model_goes_to_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_model: Callable[..., onnx.ModelProto]
) -> None:
    model = sample_model("tiny-llama")
    limit = model.ByteSize() // 4
    monkeypatch.setattr(pio, "PROTOBUF_LIMIT", limit)  # a 2 GB model in miniature
    path = save_model(model, tmp_path / "big.onnx")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "big.onnx" and re.fullmatch(r"big\.onnx\.[^./]+\.data", names[1])
    assert path.stat().st_size < limit, "weights moved out of the protobuf"
    assert (tmp_path / names[1]).stat().st_size > model.ByteSize() // 2
    raw = onnx.load_model(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)

    loaded = load_model_with_info(path)  # the checker runs on the path, as for a real > 2 GB model
    assert loaded.external_data_files == (names[1],)

    save_model(sample_model("tiny-llama", seed=1), path)  # saving again replaces the pair, leaves no orphan
    again = sorted(p.name for p in tmp_path.iterdir())
    assert len(again) == 2 and again[1] != names[1]
    expected, got = _weights(model), _weights(loaded.model)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert [n.op_type for n in loaded.model.graph.node] == [n.op_type for n in model.graph.node]


def test_small_model_stays_in_one_file(tmp_path: Path, sample_model: Callable[..., onnx.ModelProto]) -> None:
    save_model(sample_model("tiny-llama"), tmp_path / "small.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]


def _failing_stage(model: onnx.ModelProto, staged_path: Path, external_data: bool, *, token: str) -> list[str]:
    staged_path.write_bytes(model.SerializeToString()[:100])  # half-written, then the disk fills up
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "older-output-present"])
def test_failed_save_leaves_the_folder_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    path = tmp_path / "out.onnx"
    if existing:
        path.write_bytes(b"older output")
    (tmp_path / "neighbour.txt").write_text("keep")
    before = _listing(tmp_path)
    monkeypatch.setattr(pio, "_stage", _failing_stage)
    with pytest.raises(ModelSaveError, match="No space left on device") as info:
        save_model(_model([helper.make_node("Relu", ["x"], ["y"])]), path)
    assert str(path) in str(info.value)
    assert _listing(tmp_path) == before  # no partial file, no .out.onnx.* staging folder


def test_failed_external_data_save_keeps_the_older_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_model: Callable[..., onnx.ModelProto]
) -> None:
    old, new = sample_model("tiny-llama", seed=0), sample_model("tiny-llama", seed=1)
    monkeypatch.setattr(pio, "PROTOBUF_LIMIT", old.ByteSize() // 4)
    path = save_model(old, tmp_path / "big.onnx")
    before = _listing(tmp_path)
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).name == "big.onnx":
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ModelSaveError):
        save_model(new, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _listing(tmp_path) == before


def test_save_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    path = tmp_path / "in.onnx"
    path.write_bytes(b"the input")
    model = _model([helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
        save_model(model, path, source=path)
    assert path.read_bytes() == b"the input"
    assert [p.name for p in tmp_path.iterdir()] == ["in.onnx"]


@pytest.mark.parametrize("alias", ["symlink", "dotdot", "relative"])
def test_save_refuses_an_alias_of_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alias: str) -> None:
    source = tmp_path / "x.onnx"
    source.write_bytes(b"the input")
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    if alias == "symlink":
        (tmp_path / "link.onnx").symlink_to(source)
        target: str | Path = tmp_path / "link.onnx"
    elif alias == "dotdot":
        target = "./x/../x.onnx"
    else:
        target = "x.onnx"  # relative vs absolute spelling of the same file
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
        save_model(_model([helper.make_node("Relu", ["x"], ["y"])]), target, source=source)
    assert source.read_bytes() == b"the input"


def test_save_in_place_overwrites_the_source(tmp_path: Path) -> None:
    path = tmp_path / "in.onnx"
    path.write_bytes(b"the input")
    model = _model([helper.make_node("Relu", ["x"], ["y"])])
    save_model(model, path, source=path, in_place=True)
    assert load_model(path) == model
    assert [p.name for p in tmp_path.iterdir()] == ["in.onnx"]


def test_save_into_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "out.onnx"
    with pytest.raises(ModelSaveError, match="does not exist"):
        save_model(_model([helper.make_node("Relu", ["x"], ["y"])]), path)
    assert list(tmp_path.iterdir()) == []


def test_save_onto_a_directory(tmp_path: Path) -> None:
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(ModelSaveError, match="is a directory"):
        save_model(_model([helper.make_node("Relu", ["x"], ["y"])]), tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def _sparse_matmul_model(indices: list[int]) -> onnx.ModelProto:
    """Y = X @ W, W a 4x4 sparse initializer with the values 1.5 and -2.0 at linear `indices`."""
    values = helper.make_tensor("W", TensorProto.FLOAT, [2], [1.5, -2.0])
    index = helper.make_tensor("W_indices", TensorProto.INT64, [2], indices)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "sparse",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
    )
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, index, [4, 4]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_sparse_initializers_are_densified_on_load_and_in_the_library(tmp_path: Path) -> None:
    import passes

    model = _sparse_matmul_model([1, 14])
    expected = np.zeros((4, 4), np.float32)
    expected.flat[1], expected.flat[14] = 1.5, -2.0
    path = tmp_path / "sparse.onnx"
    onnx.save_model(model, str(path))
    for dense in (load_model(path).graph, passes.optimize(model).graph):  # a file, and a model in memory
        assert not dense.sparse_initializer
        (weight,) = [t for t in dense.initializer if t.name == "W"]
        np.testing.assert_array_equal(numpy_helper.to_array(weight), expected)
    assert len(model.graph.sparse_initializer) == 1  # the caller's model is left as it was


@pytest.mark.parametrize(("indices", "message"), [([14, 1], "strictly increasing"), ([1, 16], "outside")])
def test_bad_sparse_indices_are_refused(tmp_path: Path, indices: list[int], message: str) -> None:
    path = tmp_path / "sparse.onnx"
    onnx.save_model(_sparse_matmul_model(indices), str(path))
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)
