"""Safe loading and atomic saving of ONNX models.

Everything that reads a model from disk goes through `load_model`, which turns every way a file can
be wrong (not ONNX, truncated, cyclic, a dangling tensor, external data that points outside the
model's folder) into one `ModelLoadError` line. Everything that writes goes through `save_model`,
which writes to a temporary file beside the target and renames it, never over the input.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from passes.core._external_write import with_external_data
from passes.core._validate import (PROTOBUF_LIMIT, densify_sparse_initializers, external_info, proto_size,
                                   tensor_nbytes, validate_model)
from passes.core.errors import ModelLoadError, ModelSaveError

logger = logging.getLogger(__name__)

#: protobuf cannot serialise a message of 2 GiB or more; larger models keep weights in external data.
#: tensors at least this large move to the external data file when a model is saved that way.
EXTERNAL_DATA_MIN_BYTES = 1024


@dataclass(frozen=True)
class LoadedModel:
    """A model as loaded from disk, with the external data files it was assembled from."""

    model: onnx.ModelProto
    path: Path
    external_data_files: tuple[str, ...]


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Load `path` as an ONNX model, with its external data, or raise `ModelLoadError`."""
    return load_model_with_info(path, check=check).model


def load_model_with_info(path: str | os.PathLike[str], *, check: bool = True) -> LoadedModel:
    """Load `path` as an ONNX model, with its external data, or raise `ModelLoadError`.

    Checks, in order: the file exists and parses; it has a graph; external data locations stay inside
    the model's folder and fit in their files; the graph is acyclic and every tensor is defined; and
    (with `check`) the ONNX checker accepts it.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file" if not path.is_symlink() else f"{path}: a broken symlink")
        model = onnx.load_model(str(path), load_external_data=False)
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read ({err.strerror or _first_line(err)})") from err
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not an ONNX model or truncated ({_first_line(err)})") from err
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or IR version)")
    validate_model(model, label=str(path))
    base_dir = path.resolve().parent
    files = sorted({_check_external_location(path, base_dir, t) for t in _external_tensors(model)})
    if files:  # sizes were checked against the files above: the loaded bytes are not read back
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError, onnx.checker.ValidationError) as err:  # onnx refuses symlinked data
            raise ModelLoadError(f"{path}: cannot read external data ({_first_line(err)})") from err
    densify_sparse_initializers(model, label=str(path))
    check_graph_structure(model.graph, label=str(path))
    if check:
        _run_checker(model, path, external=bool(files) or proto_size(model) >= PROTOBUF_LIMIT)
    return LoadedModel(model, path, tuple(files))


def check_graph_structure(graph: onnx.GraphProto, *, label: str) -> None:
    """Raise `ModelLoadError` if a node uses an undefined tensor or the graph has a cycle."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producers[out] = index
    for node in graph.node:
        for name in node.input:
            if name and name not in defined and name not in producers:
                raise ModelLoadError(
                    f"{label}: tensor '{name}' used by node '{node.name or node.op_type}' is not a graph "
                    "input, an initializer or a node output (missing initializer?)"
                )
    for out in graph.output:
        if out.name not in defined and out.name not in producers:
            raise ModelLoadError(f"{label}: graph output '{out.name}' is never produced")
    cycle_node = _find_cycle(graph, producers)
    if cycle_node is not None:
        raise ModelLoadError(f"{label}: the graph has a cycle through node '{cycle_node}'")


def _find_cycle(graph: onnx.GraphProto, producers: dict[str, int]) -> str | None:
    """Return the name of a node on a cycle, or None (iterative three-colour DFS)."""
    nodes = graph.node
    state = [0] * len(nodes)  # 0 new, 1 on stack, 2 done
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack: list[tuple[int, Iterator[str]]] = [(root, iter(nodes[root].input))]
        state[root] = 1
        while stack:
            index, pending = stack[-1]
            for name in pending:
                dep = producers.get(name)
                if dep is None or state[dep] == 2:
                    continue
                if state[dep] == 1:
                    return nodes[dep].name or nodes[dep].op_type
                state[dep] = 1
                stack.append((dep, iter(nodes[dep].input)))
                break
            else:
                state[index] = 2
                stack.pop()
    return None


def _external_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    return (
        t
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    )


def _check_external_location(path: Path, base_dir: Path, tensor: onnx.TensorProto) -> str:
    """Validate one tensor's external data reference; return its location."""
    where = f"{path}: external data of tensor '{tensor.name}'"
    location, offset, length = external_info(tensor, f"{path}: tensor '{tensor.name}'")
    if "\x00" in location:
        raise ModelLoadError(f"{where}: the location {location!r} holds a NUL character")
    if os.path.isabs(location) or Path(location).drive or ".." in Path(location).parts:
        raise ModelLoadError(f"{where} points outside the model's folder ('{location}')")
    try:
        target = (base_dir / location).resolve(strict=False)
        if base_dir not in target.parents:
            raise ModelLoadError(f"{where} resolves outside the model's folder ('{location}')")
        if not target.is_file():
            raise ModelLoadError(f"{where}: file '{location}' does not exist")
        size = target.stat().st_size
    except (OSError, RuntimeError) as err:  # a symlink loop, a name too long
        raise ModelLoadError(f"{where}: cannot open '{location}' ({getattr(err, 'strerror', None) or err})") from err
    if offset > size:
        raise ModelLoadError(f"{where} starts past the end of '{location}' (offset {offset}, {size} bytes)")
    if length is not None and length > 0 and offset + length > size:
        raise ModelLoadError(f"{where} reads past the end of '{location}' (truncated data file?)")
    available = length if length else size - offset  # onnx reads to the end of the file without a length
    if tensor.data_type != onnx.TensorProto.STRING:  # checked here, so the loaded bytes are never read back
        expected = tensor_nbytes(tensor, where)
        if available != expected:
            raise ModelLoadError(f"{where} has {available} bytes, its shape needs {expected} (truncated data file?)")
    return location


def _run_checker(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    try:
        if external:  # the checker reads the file's proto, with external references, not our loaded copy
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise ModelLoadError(f"{path}: fails the ONNX checker: {_first_line(err)}") from err
    _check_shapes_agree(model, path)


def _check_shapes_agree(model: onnx.ModelProto, path: Path) -> None:
    """Strict shape inference on the model without its weight bytes: a node whose input shapes or types
    contradict its op (a [N,4] @ [5,5] MatMul) is refused here, not deep inside a pass or a build.

    An error raised inside the body of an ONNX function op (MeanVarianceNormalization-13's body trips
    onnx's own Constant check) is onnx's, not the model's: those are let through."""
    from passes.core.ir import model_skeleton

    try:
        onnx.shape_inference.infer_shapes(model_skeleton(model), strict_mode=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as err:
        # one error per failing node, each on its own line(s): "(op_type:X, node name: n): [...] why"
        text = str(err).removeprefix("[ShapeInferenceError] Inference error(s): ")
        errors = [line for line in text.splitlines() if line.startswith("(op_type:")]
        own = [line for line in errors if "Inference error(s):" not in line]  # not from a function body
        if errors and not own:
            return
        first = own[0] if own else " ".join(text.split())
        raise ModelLoadError(f"{path}: shapes or types do not agree: {first}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Write `model` to `path` atomically and return the path.

    `source` is the file the model was loaded from: writing over it is refused unless `in_place`.
    `external_data` None means "only when the model is too large for one protobuf"; the weights then
    go to `<name>.<token>.data` beside the model, a name no earlier save used, so the final rename of
    the model switches from the old complete pair to the new one. Either every file lands
    complete, or the old output is untouched.
    """
    path = check_output_path(path, source=source, in_place=in_place)
    try:
        validate_model(model, label=str(path))
    except ModelLoadError as err:
        raise ModelSaveError(f"refusing to write an invalid model: {err}") from err
    parent = path.parent
    if external_data is None:
        external_data = proto_size(model) >= PROTOBUF_LIMIT
    old_data = _own_data_files(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as err:
        raise ModelSaveError(f"{path}: cannot write to '{parent}' ({_first_line(err)})") from err
    moved: list[str] = []
    staged: list[str] = []
    try:
        staged = _stage(model, staging / path.name, external_data, token=staging.name.rsplit(".", 1)[-1])
        for name in staged:  # data first, the model last: a reader never sees a model without its data
            os.replace(staging / name, parent / name)
            moved.append(name)
    except BaseException as err:  # a full disk, or Ctrl-C between the data and the model
        if len(moved) < len(staged):  # the model is not in place: what moved belongs to nothing
            for name in moved:  # only new data files can be here: their names were never used before
                (parent / name).unlink(missing_ok=True)
        if isinstance(err, (OSError, ValueError)):
            raise ModelSaveError(f"{path}: cannot write ({_first_line(err)})") from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in old_data - set(staged):
        (parent / name).unlink(missing_ok=True)
    return path


def _own_data_files(path: Path) -> set[str]:
    """Data files an earlier `save_model` wrote for the model at `path` (to remove once replaced)."""
    if not path.is_file():
        return set()
    try:
        previous = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # not a model of ours: nothing to clean up
        return set()
    prefix = path.name + "."
    return {
        location
        for location in (external_data_helper.ExternalDataInfo(t).location for t in _external_tensors(previous))
        if location.startswith(prefix) and location.endswith(".data") and "/" not in location
    }


def check_output_path(
    path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None, in_place: bool = False
) -> Path:
    """Raise `ModelSaveError` unless `path` can take a model (checked before any work is done)."""
    text = os.fspath(path)
    if isinstance(text, str) and text.endswith(("/", os.sep)):
        raise ModelSaveError(f"{text}: names a folder (trailing '/'); give the model file's name")
    path = Path(path)
    try:
        if source is not None and not in_place and _same_file(path, Path(source)):
            raise ModelSaveError(f"{path}: refusing to overwrite the input model (pass --in-place to allow it)")
        if source is not None and path.is_file() and any(_same_file(path, data) for data in input_files(source)):
            raise ModelSaveError(f"{path}: refusing to overwrite the input model's external data")
        if path.is_dir():
            raise ModelSaveError(f"{path}: is a directory")
        if not path.parent.is_dir():
            raise ModelSaveError(f"{path}: folder '{path.parent}' does not exist")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ModelSaveError(f"{path}: folder '{path.parent}' is not writable")
    except OSError as err:
        raise ModelSaveError(f"{path}: cannot write there ({err.strerror or _first_line(err)})") from err
    return path


def input_files(model_path: str | os.PathLike[str]) -> list[Path]:
    """The files a model reads besides itself: its external data files, resolved in its folder (no
    checks: a model that cannot be parsed reads none)."""
    model_path = Path(model_path)
    try:
        model = onnx.load_model(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: loading it will say so
        return []
    base = model_path.parent
    locations = set()
    for tensor in _external_tensors(model):
        try:
            locations.add(external_info(tensor, tensor.name)[0])
        except ModelLoadError:  # a bad reference: loading the model will say so
            continue
    return [base / location for location in sorted(locations)]


def _stage(model: onnx.ModelProto, staged_path: Path, external_data: bool, *, token: str) -> list[str]:
    """Write the model (and its data file) into the staging folder; return names, model last."""
    if not external_data:
        with open(staged_path, "wb") as handle:
            handle.write(model.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        return [staged_path.name]
    data_name = f"{staged_path.name}.{token}.data"
    with open(staged_path.parent / data_name, "wb") as data:
        written = with_external_data(model, data, data_name, min_bytes=EXTERNAL_DATA_MIN_BYTES)
        data.flush()
        os.fsync(data.fileno())
    with open(staged_path, "wb") as handle:
        handle.write(written.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    data = staged_path.parent / data_name
    if data.stat().st_size == 0:  # every tensor was small enough to stay inline
        data.unlink()
        return [staged_path.name]
    return [data_name, staged_path.name]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
