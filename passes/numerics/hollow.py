"""Hollow models: a model's graph without the bytes of its large initializers, whose values travel beside
it as numpy arrays, so that running or rewriting a large model never makes a protobuf copy of its weights.

    hollow, arrays = split_weights(model)            # drop `model` afterwards: the weights live once
    ModelRunner(hollow, weights=arrays)              # onnxruntime reads the arrays where they lie
    whole = filled_model(hollow, arrays)             # a whole model again (a copy), e.g. to save it

`passes.numerics.verify.ModelRunner` builds its sessions with these helpers; `PassManager.run(hollow=True)`
returns a hollow model and its arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.core._skeleton import INLINE_BYTES, model_skeleton
from passes.core._validate import PROTOBUF_LIMIT, proto_size, tensor_nbytes
from passes.core.errors import VerificationError
from passes.core.io import save_model


#: the file every hollow initializer of a session's model points at; sparse, so it costs no disk
PLACEHOLDER = "weights-given-by-add-initializer.bin"


def hollow_model(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `model` whose initializers in `names` keep their name, dims and type but no bytes (the
    top-level graph; everything else is copied, so the copy costs what the model's small parts do)."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    graph = model.graph
    _copy_fields(graph, light.graph, skip="initializer")
    for tensor in graph.initializer:
        if tensor.name in names:
            light.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
        else:
            light.graph.initializer.append(tensor)
    return light


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model hollow (`hollow_model`) and its initializers past `INLINE_BYTES` as arrays: once the
    caller drops `model`, its weights live once, as numpy (`ModelRunner(hollow, weights=arrays)` runs it)."""
    arrays = shared_arrays(model, {})
    return hollow_model(model, set(arrays)), arrays


def _copy_fields(source: Any, destination: Any, skip: str) -> None:
    """Copy every set field of a protobuf message but `skip` into `destination`."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(destination, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(destination, descriptor.name).CopyFrom(value)
        else:
            setattr(destination, descriptor.name, value)


def shared_arrays(model: onnx.ModelProto, given: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays onnxruntime reads in place: those `given`, and every initializer past `INLINE_BYTES`
    (read out of the model: the one copy made)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        value = given.get(tensor.name)
        if value is None and tensor_nbytes(tensor) > INLINE_BYTES and tensor.data_location != onnx.TensorProto.EXTERNAL:
            value = numpy_helper.to_array(tensor)
        if value is not None:
            arrays[tensor.name] = np.ascontiguousarray(value)
    return arrays


def placeholder_model(light: onnx.ModelProto, arrays: Mapping[str, np.ndarray], folder: Path) -> str | bytes:
    """The session's source: the hollow initializers point into a sparse placeholder file (onnxruntime
    checks that the file is there, then takes the arrays added by `add_initializer` instead of reading
    it). As bytes when no initializer is hollow."""
    hollow = [t for t in light.graph.initializer if t.name in arrays]
    if not hollow:
        return light.SerializeToString() if proto_size(light) < PROTOBUF_LIMIT else \
            str(save_model(light, folder / "model.onnx", external_data=True))
    with open(folder / PLACEHOLDER, "wb") as handle:
        handle.truncate(max(int(a.nbytes) for a in arrays.values()) or 1)
    for tensor in hollow:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(arrays[tensor.name].nbytes))):
            tensor.external_data.add(key=key, value=value)
    path = folder / "model.onnx"
    path.write_bytes(light.SerializeToString())
    return str(path)


def filled_model(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | None) -> onnx.ModelProto:
    """`model` with the bytes of its initializers named in `arrays` (a copy; the model itself when none):
    a hollow model (`split_weights`, `PassManager.run(hollow=True)`) made whole."""
    if not arrays:
        return model
    full = hollow_model(model, set(arrays))
    for tensor in full.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
    return full


def decomposes(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "QLinearMatMul" for node in model.graph.node)


def exposing(model: onnx.ModelProto, names: Sequence[str], types_from: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """`with_outputs`, or the model itself when no output is asked for."""
    return with_outputs(model, names, types_from=types_from) if names else model


def with_outputs(model: onnx.ModelProto, names: Sequence[str], *,
                 types_from: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (types from shape inference on `types_from`, by
    default the model; a name that is already an output or a graph input is left as it is). A hollow
    model (`hollow_model`) keeps the copy small."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    source = types_from or model
    initializers = {t.name for t in source.graph.initializer}
    present = {o.name for o in copy.graph.output} | {i.name for i in source.graph.input if i.name not in initializers}
    wanted = [n for n in dict.fromkeys(names) if n not in present]
    if not wanted:
        return copy
    inferred = onnx.shape_inference.infer_shapes(model_skeleton(source))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    produced = {out for node in copy.graph.node for out in node.output}
    for name in wanted:
        if name not in produced:
            raise VerificationError(f"tensor '{name}' is not produced by any node of the model")
        copy.graph.output.append(helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, None))
    return copy
