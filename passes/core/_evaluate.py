"""Evaluate one ONNX node on constant numpy inputs, for the `fold-constants` pass.

`evaluate_node` runs a numpy fast path (`passes.core._evaluate_ops`, `passes.core._evaluate_shape_ops`)
for the ops that shape computations and weight preprocessing use, and every other default-domain
op through `onnx.reference`. Nodes that cannot be evaluated at compile time (custom domains,
subgraph attributes, random ops, invalid inputs) raise `EvaluationUnsupported` with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.core import _evaluate_ops as ops
from passes.core import _evaluate_shape_ops as shape_ops

__all__ = ["NONDETERMINISTIC_OPS", "EvaluationUnsupported", "evaluate_node"]

logger = logging.getLogger(__name__)


class EvaluationUnsupported(Exception):
    """The node cannot be evaluated at compile time; the message says why."""


NONDETERMINISTIC_OPS: frozenset[str] = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)
"""Ops whose outputs are random. Dropout is random only in training mode, checked per node."""

_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_UNARY_FUNCTIONS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = MappingProxyType(
    {
        "Neg": np.negative,
        "Abs": np.abs,
        "Sqrt": np.sqrt,
        "Reciprocal": np.reciprocal,
        "Exp": np.exp,
        "Log": np.log,
        "Floor": np.floor,
        "Ceil": np.ceil,
        "Sign": np.sign,
        "Not": np.logical_not,
        "Relu": ops.relu,
        "Tanh": ops.via_float64(np.tanh),
        "Sigmoid": ops.via_float64(ops.sigmoid),
        "Erf": ops.via_float64(ops.erf),
    }
)
_LOGICAL_FUNCTIONS: Mapping[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = MappingProxyType(
    {
        "Equal": np.equal,
        "Less": np.less,
        "Greater": np.greater,
        "LessOrEqual": np.less_equal,
        "GreaterOrEqual": np.greater_equal,
        "And": np.logical_and,
        "Or": np.logical_or,
        "Xor": np.logical_xor,
    }
)
_FAST_PATHS: Mapping[str, ops.OpImpl] = MappingProxyType(
    {name: ops.unary(function) for name, function in _UNARY_FUNCTIONS.items()}
    | {name: ops.logical(function) for name, function in _LOGICAL_FUNCTIONS.items()}
    | {
        "Add": ops.binary(np.add),
        "Sub": ops.binary(np.subtract),
        "Mul": ops.binary(np.multiply),
        "Div": ops.binary(ops.divide),
        "Pow": ops.binary(ops.power),
        "Mod": ops.mod,
        "Min": ops.variadic(np.minimum),
        "Max": ops.variadic(np.maximum),
        "Where": ops.where,
        "Clip": ops.clip,
        "Cast": ops.cast,
        "Identity": ops.identity,
        "Dropout": ops.dropout,
        "ReduceSum": ops.reduce(ops.reduce_sum, input_since=13),
        "ReduceProd": ops.reduce(ops.reduce_prod, input_since=18),
        "ReduceMean": ops.reduce(ops.reduce_mean, input_since=18),
        "ReduceMax": ops.reduce(ops.reduce_max, input_since=18),
        "ReduceMin": ops.reduce(ops.reduce_min, input_since=18),
        "CumSum": ops.cumsum,
        "Softmax": ops.softmax,
        "Shape": shape_ops.shape,
        "Size": shape_ops.size,
        "Gather": shape_ops.gather,
        "Unsqueeze": shape_ops.unsqueeze,
        "Squeeze": shape_ops.squeeze,
        "Concat": shape_ops.concat,
        "Reshape": shape_ops.reshape,
        "Transpose": shape_ops.transpose,
        "Flatten": shape_ops.flatten,
        "Slice": shape_ops.slice_,
        "Split": shape_ops.split,
        "Expand": shape_ops.expand,
        "Tile": shape_ops.tile,
        "Trilu": shape_ops.trilu,
        "NonZero": shape_ops.nonzero,
        "Constant": shape_ops.constant,
        "ConstantOfShape": shape_ops.constant_of_shape,
        "Range": shape_ops.range_,
        "MatMul": ops.matmul,
        "Gemm": ops.gemm,
        "Einsum": ops.einsum,
    }
)
"""Op type -> numpy implementation. Every other default-domain op goes to `onnx.reference`."""


def evaluate_node(
    op_type: str,
    domain: str,
    inputs: Sequence[np.ndarray | None],
    attrs: Mapping[str, Any],
    *,
    opset: int,
    num_outputs: int,
) -> list[np.ndarray]:
    """Evaluate one node on constant inputs and return its `num_outputs` outputs.

    `inputs` holds None for an omitted optional input; `attrs` holds plain python values as
    onnx-graphsurgeon gives them (tensor attributes as arrays, dtypes as numpy dtypes or
    `TensorProto` enums). Raises `EvaluationUnsupported` when the node cannot be evaluated.
    """
    call = ops.OpCall(tuple(inputs), attrs, opset, num_outputs)
    _check_evaluable(op_type, domain, call)
    implementation = _FAST_PATHS.get(op_type)
    if implementation is not None:
        try:
            return _run_fast_path(op_type, implementation, call)
        except ops.NeedsReference as reason:
            logger.debug("%s: no fast path (%s); using onnx.reference", op_type, reason)
    return _run_reference(op_type, call)


def _check_evaluable(op_type: str, domain: str, call: ops.OpCall) -> None:
    """Raise `EvaluationUnsupported` for a node that has no compile-time value."""
    if domain not in _DEFAULT_DOMAINS:
        raise EvaluationUnsupported(f"{op_type}: custom domain {domain!r} cannot be evaluated")
    if op_type in _SUBGRAPH_OPS or any(_is_graph(value) for value in call.attrs.values()):
        raise EvaluationUnsupported(f"{op_type}: ops with subgraph attributes are not evaluated")
    if op_type in NONDETERMINISTIC_OPS:
        raise EvaluationUnsupported(f"{op_type}: output is random, so it is not a constant")
    if op_type == "Dropout" and _is_training_dropout(call):
        raise EvaluationUnsupported("Dropout: in training mode its output is random")
    for index, value in enumerate(call.inputs):
        if value is not None and not isinstance(value, np.ndarray):
            raise EvaluationUnsupported(
                f"{op_type}: input {index} is a {type(value).__name__}, not a numpy array"
            )


def _is_graph(value: Any) -> bool:
    """True for a graph attribute: a `GraphProto` or a graphsurgeon Graph (nodes and outputs)."""
    if isinstance(value, (list, tuple)):
        return any(_is_graph(item) for item in value)
    return isinstance(value, onnx.GraphProto) or (
        hasattr(value, "nodes") and hasattr(value, "outputs")
    )


def _is_training_dropout(call: ops.OpCall) -> bool:
    """Dropout is random when training (input from 12, `is_test=0` before 7) with ratio > 0."""
    if call.opset < 7:
        return not call.attr("is_test", 0)
    if call.opset < 12:
        return False
    training_mode, ratio = call.optional_input(2), call.optional_input(1)
    training = training_mode is not None and bool(np.asarray(training_mode).reshape(-1)[0])
    return training and (ratio is None or float(np.asarray(ratio).reshape(-1)[0]) != 0.0)


def _run_fast_path(op_type: str, implementation: ops.OpImpl, call: ops.OpCall) -> list[np.ndarray]:
    """Run a numpy implementation; inputs that violate the spec become `EvaluationUnsupported`."""
    try:
        with np.errstate(all="ignore"):
            outputs = [np.asarray(output) for output in implementation(call)]
    except (ValueError, IndexError, OverflowError) as err:
        raise EvaluationUnsupported(f"{op_type}: cannot evaluate: {err}") from err
    if len(outputs) < call.num_outputs:
        raise EvaluationUnsupported(
            f"{op_type}: the node has {call.num_outputs} outputs, the op produces {len(outputs)}"
        )
    return outputs[: call.num_outputs]


def _run_reference(op_type: str, call: ops.OpCall) -> list[np.ndarray]:
    """Evaluate the node as a one-node model with `onnx.reference.ReferenceEvaluator`."""
    from onnx.reference import ReferenceEvaluator  # imported on first use: it costs ~25 ms

    model = _single_node_model(op_type, call)
    feeds = {f"input{i}": value for i, value in enumerate(call.inputs) if value is not None}
    try:
        with np.errstate(all="ignore"):
            results = ReferenceEvaluator(model).run(None, feeds)
    # The reference evaluator raises many unrelated exception types for unsupported cases.
    except Exception as err:
        raise EvaluationUnsupported(
            f"{op_type}: onnx.reference could not evaluate it: {err}"
        ) from err
    outputs = []
    for index, result in enumerate(results):
        if not isinstance(result, (np.ndarray, np.generic)):
            raise EvaluationUnsupported(f"{op_type}: output {index} is a {type(result).__name__}")
        output = np.asarray(result)
        # onnx.reference gives fixed-width unicode arrays where ONNX strings are object arrays.
        outputs.append(output.astype(object) if output.dtype.kind == "U" else output)
    return outputs


def _single_node_model(op_type: str, call: ops.OpCall) -> onnx.ModelProto:
    """A model with one node, typed graph inputs `input{i}` and untyped outputs `output{i}`."""
    attribute_types = _attribute_types(op_type, call.opset)
    input_names = ["" if value is None else f"input{i}" for i, value in enumerate(call.inputs)]
    output_names = [f"output{i}" for i in range(call.num_outputs)]
    node = helper.make_node(op_type, input_names, output_names)
    for name, value in call.attrs.items():
        if value is not None:
            node.attribute.append(_attribute_proto(op_type, name, value, attribute_types.get(name)))
    graph = helper.make_graph(
        [node],
        f"evaluate_{op_type}",
        [
            _input_value_info(op_type, name, value)
            for name, value in zip(input_names, call.inputs, strict=True)
            if value is not None
        ],
        [helper.make_empty_tensor_value_info(name) for name in output_names],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", call.opset)])


_PROTO_ATTRIBUTE_TYPES: Mapping[onnx.defs.OpSchema.AttrType, int] = MappingProxyType(
    {
        onnx.defs.OpSchema.AttrType.INT: onnx.AttributeProto.INT,
        onnx.defs.OpSchema.AttrType.FLOAT: onnx.AttributeProto.FLOAT,
        onnx.defs.OpSchema.AttrType.STRING: onnx.AttributeProto.STRING,
        onnx.defs.OpSchema.AttrType.TENSOR: onnx.AttributeProto.TENSOR,
        onnx.defs.OpSchema.AttrType.INTS: onnx.AttributeProto.INTS,
        onnx.defs.OpSchema.AttrType.FLOATS: onnx.AttributeProto.FLOATS,
        onnx.defs.OpSchema.AttrType.STRINGS: onnx.AttributeProto.STRINGS,
    }
)


def _attribute_types(op_type: str, opset: int) -> Mapping[str, int]:
    try:
        return _schema_attribute_types(op_type, opset)
    except onnx.defs.SchemaError as err:
        raise EvaluationUnsupported(
            f"{op_type}: no such op in the ONNX domain at opset {opset}"
        ) from err


@functools.lru_cache(maxsize=512)
def _schema_attribute_types(op_type: str, opset: int) -> Mapping[str, int]:
    """Attribute name -> `AttributeProto` type, for the attribute kinds the fallback can build."""
    schema = onnx.defs.get_schema(op_type, opset, "")
    return MappingProxyType(
        {
            name: _PROTO_ATTRIBUTE_TYPES[attr.type]
            for name, attr in schema.attributes.items()
            if attr.type in _PROTO_ATTRIBUTE_TYPES
        }
    )


def _input_value_info(op_type: str, name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    try:
        element_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, TypeError, ValueError) as err:
        raise EvaluationUnsupported(f"{op_type}: dtype {value.dtype} has no ONNX type") from err
    return helper.make_tensor_value_info(name, element_type, value.shape)


def _attribute_proto(
    op_type: str, name: str, value: Any, attr_type: int | None
) -> onnx.AttributeProto:
    """An `AttributeProto` of the schema's type from a graphsurgeon-style python value."""
    kinds = onnx.AttributeProto
    converters: dict[int, Callable[[Any], Any]] = {
        kinds.INT: _int_attribute,
        kinds.FLOAT: float,
        kinds.STRING: lambda v: v,
        kinds.TENSOR: lambda v: numpy_helper.from_array(ops.tensor_value(v)),
        kinds.INTS: lambda v: [_int_attribute(item) for item in v],
        kinds.FLOATS: lambda v: [float(item) for item in v],
        kinds.STRINGS: lambda v: list(v),
    }
    if attr_type is None or attr_type not in converters:
        raise EvaluationUnsupported(
            f"{op_type}: attribute {name!r} is unknown or of a kind onnx.reference cannot take here"
        )
    try:
        return helper.make_attribute(name, converters[attr_type](value), attr_type=attr_type)
    except (TypeError, ValueError) as err:
        raise EvaluationUnsupported(f"{op_type}: attribute {name!r}={value!r} is invalid") from err


def _int_attribute(value: Any) -> int:
    """An int attribute; a numpy dtype (e.g. Cast `to`) becomes its `TensorProto` enum."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    return helper.np_dtype_to_tensor_dtype(np.dtype(value))
