"""`eliminate-dead-code`: remove nodes (Constant nodes too) that no graph output depends on.

    node with no live output (and no side effects) -> removed

Liveness flows backwards from the graph outputs through node inputs and through the outer-scope
tensors that If/Loop/Scan bodies read. Graph inputs are never removed (that would change the model's
interface), even when unused. Initializers nothing reads are dropped when the graph is exported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Remove nodes that no graph output depends on (unread initializers go with them)."""

    name = "eliminate-dead-code"
    only_removes_dead_nodes = True

    def call(self, graph: gs.Graph) -> PassResult:
        live_nodes = live_node_ids(graph)
        dead = [node for node in graph.nodes if id(node) not in live_nodes]
        ir.remove_nodes(graph, dead)
        return PassResult(graph, bool(dead), {"nodes_removed": len(dead)})


def live_node_ids(graph: gs.Graph, reads: Callable[[gs.Node], list[gs.Tensor]] | None = None) -> set[int]:
    """Ids of the nodes some graph output (transitively) depends on. `reads` says which tensors a node
    depends on (default: its inputs and the outer-scope tensors its subgraphs read); a rewrite asks what
    would stay live once it replaced some inputs."""
    live: set[int] = set()
    pending = list(graph.outputs)
    seen: set[int] = set()
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        node = ir.producer(tensor)
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        pending.extend(reads(node) if reads is not None else [*node.inputs, *ir.outer_scope_inputs(node)])
    return live
