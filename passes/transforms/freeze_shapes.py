"""`freeze-shapes{input_ids=1x128,...}`: bind dynamic input dims, then fold every shape computation.

    input x: [batch, seq] with x=1x128       -> x: [1, 128] (and every input sharing `batch`/`seq`)
    Shape -> Gather -> Concat -> Reshape     -> Reshape with a constant shape

Binding is followed by shape inference (with data propagation) and `fold-constants`, which folds
and re-infers until nothing more folds. The stat `dynamic_shape_inputs_left` counts Reshape/Expand/Tile/Slice/ConstantOfShape/
Range nodes whose shape-like input is still computed at run time: the goal is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, parse_dims
from passes.core.errors import PipelineError
from passes.transforms.fold_constants import FoldConstants

#: op -> positions of the inputs that hold a shape, size or index the op's output shape depends on.
SHAPE_INPUTS: Mapping[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
}


@dataclass(frozen=True)
class FreezeShapes(Pass):
    """Bind input dims (input_ids=1x128) and fold the shape computations that depended on them."""

    name = "freeze-shapes"
    shapes: Mapping[str, tuple[int, ...]] = field(
        default_factory=dict, metadata={"help": "NAME=DIMS per graph input, e.g. input_ids=1x128"}
    )
    max_bytes: int = field(default=2**20, metadata={"min": 0, "help": "fold-constants size cap used while folding"})

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> FreezeShapes:
        """`max_bytes` is an option; every other key is a graph input name bound to dims."""
        values: dict[str, Any] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for key, text in options.items():
            try:
                if key == "max_bytes":
                    values["max_bytes"] = int(text)
                else:
                    shapes[key] = parse_dims(text)
            except ValueError as err:
                raise PipelineError(f"pass 'freeze-shapes' option {key!r}: {err}") from err
        return cls(shapes=shapes, **values)

    def spec(self) -> str:
        parts = [f"{k}={'x'.join(map(str, v))}" for k, v in self.shapes.items()]
        if self.max_bytes != 2**20:
            parts.append(f"max_bytes={self.max_bytes}")
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name

    def requires(self, graph: gs.Graph) -> None:
        inputs = {t.name: t for t in graph.inputs}
        for name, dims in self.shapes.items():
            if name not in inputs:
                raise self.violation(f"no graph input {name!r} (inputs: {', '.join(inputs) or 'none'})")
            shape = inputs[name].shape
            if shape is not None and len(shape) != len(dims):
                raise self.violation(f"input {name!r} has rank {len(shape)}, but {len(dims)} dims were given")
            for axis, (old, new) in enumerate(zip(shape or (), dims)):
                if isinstance(old, (int, np.integer)) and old >= 0 and old != new:
                    raise self.violation(f"input {name!r} dim {axis} is fixed at {old}, cannot bind it to {new}")

    def call(self, graph: gs.Graph) -> PassResult:
        bound = self._bind_inputs(graph)
        reshaped = ir.refresh_shapes(graph)  # tensors whose inferred shape or type became more known
        folding = FoldConstants(max_bytes=self.max_bytes).call(graph)
        folded = sum(int(v) for k, v in folding.stats.items() if k != "constant_nodes_lifted")
        stats = {"dims_bound": bound, "nodes_folded": folded, "dynamic_shape_inputs_left": count_dynamic_shapes(graph)}
        return PassResult(graph, bool(bound or reshaped or folding.modified), stats)

    def ensures(self, graph: gs.Graph) -> None:
        for tensor in graph.inputs:
            if tensor.name in self.shapes and list(tensor.shape or ()) != list(self.shapes[tensor.name]):
                raise self.violation(f"input {tensor.name!r} is not bound to {self.shapes[tensor.name]}")

    def _bind_inputs(self, graph: gs.Graph) -> int:
        """Set the given input shapes; symbols they bind (batch, seq) bind other inputs too."""
        symbols: dict[str, int] = {}
        for tensor in graph.inputs:
            dims = self.shapes.get(tensor.name)
            for old, new in zip(tensor.shape or (), dims or ()):
                if isinstance(old, str) and symbols.setdefault(old, new) != new:
                    raise self.violation(f"dim {old!r} is bound to both {symbols[old]} and {new}")
        bound = 0
        for tensor in graph.inputs:
            if isinstance(tensor, gs.Constant) or tensor.shape is None:
                continue
            given = self.shapes.get(tensor.name)
            new = list(given) if given else [symbols.get(d, d) if isinstance(d, str) else d for d in tensor.shape]
            bound += sum(1 for old, dim in zip(tensor.shape, new) if old != dim)
            if list(tensor.shape) != new:
                tensor.shape = new
        return bound


def count_dynamic_shapes(graph: gs.Graph) -> int:
    """Nodes whose shape-like inputs are still computed at run time."""
    count = 0
    for node in graph.nodes:
        positions = SHAPE_INPUTS.get(node.op, ())
        if any(i < len(node.inputs) and node.inputs[i].name and ir.constant_value(node.inputs[i]) is None for i in positions):
            count += 1
    return count
