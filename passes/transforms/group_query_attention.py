"""`group-query-attention`: attention reads grouped K/V heads where they are, instead of copies repeated
to every query head.

    MatMul(A[B, Hq, S, X], f(Reshape(Expand(Unsqueeze(K[B, Hkv, T, D], 2), [B, Hkv, r, T, D]), [B, Hq, T, D])))
      -> Reshape(MatMul(Reshape(A, [B, Hkv, r*S, X]), f(K)), [B, Hq, S, Y])
    f: an optional Transpose swapping the last two axes, then an optional Mul by a scalar constant

Exporters write grouped-query attention as transformers' `repeat_kv`: each K/V head is copied to the `r`
query heads that share it, then multiplied as if every head had its own. In a decode step that copy is
the whole KV cache, r times, per layer (plus the transpose and the scale, each another pass over it); the
matmuls then read the copies. Query head h reads K/V head h // r, so the r query heads of a group are
consecutive: their rows stack into one matmul against the group's own K (r*S rows instead of S), and
the result unstacks with a Reshape. Each output element is the same dot product.

Needs static head counts (the Expand's shape a constant, as after `freeze-shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import RewriteContext


@dataclass(frozen=True)
class _Repeat:
    """K[B, Hkv, T, D] repeated r times to [B, Hkv*r, T, D], then f (transpose, scale) on the copy."""

    source: gs.Tensor
    groups: int
    repeat: int
    transpose: gs.Node | None
    scale: gs.Node | None
    chain: list[gs.Node]


@dataclass(frozen=True)
class GroupQueryAttention(Pass):
    """MatMuls against K/V repeated per query head (repeat_kv) read the grouped heads instead."""

    name = "group-query-attention"

    def call(self, graph: gs.Graph) -> PassResult:
        ctx = RewriteContext(graph)
        grouped = 0
        for node in list(graph.nodes):
            if node.op != "MatMul" or not ir.is_default_domain(node) or len(node.inputs) != 2:
                continue
            repeat = _repeated(node.inputs[1], ctx)
            rows = node.inputs[0].shape
            if repeat is None or rows is None or len(rows) != 4 or rows[1] != repeat.groups * repeat.repeat:
                continue
            self._group(graph, ctx, node, repeat)
            grouped += 1
        if grouped:
            from passes.transforms.eliminate_dead_code import EliminateDeadCode

            EliminateDeadCode().call(graph)
        return PassResult(graph, bool(grouped), {"matmuls_grouped": grouped})

    def _group(self, graph: gs.Graph, ctx: RewriteContext, node: gs.Node, repeat: _Repeat) -> None:
        rows, out = node.inputs[0], node.outputs[0]
        base = node.name or "MatMul"
        operand = repeat.source
        added: list[gs.Node] = []
        if repeat.transpose is not None:
            dims = list(operand.shape) if operand.shape is not None else None
            moved = ctx.variable(f"{base}/grouped_t", operand.dtype, dims[:2] + dims[:1:-1] if dims else None)
            added.append(ctx.node("Transpose", [operand], [moved], base=f"{base}/grouped", perm=[0, 1, 3, 2]))
            operand = moved
        if repeat.scale is not None:
            factor = next(t for t in repeat.scale.inputs if ir.constant_value(t) is not None)
            scaled = ctx.variable(f"{base}/grouped_scaled", operand.dtype, operand.shape)
            added.append(ctx.node("Mul", [operand, factor], [scaled], base=f"{base}/grouped_scale"))
            operand = scaled
        stacked = ctx.variable(f"{base}/stacked", rows.dtype, None)
        shape_in = ctx.const(f"{base}/stack_shape", np.array([0, repeat.groups, -1, 0], np.int64))
        added.insert(0, ctx.node("Reshape", [rows, shape_in], [stacked], base=f"{base}/stack"))
        product = ctx.variable(f"{base}/grouped_product", out.dtype, None)
        ir.set_input(node, 0, stacked)
        ir.set_input(node, 1, operand)
        ir.set_output(node, 0, product)
        shape_out = ctx.const(f"{base}/unstack_shape", np.array([0, repeat.groups * repeat.repeat, -1, 0], np.int64))
        unstack = ctx.node("Reshape", [product, shape_out], [out], base=f"{base}/unstack")
        position = next(i for i, n in enumerate(graph.nodes) if n is node)
        graph.nodes[position:position + 1] = [*added, node, unstack]


def _repeated(tensor: gs.Tensor, ctx: RewriteContext) -> _Repeat | None:
    """The repeat_kv chain behind a MatMul's second input, when every link has this one use."""
    chain: list[gs.Node] = []
    scale = transpose = None
    node = ctx.producer(tensor, ("Mul", "Transpose", "Reshape"))
    if node is not None and node.op == "Mul":
        constant = [t for t in node.inputs if ir.constant_value(t) is not None]
        if len(constant) != 1 or ir.constant_value(constant[0]).size != 1 or not _single_use(node, ctx):
            return None
        scale = node
        chain.append(node)
        node = ctx.producer(next(t for t in node.inputs if t is not constant[0]), ("Transpose", "Reshape"))
    if node is not None and node.op == "Transpose":
        if list(node.attrs.get("perm", [])) != [0, 1, 3, 2] or not _single_use(node, ctx):
            return None
        transpose = node
        chain.append(node)
        node = ctx.producer(node.inputs[0], "Reshape")
    if node is None or node.op != "Reshape" or not _single_use(node, ctx):
        return None
    expand = ctx.producer(node.inputs[0], "Expand")
    unsqueeze = ctx.producer(expand.inputs[0], "Unsqueeze") if expand is not None and _single_use(expand, ctx) else None
    if unsqueeze is None or not _single_use(unsqueeze, ctx):
        return None
    target, merged = ir.constant_value(expand.inputs[1]), ir.constant_value(node.inputs[1])
    axes = ir.constant_value(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else unsqueeze.attrs.get("axes")
    source = unsqueeze.inputs[0]
    dims = source.shape
    if target is None or merged is None or axes is None or dims is None or len(dims) != 4:
        return None
    if list(np.asarray(axes).reshape(-1)) != [2] or len(target) != 5 or len(merged) != 4:
        return None
    batch, groups, repeat, length, depth = (int(v) for v in target)
    if [groups, length, depth] != [d for d in dims[1:]] or repeat < 2:
        return None
    if list(merged) != [batch, groups * repeat, length, depth] and list(merged[1:]) != [groups * repeat, length, depth]:
        return None
    return _Repeat(source, groups, repeat, transpose, scale, [*chain, node, expand, unsqueeze])


def _single_use(node: gs.Node, ctx: RewriteContext) -> bool:
    return len(node.outputs) == 1 and len(node.outputs[0].outputs) == 1 and not ctx.is_graph_output(node.outputs[0])
