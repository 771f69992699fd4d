"""Real exporter output: tiny random-weight llama, qwen2, gpt2 and bert models exported by PyTorch's
TorchScript (opset 17) and dynamo (opset 18) exporters with dynamic batch and seq (see export.py),
run through the default `canonicalize` pipeline and through shape freezing.

Structural assertions for the fusion passes (LayerNorm counts, fused Q/K/V groups) use `op_count`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import pytest

import passes
from passes.core import ir
from passes.core.io import load_model_with_info
from passes.testing import assert_equivalent
from passes.transforms.freeze_shapes import SHAPE_INPUTS, count_dynamic_shapes
from tests.real_models.export import ARCHS, EXPORTERS, OPSETS, ArchSpec, Exporter

pytestmark = pytest.mark.slow

CASES = [(arch, exporter) for arch in ARCHS for exporter in EXPORTERS]
#: two shapes, neither the one the exporter traced at (2 x 8), so no size baked in at trace time hides.
SHAPES = ((1, 7), (2, 12))
FROZEN_SHAPE = (1, 16)
# float32. The cleanup folds constant subgraphs (rotary cos/sin tables, transposed weights) with numpy,
# which may round differently from onnxruntime's kernels; the largest error seen is 1.2e-7.
RTOL, ATOL = 1e-5, 1e-5


@dataclass(frozen=True)
class RealExport:
    arch: str
    exporter: Exporter
    path: Path
    model: onnx.ModelProto

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    def shapes(self, dims: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """The same (batch, seq) for every graph input."""
        return {name: dims for name in self.spec.inputs}


@pytest.fixture(scope="session", params=CASES, ids=[f"{arch}-{exporter}" for arch, exporter in CASES])
def real(request: pytest.FixtureRequest, real_export: Callable[[str, Exporter], Path]) -> RealExport:
    arch, exporter = request.param
    path = real_export(arch, exporter)
    return RealExport(arch, exporter, path, passes.load_model(path))


@pytest.fixture(scope="session")
def canonical(real: RealExport) -> onnx.ModelProto:
    """The export after the default pipeline (`canonicalize`), computed once per export."""
    return passes.optimize(real.model)


def op_count(model: onnx.ModelProto, op: str) -> int:
    """How many nodes of the main graph run `op`."""
    return sum(1 for node in model.graph.node if node.op_type == op)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def _dynamic_shape_chains(graph: gs.Graph) -> list[str]:
    """For each node `count_dynamic_shapes` counts, the ops that compute its shape input, nearest first."""
    chains = []
    for node in graph.nodes:
        for position in SHAPE_INPUTS.get(node.op, ()):
            if position >= len(node.inputs) or not node.inputs[position].name:
                continue
            tensor = node.inputs[position]
            if ir.constant_value(tensor) is not None:
                continue
            steps, seen = [], set()
            while tensor.inputs and id(tensor) not in seen and len(steps) < 12:
                seen.add(id(tensor))
                producer = tensor.inputs[0]
                steps.append(f"{producer.op}('{producer.name}')")
                tensor = next((t for t in producer.inputs if ir.constant_value(t) is None), tensor)
            steps.append(f"'{tensor.name}'")
            chains.append(f"{node.op}('{node.name}') input {position} <- " + " <- ".join(steps))
    return chains


def test_export_loads_self_contained_and_passes_the_checker(real: RealExport) -> None:
    loaded = load_model_with_info(real.path)
    assert loaded.external_data_files == (), "the export must be one self-contained .onnx"
    onnx.checker.check_model(loaded.model, full_check=True)
    assert ir.opset_version(loaded.model) == OPSETS[real.exporter]
    assert {i.name: _dims(i) for i in loaded.model.graph.input} == {n: ["batch", "seq"] for n in real.spec.inputs}
    assert [o.name for o in loaded.model.graph.output] == [real.spec.output]


@pytest.mark.parametrize("dims", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_canonicalize_is_equivalent(real: RealExport, canonical: onnx.ModelProto, dims: tuple[int, int]) -> None:
    onnx.checker.check_model(canonical, full_check=True)
    assert {i.name: _dims(i) for i in canonical.graph.input} == {n: ["batch", "seq"] for n in real.spec.inputs}
    assert_equivalent(real.model, canonical, rtol=RTOL, atol=ATOL, input_shapes=real.shapes(dims))


def test_canonicalize_reduces_node_count(real: RealExport, canonical: onnx.ModelProto) -> None:
    before, after = len(real.model.graph.node), len(canonical.graph.node)
    if real.exporter == "torchscript":
        # Constant nodes, Identity, Shape -> Gather -> Unsqueeze chains on static dims
        assert after < before * 0.6, f"{before} -> {after} nodes"
    else:
        # the dynamo exporter runs onnxscript's optimizer (constant folding, CSE) before writing:
        # the cleanup has little or nothing left to remove, but must never add
        assert after <= before, f"{before} -> {after} nodes"
    assert {op: op_count(canonical, op) for op in ("Constant", "Identity")} == {"Constant": 0, "Identity": 0}


def test_freeze_shapes_folds_every_shape_computation(real: RealExport, canonical: onnx.ModelProto) -> None:
    frozen = passes.optimize(real.model, input_shapes={"input_ids": FROZEN_SHAPE})
    onnx.checker.check_model(frozen, full_check=True)
    # binding input_ids binds the `batch` and `seq` symbols, so attention_mask is bound too
    assert {i.name: _dims(i) for i in frozen.graph.input} == {n: list(FROZEN_SHAPE) for n in real.spec.inputs}
    assert_equivalent(real.model, frozen, rtol=RTOL, atol=ATOL, input_shapes=real.shapes(FROZEN_SHAPE))
    graph = ir.import_graph(frozen)
    assert count_dynamic_shapes(graph) == 0, "\n".join(_dynamic_shape_chains(graph))
    assert op_count(frozen, "Shape") == 0, "a Shape op survived freezing"
    assert len(frozen.graph.node) < len(canonical.graph.node)


def _layers(real: RealExport) -> int:
    return int(real.spec.config.get("num_hidden_layers", real.spec.config.get("n_layer", 0)))


def _splits_by_width(model: onnx.ModelProto) -> dict[int, int]:
    widths: dict[int, int] = {}
    for node in model.graph.node:
        if node.op_type == "Split":
            widths[len(node.output)] = widths.get(len(node.output), 0) + 1
    return widths


def test_canonicalize_structural_wins(real: RealExport, canonical: onnx.ModelProto) -> None:
    """What the fusions must achieve on every export: grouped projections and norms kept fused."""
    layers = _layers(real)
    assert layers == 2
    if real.arch in ("llama", "qwen2"):
        # per layer: Q/K/V (grouped KV: N = 64, 32, 32) in one MatMul + Split(3), gate/up in one + Split(2)
        assert _splits_by_width(canonical) == {3: layers, 2: layers}
        assert op_count(canonical, "MatMul") == op_count(real.model, "MatMul") - 3 * layers
    if real.arch == "bert":  # Q/K/V per layer; LayerNorm already a single op from both exporters
        assert _splits_by_width(canonical).get(3) == layers
        assert op_count(canonical, "LayerNormalization") == 2 * layers + 1
    if real.arch == "gpt2":  # GPT-2's c_attn is already one projection; LayerNorm stays fused
        assert op_count(canonical, "LayerNormalization") == 2 * layers + 1


@pytest.mark.parametrize("rule", ["fuse-rms-norm", "fuse-gelu"])
def test_norms_and_gelu_fuse_when_the_opset_may_be_raised(real: RealExport, rule: str) -> None:
    # 2 layers: RMSNorm twice per layer plus the final one; GELU once per layer's MLP; else none
    expected = {("fuse-rms-norm", "llama"): 5, ("fuse-rms-norm", "qwen2"): 5,
                ("fuse-gelu", "gpt2"): 2, ("fuse-gelu", "bert"): 2}.get((rule, real.arch), 0)
    fused = passes.optimize(real.model, f"canonicalize,{rule}{{bump_opset=true}}")
    op = {"fuse-rms-norm": "RMSNormalization", "fuse-gelu": "Gelu"}[rule]
    assert op_count(fused, op) == expected
    for dims in SHAPES:
        assert_equivalent(real.model, fused, rtol=1e-4, atol=1e-5, input_shapes=real.shapes(dims))


def test_lifting_constant_nodes_at_import_writes_the_same_model(real: RealExport, canonical: onnx.ModelProto,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline imports Constant nodes as fold-constants' initializers (`passes.core._lift`): the
    output is the one folding's own lifting gives, byte for byte."""
    from passes.transforms.fold_constants import FoldConstants

    monkeypatch.setattr(FoldConstants, "lifts_constant_nodes", False)
    assert passes.optimize(real.model).SerializeToString() == canonical.SerializeToString()
