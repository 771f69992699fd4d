"""Small matching helpers of the normalisation fusions (`_norm_patterns`): tensor kinds, constants,
reduction axes. Re-exported by `_norm_patterns`."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from passes.core import ir
from passes.infra.rewrite import RewriteContext


def type_name(elem: int | None) -> str:
    return "unknown" if elem is None else TensorProto.DataType.Name(elem).lower()


def rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def is_constant(tensor: gs.Tensor) -> bool:
    """An initializer or a `Constant(value=...)` output, as `ir.constant_value` reads them, unloaded."""
    node = ir.producer(tensor)
    if node is None:
        return isinstance(tensor, gs.Constant)
    return node.op == "Constant" and ir.is_default_domain(node) and "value" in node.attrs


def is_parameter(tensor: gs.Tensor, ctx: RewriteContext) -> bool:
    """A constant or a graph input: what a scale or bias can be."""
    return is_constant(tensor) or any(t is tensor for t in ctx.graph.inputs)


def scalar_constant(ctx: RewriteContext, tensor: gs.Tensor, of_rank: int | None) -> np.ndarray | None:
    """A one-element constant that cannot raise the rank of a tensor of rank `of_rank` when broadcast."""
    if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) != 1:
        return None  # a weight: do not load it
    value = ctx.constant(tensor)
    if value is None or value.size != 1:
        return None
    if value.ndim and (of_rank is None or value.ndim > of_rank):
        return None
    return value


def close_to(value: np.ndarray, target: float) -> bool:
    """`value` is `target` rounded to its own float type (within 2 ulps)."""
    if value.dtype.kind != "f":
        return float(value.reshape(-1)[0]) == target
    ulp = float(np.finfo(value.dtype).eps) * abs(target)
    return abs(float(value.reshape(-1)[0]) - target) <= 2 * ulp


def absorb_constants(nodes: list[gs.Node], ctx: RewriteContext) -> list[gs.Node]:
    """Constant nodes that feed only `nodes`: they die with the pattern, so they join it."""
    inside = {id(n) for n in nodes}
    found: list[gs.Node] = []
    for node in nodes:
        for tensor in node.inputs:
            producer = ir.producer(tensor)
            if (producer is not None and producer.op == "Constant" and id(producer) not in inside
                    and not ctx.is_graph_output(tensor) and all(id(c) in inside for c in tensor.outputs)):
                inside.add(id(producer))
                found.append(producer)
    return found


# -- reductions ------------------------------------------------------------------------------
def reduce_axes(node: gs.Node, ctx: RewriteContext, of_rank: int) -> list[int] | str:
    """ReduceMean's axes (attribute or input), normalised and sorted, or a refusal reason."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = ctx.constant(node.inputs[1])
        if value is None:
            return "ReduceMean axes are not a constant"
        axes = [int(a) for a in value.reshape(-1)]
    else:
        axes = [int(a) for a in node.attrs.get("axes", [])]
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return "ReduceMean with no axes and noop_with_empty_axes=1 is the identity"
        axes = list(range(of_rank))
    if any(not -of_rank <= a < of_rank for a in axes):
        return f"reduction axes {axes} are out of range for rank {of_rank}"
    normalised = sorted({a % of_rank for a in axes})
    return normalised if len(normalised) == len(axes) else f"reduction axes {axes} repeat an axis"


def trailing_count(axes: list[int], of_rank: int) -> int | None:
    """k when `axes` are exactly the last k axes of a rank-`of_rank` tensor, else None."""
    return len(axes) if axes and axes == list(range(of_rank - len(axes), of_rank)) else None


# -- numerator / sqrt(mean(square) + eps) ------------------------------------------------------
