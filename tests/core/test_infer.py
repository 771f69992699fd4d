"""Regional re-inference (`passes.core._infer`): after fold-constants, re-inferring only around what it
folded gives every tensor the type a whole-graph inference gives, without inferring the whole graph."""

from __future__ import annotations

import pytest

from passes.core import _infer, ir
from passes.samples import build_sample
from passes.transforms.fold_constants import FoldConstants


def _types(graph) -> dict[str, tuple[str, object]]:  # type: ignore[no-untyped-def]
    return {name: (str(t.dtype), t.shape) for name, t in ir.tensor_map(graph).items() if type(t) is ir.Variable}


def test_folding_re_infers_around_the_folds_and_matches_a_whole_graph_inference(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "0")  # the contract check would infer the whole graph too
    whole = []
    skeleton = _infer.graph_skeleton
    monkeypatch.setattr(_infer, "graph_skeleton", lambda graph: whole.append(1) or skeleton(graph))
    graph = ir.import_graph(build_sample("tiny-llama", layers=4))
    before = _types(graph)
    result = FoldConstants().call(graph)
    assert result.modified and result.stats["shapes_folded"] > 0
    assert whole == [], "fold-constants inferred the whole graph"
    regional = _types(graph)
    monkeypatch.setattr(_infer, "graph_skeleton", skeleton)
    assert ir.refresh_shapes(graph) == 0  # a whole-graph inference finds nothing more
    assert _types(graph) == regional
    # the folds taught the tensors after them something (the Reshape targets became constants)
    assert sum(1 for name, typed in regional.items() if name in before and before[name] != typed) > 10


def test_a_region_past_a_third_of_the_graph_infers_the_whole_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSES_CHECK_CONTRACTS", "0")
    graph = ir.import_graph(build_sample("tiny-llama", layers=1))
    every_tensor = [t for t in ir.tensor_map(graph).values() if type(t) is ir.Variable and t.outputs]
    assert _infer._refresh_around(graph, every_tensor, []) is None
