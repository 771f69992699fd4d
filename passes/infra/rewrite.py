"""Rewrite rules: pattern / check / rewrite, driven by an op-type index.

A rule anchors on the *last* node of its pattern (the one whose output the rewrite replaces), so the
driver only visits nodes of the rule's `anchor_ops`, found through one index built per sweep, never
a rescan of the graph per candidate. For each anchor:

1. `match(anchor, ctx)` walks producers from the anchor and returns a `Match` (the pattern's nodes
   and named pieces) or None when the shape of the graph is simply different;
2. `check(match, ctx)` returns a refusal reason ("keepdims=0", "epsilon is not a constant") when the
   pattern is there but rewriting would not be provably equal, else None;
3. `rewrite(match, ctx)` returns the replacement nodes. They are inserted where the anchor was (every
   input of the pattern is produced before it), the anchor's outputs are rebound to the replacement's
   `outputs`, and the matched nodes are removed.

The driver refuses by itself, with a reason, when a matched inner node's output is used outside the
pattern (rewriting would duplicate or lose it). Each rule states its math in one line (`math`).
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import PassResult, Refusal


@dataclass
class Match:
    """What a rule matched: `nodes` (anchor included) are replaced; `values` are named pieces."""

    anchor: gs.Node
    nodes: list[gs.Node]
    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


@dataclass
class Replacement:
    """New nodes (in topological order) and, per anchor output, the tensor that now carries it."""

    nodes: list[gs.Node]
    outputs: list[gs.Tensor]


class RewriteContext:
    """Queries a rule needs while matching, and fresh names while rewriting."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.opset = ir.opset_version(graph)
        self.graph_outputs = ir.graph_output_ids(graph)
        self._names: set[str] | None = None  # the graph's names, gathered on the first `fresh`
        self._counter = itertools.count()
        self._positions = {id(n): i for i, n in enumerate(graph.nodes)}

    # -- matching helpers --------------------------------------------------------------------
    def producer(self, tensor: gs.Tensor, ops: str | Sequence[str]) -> gs.Node | None:
        """The default-domain node of type `ops` that produces `tensor`, else None."""
        node = ir.producer(tensor)
        if node is None or not ir.is_default_domain(node):
            return None
        allowed = (ops,) if isinstance(ops, str) else tuple(ops)
        return node if node.op in allowed else None

    def constant(self, tensor: gs.Tensor) -> np.ndarray | None:
        return ir.constant_value(tensor)

    def scalar(self, tensor: gs.Tensor) -> float | None:
        """The value of a constant with exactly one element (any rank), else None."""
        value = ir.constant_value(tensor)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return id(tensor) in self.graph_outputs

    def position(self, node: gs.Node) -> int | None:
        """The node's index in the graph's (topological) node list when the sweep began; None for
        nodes created during the sweep."""
        return self._positions.get(id(node))

    # -- rewriting helpers -------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A tensor or node name not used anywhere in the graph."""
        if self._names is None:
            self._names = set(ir.tensor_map(self.graph)) | {n.name for n in self.graph.nodes if n.name}
        while True:
            name = f"{base}_{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    def variable(self, base: str, dtype: Any = None, shape: Sequence[Any] | None = None) -> gs.Variable:
        return gs.Variable(self.fresh(base), dtype=dtype, shape=list(shape) if shape is not None else None)

    def const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.fresh(base), np.asarray(value))

    def node(
        self, op: str, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *, base: str, **attrs: Any
    ) -> gs.Node:
        return gs.Node(op, name=self.fresh(base), attrs=attrs, inputs=list(inputs), outputs=list(outputs))


class RewriteRule(abc.ABC):
    """One pattern. Subclasses set `anchor_ops` and `math`, and implement match/check/rewrite."""

    anchor_ops: ClassVar[tuple[str, ...]]
    math: ClassVar[str]

    @abc.abstractmethod
    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        """The pattern ending at `anchor`, or None when it is not there."""

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        """Why the rewrite would not be provably equal, or None to go ahead."""
        return None

    @abc.abstractmethod
    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        """The replacement for the matched nodes."""


@dataclass
class RewriteStats:
    applied: dict[str, int] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.applied.values())


#: sweeps `run_rules` makes at most: a rewrite may expose a new match (a chain of Transposes).
MAX_SWEEPS = 16


def apply_rules(graph: gs.Graph, rules: Sequence[RewriteRule]) -> RewriteStats:
    """One sweep over the graph in topological order, each anchor tried against its rules in order."""
    by_op: dict[str, list[RewriteRule]] = {}
    for rule in rules:
        for op in rule.anchor_ops:
            by_op.setdefault(op, []).append(rule)
    ctx = RewriteContext(graph)
    stats = RewriteStats()
    replaced: dict[int, list[gs.Node]] = {}
    removed: set[int] = set()
    created: set[int] = set()  # nodes made in this sweep: matched again only in the next one
    for anchor in [n for n in graph.nodes if n.op in by_op and ir.is_default_domain(n)]:
        if id(anchor) in removed:
            continue
        for rule in by_op[anchor.op]:
            match = rule.match(anchor, ctx)
            if match is None or any(id(n) in removed or id(n) in created for n in match.nodes):
                continue
            reason = _escaping_output(match, ctx) or rule.check(match, ctx)
            if reason is None:
                replacement = rule.rewrite(match, ctx)
                reason = _reads_removed(match, replacement)
            if reason is not None:
                stats.refusals.append(Refusal(anchor.name or anchor.op, f"{type(rule).__name__}: {reason}"))
                continue
            replaced[id(anchor)] = _splice(match, replacement, ctx)
            created.update(id(n) for n in replaced[id(anchor)])
            removed.update(id(n) for n in match.nodes)
            stats.applied[type(rule).__name__] = stats.applied.get(type(rule).__name__, 0) + 1
            break
    if replaced:
        graph.nodes = [r for n in graph.nodes for r in (replaced.get(id(n), ()) if id(n) in removed else (n,))]
    return stats


def _reads_removed(match: Match, replacement: Replacement) -> str | None:
    """A reason when the replacement still reads an output of a node it removes (then it is undone)."""
    doomed = {id(t): t for n in match.nodes if n is not match.anchor for t in n.outputs}
    for node in replacement.nodes:
        for tensor in node.inputs:
            if id(tensor) in doomed:
                for made in replacement.nodes:  # graphsurgeon already linked them as consumers
                    ir.detach_node(made)
                return f"the rewrite would still read '{tensor.name}', which it removes"
    return None


def _escaping_output(match: Match, ctx: RewriteContext) -> str | None:
    """A reason when an inner node's output is read outside the pattern (or is a graph output)."""
    inside = {id(n) for n in match.nodes}
    for node in match.nodes:
        if node is match.anchor:
            continue
        for tensor in node.outputs:
            if ctx.is_graph_output(tensor):
                return f"intermediate '{tensor.name}' is a graph output"
            if any(id(consumer) not in inside for consumer in tensor.outputs):
                return f"intermediate '{tensor.name}' is used outside the pattern"
    return None


def _splice(match: Match, replacement: Replacement, ctx: RewriteContext) -> list[gs.Node]:
    """Detach the matched nodes and make the replacement write the anchor's output tensors (so
    consumers and graph outputs keep their tensor objects and names). Returns the nodes to insert."""
    anchor_outputs = list(match.anchor.outputs)
    for node in match.nodes:
        ir.detach_node(node)
    nodes = list(replacement.nodes)
    own = {id(n) for n in nodes}
    for old, new in zip(anchor_outputs, replacement.outputs):
        producer = ir.producer(new)
        if producer is None or id(producer) not in own:  # the result is an existing tensor
            if ctx.is_graph_output(old):
                nodes.append(ctx.node("Identity", [new], [old], base="passes/keep_output"))
            else:
                ir.replace_all_uses(old, new)
            continue
        index = next(i for i, t in enumerate(producer.outputs) if t is new)
        ir.set_output(producer, index, old)
        ir.replace_all_uses(new, old)  # uses of `new` inside the replacement itself
        if old.dtype is None:
            old.dtype = new.dtype
        if old.shape is None:
            old.shape = new.shape
    return nodes


def run_rules(graph: gs.Graph, rules: Sequence[RewriteRule], stats_key: str = "rewrites") -> PassResult:
    """A pass body: sweep until no rule applies (so a second run changes nothing); report counts
    per rule and the refusals of the last sweep."""
    applied: dict[str, int] = {}
    refusals: list[Refusal] = []
    for _ in range(MAX_SWEEPS):
        sweep = apply_rules(graph, rules)
        refusals = sweep.refusals
        for name, count in sweep.applied.items():
            applied[name] = applied.get(name, 0) + count
        if not sweep.total:
            break
    else:
        raise RuntimeError(f"rewrite rules {[type(r).__name__ for r in rules]} still matched after {MAX_SWEEPS} sweeps")
    total = sum(applied.values())
    stats: dict[str, int | float | str | bool] = {stats_key: total, **applied}
    return PassResult(graph, total > 0, stats, refusals)
