"""ONNX -> Relax import: checks first (static shapes, importable ops, QLinearMatMul decomposed),
then `tvm.relax.frontend.onnx.from_onnx` with weights as constants, then the int8 matmul rewrite.
Importer failures become one `LoweringError` line naming the node, never a TVM traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import traceback
import warnings
from dataclasses import dataclass

import onnx
import tvm
from tvm import relax

from passes.lowering._errors import LoweringError, last_line
from passes.lowering._int8 import narrow_int8_matmuls
from passes.lowering._onnx import (
    check_importable,
    check_static_inputs,
    rewrite_qlinear_matmul,
)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: ONNX name, static shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ImportedModel:
    """The Relax module of an ONNX model plus what the import rewrote on the way."""

    module: tvm.IRModule
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    qlinear_matmuls_decomposed: int
    int8_matmuls: int


def import_onnx(model: onnx.ModelProto) -> ImportedModel:
    """Check, prepare and import a shape-frozen ONNX model; int8 matmuls come out int8."""
    check_static_inputs(model)
    prepared, decomposed = rewrite_qlinear_matmul(model)
    check_importable(prepared)
    module = _from_onnx(prepared)
    module, narrowed = narrow_int8_matmuls(module)
    return ImportedModel(module, _graph_inputs(prepared), _graph_outputs(module, prepared), decomposed, narrowed)


def _from_onnx(model: onnx.ModelProto) -> tvm.IRModule:
    """`from_onnx` with weights as constants; any failure becomes one line naming the node."""
    from tvm.relax.frontend.onnx import from_onnx

    printed = io.StringIO()  # the importer prints the op it failed on; the library never prints
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        try:
            module = from_onnx(model, keep_params_in_input=False)
        except Exception as err:  # the importer raises anything from ValueError to TVMError
            raise LoweringError(_import_failure(err)) from err
        finally:
            if printed.getvalue().strip():
                logger.debug("from_onnx printed: %s", printed.getvalue().strip())
    for warning in caught:  # "Renaming name a.b to a_b": TVM sanitizes input names; run_host feeds by position
        text = str(warning.message)
        (logger.debug if text.startswith("Renaming name") else logger.warning)("from_onnx: %s", text)
    return module


def _import_failure(err: Exception) -> str:
    """'TVM's ONNX importer failed on node 'n' (Op): <last line of the error>'."""
    reason = last_line(err)
    for frame, _ in traceback.walk_tb(err.__traceback__):
        node = frame.f_locals.get("node") if frame.f_code.co_name == "_construct_nodes" else None
        if isinstance(node, onnx.NodeProto):
            return f"TVM's ONNX importer failed on node {node.name!r} ({node.op_type}): {reason}"
    return f"TVM's ONNX importer failed: {reason}"


def _graph_inputs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    initializers = {t.name for t in model.graph.initializer}
    return tuple(_spec(value) for value in model.graph.input if value.name not in initializers)


def _graph_outputs(module: tvm.IRModule, model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """Output specs from the Relax return type (static after import), named as in the ONNX graph."""
    returned = module["main"].ret_ty
    fields = list(returned.fields) if isinstance(returned, relax.TupleType) else [returned]
    names = [value.name for value in model.graph.output]
    if len(fields) != len(names):
        raise LoweringError(f"the imported model returns {len(fields)} values for {len(names)} ONNX outputs")
    specs = []
    for name, field in zip(names, fields):
        shape = getattr(field, "shape", None)
        if not isinstance(field, relax.TensorType) or shape is None:
            raise LoweringError(f"output {name!r} did not import as a tensor of known shape ({field})")
        specs.append(TensorSpec(name, tuple(int(d) for d in shape), str(field.dtype)))
    return tuple(specs)


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    return TensorSpec(value.name, tuple(d.dim_value for d in tensor_type.shape.dim), str(dtype))
