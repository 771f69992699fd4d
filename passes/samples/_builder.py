"""A small ONNX graph builder that writes nodes the way a given exporter spells them.

The sample generators describe a model once; `ExportStyle` holds the pieces that differ between
the TorchScript and dynamo exporters (scalar constants as `Constant` nodes or initializers,
`ReduceMean` axes as attribute or input, `Shape -> Gather -> Unsqueeze` or `Shape(start, end)`
dimension chains, RMSNorm casts, Linear bias order), and `GraphBuilder` applies them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = int(np.iinfo(np.int64).max)
FLOAT32_MIN = float(np.finfo(np.float32).min)
WEIGHT_STD = 0.02
IR_VERSION = 8

ScalarOrList: TypeAlias = int | float | Sequence[int] | Sequence[float]


@dataclass(frozen=True)
class ExportStyle:
    """How one exporter spells the same computation."""

    idiom: str
    opset: int
    constant_nodes: bool  # scalars as `Constant` nodes (TorchScript) rather than initializers
    reduce_axes_input: bool  # `ReduceMean` axes as an int64 input (opset 18) rather than attribute
    shape_slices: bool  # dims via `Shape(start, end)` (dynamo) rather than Shape->Gather->Unsqueeze
    cast_norm: bool  # RMSNorm wrapped in Cast(float32) ... Cast back (dynamo)
    reciprocal: bool  # 1/sqrt as `Reciprocal` (dynamo) rather than `Div(1, .)`
    bias_first: bool  # Linear bias as `Add(bias, MatMul)` (TorchScript) rather than `Add(MatMul, bias)`


def export_style(idiom: str, opset: int) -> ExportStyle:
    """The style of `idiom` ("torchscript" or "dynamo") at `opset`."""
    dynamo = idiom == "dynamo"
    return ExportStyle(
        idiom=idiom,
        opset=opset,
        constant_nodes=not dynamo,
        reduce_axes_input=dynamo,
        shape_slices=dynamo,
        cast_norm=dynamo,
        reciprocal=dynamo,
        bias_first=not dynamo,
    )


class GraphBuilder:
    """Accumulates nodes and initializers under exporter-like scoped names."""

    def __init__(self, style: ExportStyle, seed: int) -> None:
        self.style = style
        self._rng = np.random.default_rng(seed)
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._used: dict[str, int] = {}
        self._shared_constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._scope: list[str] = []

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nest node names under `name` (`/layers.3/self_attn/...`) and parameters (`layers.3.self_attn.*`)."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, base: str) -> str:
        count = self._used.get(base, 0)
        self._used[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def op(self, op_type: str, inputs: Sequence[str], *, output: str | None = None, **attrs: object) -> str:
        """Add one single-output node and return its output tensor name."""
        name = self._unique("/" + "/".join([*self._scope, op_type]))
        out = output or f"{name}_output_0"
        self._nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def name_output(self, tensor: str, name: str) -> None:
        """Rename the graph's final tensor `tensor` (which nothing consumes yet) to `name`."""
        for node in reversed(self._nodes):
            if tensor in node.output:
                node.output[list(node.output).index(tensor)] = name
                return
        raise ValueError(f"no node produces {tensor!r}")

    def const(self, value: ScalarOrList, dtype: type[np.generic] | None = None) -> str:
        """A small constant: a `Constant` node (TorchScript) or a shared initializer (dynamo)."""
        if dtype is None:
            flat = np.asarray(value).ravel()
            dtype = np.float32 if flat.dtype.kind == "f" else np.int64
        array = np.asarray(value, dtype=dtype)
        if self.style.constant_nodes:
            return self.op("Constant", [], value=numpy_helper.from_array(array))
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared_constants:
            name = f"val_{len(self._shared_constants)}"
            self._initializers.append(numpy_helper.from_array(array, name))
            self._shared_constants[key] = name
        return self._shared_constants[key]

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a named initializer (a fixed, non-random table)."""
        self._initializers.append(numpy_helper.from_array(array, name))
        return name

    def param(self, leaf: str, shape: Sequence[int], *, mean: float = 0.0) -> str:
        """A seeded random float32 parameter named after the scope (`layers.0.mlp.up_proj.weight`)."""
        values = mean + WEIGHT_STD * self._rng.standard_normal(tuple(shape), dtype=np.float32)
        return self.initializer(".".join([*self._scope, leaf]), values.astype(np.float32))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.const(list(axes))])

    def dim(self, x: str, axis: int) -> str:
        """The size of `x` along `axis` as an int64 scalar, computed at run time."""
        if self.style.shape_slices:
            return self.op("Squeeze", [self.dim_1d(x, axis)])
        return self.op("Gather", [self.op("Shape", [x]), self.const(axis)], axis=0)

    def dim_1d(self, x: str, axis: int) -> str:
        """The size of `x` along `axis` as an int64 tensor of shape [1], computed at run time."""
        if self.style.shape_slices:
            return self.op("Shape", [x], start=axis, end=axis + 1)
        return self.unsqueeze(self.dim(x, axis), [0])

    def half_dim_1d(self, x: str, axis: int, static_size: int) -> str:
        """`x.shape[axis] // 2` as shape [1]: traced at run time (TorchScript) or static (dynamo)."""
        if self.style.shape_slices:
            return self.const([static_size // 2])
        return self.unsqueeze(self.op("Div", [self.dim(x, axis), self.const(2)]), [0])

    def shape(self, parts: Sequence[str | int]) -> str:
        """A run-time shape: `Concat` of [1]-shaped dims (tensor names) and static sizes (ints);
        TorchScript makes one `Constant` per static size, dynamo one initializer per run of them."""
        pieces: list[str] = []
        run: list[int] = []
        for part in parts:
            if isinstance(part, int):
                run.append(part)
                if self.style.constant_nodes:
                    pieces.append(self.const(run))
                    run = []
                continue
            if run:
                pieces.append(self.const(run))
                run = []
            pieces.append(part)
        if run:
            pieces.append(self.const(run))
        return self.op("Concat", pieces, axis=0)

    def reshape(self, x: str, source: str, leading_axes: Sequence[int], tail: Sequence[int]) -> str:
        """Reshape `x` to `source`'s leading dims followed by the static `tail` dims."""
        parts: list[str | int] = [self.dim_1d(source, axis) for axis in leading_axes]
        return self.op("Reshape", [x, self.shape([*parts, *tail])])

    def reduce_mean(self, x: str, axes: Sequence[int]) -> str:
        if self.style.reduce_axes_input:
            return self.op("ReduceMean", [x, self.const(list(axes))], keepdims=1)
        return self.op("ReduceMean", [x], axes=list(axes), keepdims=1)

    def model(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
              graph_name: str, doc: str) -> onnx.ModelProto:
        """Assemble the accumulated nodes into a model at the style's opset."""
        graph = helper.make_graph(self._nodes, graph_name, list(inputs), list(outputs),
                                  initializer=self._initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.style.opset)],
                                  producer_name="passes.samples", doc_string=doc)
        model.ir_version = IR_VERSION
        return model


def token_input(name: str) -> onnx.ValueInfoProto:
    """An int64 [batch, seq] graph input."""
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])


def float_output(name: str, last_dim: int) -> onnx.ValueInfoProto:
    """A float32 [batch, seq, last_dim] graph output."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", last_dim])
