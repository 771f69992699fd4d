"""The ONNX checker after every pass, paid for what the pass changed.

The first check of a graph runs `onnx.checker.check_model` on its skeleton (`passes.core._skeleton`: large
constants as typed inputs, so no weight is copied): every node, attribute, type and ordering rule. Later
checks hold the same rules with less work. The graph-wide rules (single assignment, every name read is
defined before it is read, graph outputs are computed, one tensor per name) are a walk over the names;
the node rules (schema, attribute types, input and output counts) are checked for the nodes whose encoded
piece is new since the last check, one `check_node` each; the graph's inputs and outputs are checked as
value infos. A changed node with a subgraph sends the graph back to the whole-model check. With
PASSES_CHECK_CONTRACTS=1 (the test suite) every incremental check is followed by the whole-model one,
and a graph only the latter rejects fails the run. Re-exported by `passes.core.ir` as `check_graph`.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx.onnx_cpp2py_export import checker as c_checker

from passes.core._opsets import DEFAULT_DOMAINS
from passes.core._skeleton import IMPORTED_PIECES, contracts_checked, graph_skeleton, node_entries, value_info_bytes
from passes.core._walk import has_subgraph

#: per graph: (the context checked against, id -> every node piece the last check passed; holding them
#: keeps the ids unique); and the import's skeleton and context until the first check
_CHECKED = "_passes_checked_pieces"
_IMPORTED = "_passes_imported_skeleton"


def remember_import(graph: gs.Graph, skeleton: bytes) -> None:
    """Keep the skeleton `import_graph` made: the first check of the graph checks that skeleton (the imported
    nodes, already encoded: `IMPORTED_PIECES`) and the nodes changed since, instead of encoding every
    constant of the graph for a whole-model check."""
    graph.__dict__[_IMPORTED] = (skeleton, _context_key(graph))


def check_graph(graph: gs.Graph) -> None:
    """Run the ONNX checker on the graph (see the module doc); raises `onnx.checker.ValidationError`."""
    entries = node_entries(graph.nodes)
    key = _context_key(graph)
    checked = graph.__dict__.get(_CHECKED)
    imported = graph.__dict__.pop(_IMPORTED, None)
    seeded = graph.__dict__.pop(IMPORTED_PIECES, ())
    if checked is None and imported is not None and imported[1] == key and _valid(imported[0]):
        checked = (key, {id(piece): piece for piece in seeded})  # the imported nodes pass as they were imported
    if checked is None or checked[0] != key or not _check_changes(graph, entries, checked[1], key):
        onnx.checker.check_model(graph_skeleton(graph))
    elif contracts_checked():
        try:
            onnx.checker.check_model(graph_skeleton(graph))
        except onnx.checker.ValidationError as err:
            raise AssertionError(f"the incremental checker passed a graph the ONNX checker rejects: {err}") from err
    graph.__dict__[_CHECKED] = (key, {id(entry[0]): entry[0] for entry in entries})


def _valid(skeleton: bytes) -> bool:
    try:
        onnx.checker.check_model(skeleton)
    except onnx.checker.ValidationError:
        return False
    return True


def _context_key(graph: gs.Graph) -> tuple[int, tuple[tuple[str, int], ...]]:
    """What a node is checked against: the IR version and the opsets (a pass may bump the opset)."""
    meta = graph.__dict__.get("_passes_model_meta")
    opsets = [("", int(graph.opset))]
    opsets += [(e.domain, int(e.version)) for e in getattr(graph, "import_domains", None) or ()
               if e.domain not in DEFAULT_DOMAINS]
    return (meta.ir_version if meta is not None else 8, tuple(opsets))


def _check_changes(graph: gs.Graph, entries: list[tuple[bytes, ...]], checked: dict[int, bytes],
                   key: tuple[int, tuple[tuple[str, int], ...]]) -> bool:
    """Check the names and the changed nodes; False when a changed node has a subgraph (the caller then
    checks the whole model)."""
    nodes = graph.nodes
    fresh = [(node, entry) for node, entry in zip(nodes, entries) if checked.get(id(entry[0])) is not entry[0]]
    if any(has_subgraph(node) for node, _ in fresh):
        return False
    _check_names(graph)
    context = c_checker.CheckerContext()
    context.ir_version = key[0]
    context.opset_imports = dict(key[1])
    scope = c_checker.LexicalScopeContext()
    for _, entry in fresh:
        c_checker.check_node(_payload(entry[0]), context, scope)  # type: ignore[arg-type]
    for tensor in (*graph.inputs, *graph.outputs):
        c_checker.check_value_info(value_info_bytes(tensor), context)
    return True


def _check_names(graph: gs.Graph) -> None:
    """Single assignment, definition before use, computed graph outputs, one tensor per name."""
    defined: dict[str, gs.Tensor] = {t.name: t for t in graph.inputs}
    for node in graph.nodes:
        for tensor in node.inputs:
            name = tensor.name
            if not name:
                continue
            known = defined.get(name)
            if known is None:
                if type(tensor) is not gs.Constant:
                    _fail(f"node {node.name or node.op!r} ({node.op}) reads '{name}' before anything defines it "
                          "(the graph is not in topological order, or the tensor is not produced)")
                defined[name] = tensor
            elif known is not tensor:
                _fail(f"two tensors are named '{name}' (node {node.name or node.op!r} reads the second)")
        for tensor in node.outputs:
            name = tensor.name
            if not name:
                continue
            if name in defined:
                _fail(f"Graph must be in single static assignment (SSA) form, however '{name}' has been used as "
                      "output names multiple times")
            defined[name] = tensor
    for tensor in graph.outputs:
        known = defined.get(tensor.name)
        if known is None and type(tensor) is not gs.Constant:
            _fail(f"graph output '{tensor.name}' is not computed by any node")
        if known is not None and known is not tensor:
            _fail(f"two tensors are named '{tensor.name}' (one is a graph output)")


def _fail(message: str) -> None:
    raise onnx.checker.ValidationError(message)


def _payload(piece: bytes) -> bytes:
    """A node piece (tag, length, NodeProto bytes) without its tag and length."""
    index = 1
    while piece[index] & 0x80:
        index += 1
    return piece[index + 1:]
