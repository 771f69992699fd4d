"""Opset queries on a graph or a model (re-exported by `passes.core.ir`)."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = ("", "ai.onnx")


def opset_version(graph: gs.Graph | onnx.ModelProto, domain: str = "") -> int:
    """The graph's opset for `domain` ("" and "ai.onnx" are the same), or 0 when not imported."""
    if isinstance(graph, onnx.ModelProto):
        for entry in graph.opset_import:
            if entry.domain == domain or (domain in DEFAULT_DOMAINS and entry.domain in DEFAULT_DOMAINS):
                return entry.version
        return 0
    if domain in DEFAULT_DOMAINS:
        return int(graph.opset or 0)
    for entry in getattr(graph, "import_domains", None) or ():
        if entry.domain == domain:
            return entry.version
    return 0


def set_opset_version(graph: gs.Graph, version: int) -> None:
    """Set the graph's default-domain opset (graphsurgeon exports `import_domains` when it is set,
    so both must change)."""
    graph.opset = version
    if getattr(graph, "import_domains", None):
        graph.import_domains = [
            onnx.helper.make_opsetid(e.domain, version) if e.domain in DEFAULT_DOMAINS else e
            for e in graph.import_domains
        ]
