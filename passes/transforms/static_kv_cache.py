"""`static-kv-cache`: a decoder export with a growing KV cache -> a fixed-capacity cache written in place.

    present = Concat(past[B, H, P, D], new[B, H, S, D], axis=2)          (P grows every step)
      -> present = ScatterElements(past[B, H, C, D], slots, new, axis=2)   (C = capacity, fixed)
         slots[b, h, s, d] = cache_position[s]

    Softmax(scores + mask_built_by_the_exporter)
      -> Softmax(scores + bias)      bias[b, 0, s, j] = 0 if j <= cache_position[s] and attention_mask[b, j]
                                                        else finfo.min

Exporters (TorchScript, dynamo, optimum) write the cache as a Concat of the past with the new keys, so
every decode step has a new past length: every shape downstream is dynamic and the whole cache is copied
per step. With a fixed capacity every shape is static (prefill and decode each freeze to one graph) and
the write touches S slots only; a compiler can do it in place (the TVM lowering does). The new input
`cache_position` (int64 [S], as transformers' StaticCache names it) says which slots the S new tokens
take; `attention_mask` becomes [B, C] (1 for slots holding tokens). The exporter's causal mask assumed
the keys were `past ++ new`; it is replaced by one built from slot indices, so the keys can sit anywhere
in the cache. What else reads the past's length (exporters size the keys, the mask and GQA's repeat
`Expand` as past + new) reads C - S, so that past + new is C, the keys attention reads. Positions must
come from a `position_ids` input: without one, a graph that still reads the past's length for anything
but the mask is refused (positions would follow the capacity, not the tokens held). With one, such
reads only size things (a rotary table sliced to past + new rows keeps C rows).

Numerics: the attention sums the same keys (masked slots contribute exp(finfo.min - max) = 0); the pass
changes the interface, so it is not `exact` in the generic sense and its tests compare it with the
original graph run with the equivalent growing cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, Refusal
from passes.infra.rewrite import RewriteContext

#: the new input's name (transformers' StaticCache calls the same thing `cache_position`)
CACHE_POSITION = "cache_position"
_SEQ_AXES = (2, -2)


@dataclass(frozen=True)
class CachePair:
    """One cache tensor: the past input, the new keys or values, and the Concat that joins them."""

    past: gs.Variable
    new: gs.Tensor
    concat: gs.Node


@dataclass(frozen=True)
class StaticKvCache(Pass):
    """Turn a growing KV cache (Concat of past and new) into a fixed-capacity cache written at `cache_position`."""

    name = "static-kv-cache"
    exact = False  # the interface changes (new input, fixed cache length); tests compare with the original
    capacity: int = field(default=256, metadata={"min": 1, "help": "cache slots per sequence (the context)"})
    mask_input: str = field(default="attention_mask", metadata={"help": "the [batch, total] padding-mask input"})

    def call(self, graph: gs.Graph) -> PassResult:
        pairs = cache_pairs(graph)
        if not pairs:
            return PassResult(graph, False)
        if any(t.name == CACHE_POSITION for t in graph.inputs):
            return PassResult(graph, False, refusals=[Refusal(CACHE_POSITION, "the graph already has this input")])
        cached = _downstream(graph, [pair.concat for pair in pairs])
        masked = [found for node in graph.nodes if node.op == "Softmax" and ir.is_default_domain(node)
                  and (found := _masked_scores(node, cached)) is not None]
        reason = self._unsupported(graph, pairs, masked)
        if reason is not None:
            return PassResult(graph, False, refusals=[Refusal(pairs[0].concat.name or "Concat", reason)])
        ctx = RewriteContext(graph)
        seq = _seq_dim(graph, pairs[0]) or ctx.fresh("seq")
        position = gs.Variable(CACHE_POSITION, dtype=np.int64, shape=[seq])
        column = ctx.variable("cache_position/column", np.int64, [1, 1, seq, 1])
        graph.nodes.append(ctx.node("Reshape", [position, _i64(ctx, "column_shape", [1, 1, -1, 1])], [column],
                                    base="cache_position/Reshape"))
        new_tokens = ctx.variable("cache_position/count", np.int64, [1])
        graph.nodes.append(ctx.node("Shape", [position], [new_tokens], base="cache_position/Shape"))
        for pair in pairs:
            self._logical_length(graph, ctx, pair, new_tokens)
            self._write_in_place(graph, ctx, pair, column)
        bias = self._bias(graph, ctx, column, masked[0][0].dtype)
        for scores, apply in masked:
            self._apply_bias(graph, ctx, apply, scores, bias)
        inputs = list(graph.inputs)
        after = next((i + 1 for i, t in enumerate(inputs) if t.name == "position_ids"), len(inputs))
        graph.inputs = [*inputs[:after], position, *inputs[after:]]
        from passes.transforms.eliminate_dead_code import EliminateDeadCode

        EliminateDeadCode().call(graph)
        graph.toposort()
        ir.refresh_shapes(graph)  # the caches' and mask's new shapes, through everything that reads them
        return PassResult(graph, True, {"caches": len(pairs), "masks_replaced": len(masked), "capacity": self.capacity})

    # -- checks -------------------------------------------------------------------------------
    def _unsupported(self, graph: gs.Graph, pairs: list[CachePair],
                     masked: list[tuple[gs.Tensor, gs.Node]]) -> str | None:
        if not masked:
            return "no Softmax over the cached keys adds a mask this pass can replace"
        mask = _input(graph, self.mask_input)
        if mask is not None and (mask.shape is None or len(mask.shape) != 2):
            return f"input {self.mask_input!r} is not a [batch, total] mask"
        past_ids = {id(pair.past) for pair in pairs}
        live = _live_ids(graph, masked)
        has_positions = _input(graph, "position_ids") is not None
        for node in (n for n in graph.nodes if id(n) in live):
            if not has_positions and node.op == "Shape" and any(id(t) in past_ids for t in node.inputs):
                return (f"node {node.name!r} reads the past's length and the model has no position_ids input: "
                        "positions would follow the capacity, not the tokens held; export it with position_ids")
        for pair in pairs:
            if any(consumer is not pair.concat and consumer.op != "Shape" and id(consumer) in live
                   for consumer in _readers(pair)):
                return f"{pair.past.name!r} is read by more than its Concat with the new entries"
        return None

    # -- rewriting ----------------------------------------------------------------------------
    def _write_in_place(self, graph: gs.Graph, ctx: RewriteContext, pair: CachePair, column: gs.Tensor) -> None:
        shape = list(pair.past.shape)
        shape[2] = self.capacity
        pair.past.shape = shape
        new_shape = ctx.variable(f"{pair.past.name}/new_shape", np.int64, [4])
        slots = ctx.variable(f"{pair.past.name}/slots", np.int64, pair.new.shape)
        graph.nodes.append(ctx.node("Shape", [pair.new], [new_shape], base=f"{pair.past.name}/Shape"))
        graph.nodes.append(ctx.node("Expand", [column, new_shape], [slots], base=f"{pair.past.name}/Expand"))
        node = pair.concat
        node.op, node.attrs = "ScatterElements", {"axis": 2}
        ir.set_inputs(node, [pair.past, slots, pair.new])
        present = node.outputs[0]
        if present.shape is not None:
            present.shape = [*present.shape[:2], self.capacity, *present.shape[3:]]

    def _logical_length(self, graph: gs.Graph, ctx: RewriteContext, pair: CachePair, new_tokens: gs.Tensor) -> None:
        """Shape(past) reads see a past of C - S entries, so that past + S (what exporters size the keys,
        the mask and repeat_kv's Expand with) is C, the keys attention now reads."""
        readers = [node for node in _readers(pair) if node.op == "Shape" and ir.is_default_domain(node)]
        if not readers:
            return
        name = pair.past.name
        full = ctx.variable(f"{name}/capacity_shape", np.int64, [4])
        step = ctx.variable(f"{name}/new_entries", np.int64, [4])
        logical = ctx.variable(f"{name}/logical_shape", np.int64, [4])
        graph.nodes.append(ctx.node("Shape", [pair.past], [full], base=f"{name}/Shape"))
        graph.nodes.append(ctx.node("Mul", [new_tokens, _i64(ctx, "seq_axis", [0, 0, 1, 0])], [step], base=f"{name}/Mul"))
        graph.nodes.append(ctx.node("Sub", [full, step], [logical], base=f"{name}/Sub"))
        for node in readers:
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            node.op, node.attrs = "Slice", {}
            ir.set_inputs(node, [logical, _i64(ctx, "start", [start]),
                                 _i64(ctx, "end", [4 if end is None else int(end)]), _i64(ctx, "axes", [0])])

    def _bias(self, graph: gs.Graph, ctx: RewriteContext, column: gs.Tensor, dtype: object) -> gs.Tensor:
        """bias[b, 0, s, j]: 0 where slot j is visible to new token s, else the dtype's lowest value."""
        np_dtype = ir.as_np_dtype(dtype) if dtype is not None else np.dtype(np.float32)
        slots = ctx.const("kv/slot_index", np.arange(self.capacity, dtype=np.int64).reshape(1, 1, 1, -1))
        seq = column.shape[2]
        visible = ctx.variable("kv/causal", np.bool_, [1, 1, seq, self.capacity])
        graph.nodes.append(ctx.node("LessOrEqual", [slots, column], [visible], base="kv/LessOrEqual"))
        mask = _input(graph, self.mask_input)
        if mask is not None:
            batch = mask.shape[0]
            mask.shape = [batch, self.capacity]
            held = ctx.variable("kv/held", np.bool_, [batch, self.capacity])
            wide = ctx.variable("kv/held4", np.bool_, [batch, 1, 1, self.capacity])
            both = ctx.variable("kv/visible", np.bool_, [batch, 1, seq, self.capacity])
            graph.nodes.append(ctx.node("Cast", [mask], [held], base="kv/Cast", to=int(onnx.TensorProto.BOOL)))
            graph.nodes.append(ctx.node("Unsqueeze", [held, _i64(ctx, "axes", [1, 2])], [wide], base="kv/Unsqueeze"))
            graph.nodes.append(ctx.node("And", [visible, wide], [both], base="kv/And"))
            visible = both
        bias = ctx.variable("kv/bias", np_dtype, visible.shape)
        zero = ctx.const("kv/zero", np.zeros((), np_dtype))
        lowest = ctx.const("kv/lowest", np.array(np.finfo(np_dtype).min, np_dtype))
        graph.nodes.append(ctx.node("Where", [visible, zero, lowest], [bias], base="kv/Where"))
        return bias

    def _apply_bias(self, graph: gs.Graph, ctx: RewriteContext, apply: gs.Node, scores: gs.Tensor,
                    bias: gs.Tensor) -> None:
        """apply: Add(scores, mask) or Where(cond, scores, fill) -> Add(scores, bias), same output tensor."""
        apply.op, apply.attrs = "Add", {}
        ir.set_inputs(apply, [scores, bias])


def cache_pairs(graph: gs.Graph) -> list[CachePair]:
    """The growing caches: Concat(past input, new, axis=seq) nodes whose result is a graph output."""
    inputs = {id(t) for t in graph.inputs}
    outputs = ir.graph_output_ids(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "Concat" or not ir.is_default_domain(node) or len(node.inputs) != 2:
            continue
        past, new = _source(node.inputs[0]), node.inputs[1]
        rank = len(past.shape) if past.shape is not None else None
        if (id(past) in inputs and rank == 4 and node.attrs.get("axis") in _SEQ_AXES
                and id(node.outputs[0]) in outputs and isinstance(past, gs.Variable)):
            pairs.append(CachePair(past, new, node))
    return pairs


def _source(tensor: gs.Tensor) -> gs.Tensor:
    """`tensor` before any Identity or one-input Concat (exporters leave both in front of the cache)."""
    node = ir.producer(tensor)
    while node is not None and ir.is_default_domain(node) and len(node.inputs) == 1 and (
            node.op == "Identity" or node.op == "Concat"):
        tensor = node.inputs[0]
        node = ir.producer(tensor)
    return tensor


def _masked_scores(softmax: gs.Node, cached: set[int]) -> tuple[gs.Tensor, gs.Node] | None:
    """(scores, the node applying the mask) when `softmax` reads cached keys through Add(scores, mask)
    or Where(cond, scores, fill) with a mask that does not itself read the cache."""
    apply = ir.producer(softmax.inputs[0])
    if apply is None or not ir.is_default_domain(apply) or len(apply.inputs) < 2:
        return None
    if apply.op == "Add":
        sides = [t for t in apply.inputs if id(t) in cached]
        if len(sides) == 1:
            return sides[0], apply
    if apply.op == "Where" and len(apply.inputs) == 3:
        cond, scores, fill = apply.inputs
        if id(scores) in cached and id(cond) not in cached and ir.constant_value(fill) is not None:
            return scores, apply
    return None


def _downstream(graph: gs.Graph, nodes: list[gs.Node]) -> set[int]:
    """ids of every tensor computed from the outputs of `nodes` (graph order is topological)."""
    found = {id(t) for node in nodes for t in node.outputs}
    for node in graph.nodes:
        if any(id(t) in found for t in node.inputs):
            found.update(id(t) for t in node.outputs)
    return found


def _live_ids(graph: gs.Graph, masked: list[tuple[gs.Tensor, gs.Node]]) -> set[int]:
    """Nodes the outputs would still depend on once each mask operand is replaced by the new bias."""
    from passes.transforms.eliminate_dead_code import live_node_ids

    keep_only = {id(apply): scores for scores, apply in masked}
    return live_node_ids(graph, lambda node: [keep_only[id(node)]] if id(node) in keep_only
                         else [*node.inputs, *ir.outer_scope_inputs(node)])


def _seq_dim(graph: gs.Graph, pair: CachePair) -> object:
    """The new tokens' dim: position_ids' (or input_ids') second dim, else the new entries' own."""
    for name in ("position_ids", "input_ids"):
        found = _input(graph, name)
        if found is not None and found.shape is not None and len(found.shape) == 2:
            return found.shape[1]
    return pair.new.shape[2] if pair.new.shape is not None else None


def _readers(pair: CachePair) -> list[gs.Node]:
    """Nodes reading the past input, directly or through the Identity-like chain in front of its Concat."""
    readers, tensors = [], [pair.past]
    while tensors:
        for node in tensors.pop().outputs:
            if node is not pair.concat and len(node.inputs) == 1 and node.op in ("Identity", "Concat"):
                tensors.extend(node.outputs)
            else:
                readers.append(node)
    return readers


def _input(graph: gs.Graph, name: str) -> gs.Variable | None:
    return next((t for t in graph.inputs if t.name == name), None)


def _i64(ctx: RewriteContext, base: str, values: list[int]) -> gs.Constant:
    return ctx.const(f"kv/{base}", np.array(values, dtype=np.int64))
