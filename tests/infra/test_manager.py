"""PassManager: instruments, contracts, fixpoints, reports, and `passes.optimize`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import passes
from passes import Pass, PassManager, PassResult
from passes.core.errors import FixpointError, PassContractError, PassFailedError, VerificationError
from passes.infra.pipeline import Fixpoint
from tests.helpers import init, model, tensor


def _relu_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Identity", ["x"], ["a"], name="id"),
        helper.make_node("Add", ["a", "w"], ["b"], name="add"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    return model(nodes, [tensor("x", ["n", 4])], [tensor("y", ["n", 4])], [init("w", np.ones(4, np.float32))])


@dataclass(frozen=True)
class _Liar(Pass):
    """Changes the graph and says it did not."""

    name = "liar"

    def call(self, graph: gs.Graph) -> PassResult:
        graph.nodes[-1].op = "Sigmoid"
        return PassResult(graph, False)


@dataclass(frozen=True)
class _Breaker(Pass):
    """Produces a graph the checker rejects (an op that does not exist)."""

    name = "breaker"

    def call(self, graph: gs.Graph) -> PassResult:
        graph.nodes[-1].op = "NoSuchOp"
        return PassResult(graph, True)


@dataclass(frozen=True)
class _Perturb(Pass):
    """Changes the numbers: Relu -> Sigmoid (valid graph, different outputs)."""

    name = "perturb"

    def call(self, graph: gs.Graph) -> PassResult:
        node = graph.nodes[-1]
        if node.op == "Sigmoid":
            return PassResult(graph, False)
        node.op = "Sigmoid"
        return PassResult(graph, True)


@dataclass(frozen=True)
class _Toggle(Pass):
    """Flips Relu <-> Sigmoid forever: never converges."""

    name = "toggle"
    idempotent = False  # each run undoes the last: the runner must not skip it

    def call(self, graph: gs.Graph) -> PassResult:
        node = graph.nodes[-1]
        node.op = "Sigmoid" if node.op == "Relu" else "Relu"
        return PassResult(graph, True)


@dataclass(frozen=True)
class _NeedsThreeNodes(Pass):
    """Requires three nodes."""

    name = "needs-three-nodes"

    def requires(self, graph: gs.Graph) -> None:
        if len(graph.nodes) != 3:
            raise self.violation("expects exactly three nodes")

    def call(self, graph: gs.Graph) -> PassResult:
        return PassResult(graph, False)


def test_report_records_every_pass() -> None:
    result = PassManager("eliminate-identity,eliminate-dead-code").run(_relu_model())
    report = result.report
    assert [r.name for r in report.passes] == ["eliminate-identity", "eliminate-dead-code"]
    first = report.passes[0]
    assert first.modified and first.nodes_before == 3 and first.nodes_after == 2
    assert first.ops_before == {"Identity": 1, "Add": 1, "Relu": 1} and "Identity" not in first.ops_after
    assert first.checked and first.wall_s > 0 and first.stats == {"nodes_removed": 1}
    assert report.ops_after == {"Add": 1, "Relu": 1} and report.nodes_after == 2
    assert json.loads(json.dumps(report.to_dict()))["pipeline"] == "eliminate-identity,eliminate-dead-code"


def test_contract_violation_is_caught() -> None:
    with pytest.raises(PassContractError, match="'liar' reported modified=False but changed the graph"):
        PassManager([_Liar()]).run(_relu_model())


def test_requires_names_the_pass() -> None:
    with pytest.raises(PassContractError, match="needs-three-nodes.*exactly three nodes"):
        PassManager([_NeedsThreeNodes()]).run(passes.optimize(_relu_model(), "eliminate-identity"))


def test_checker_runs_after_each_pass_and_can_be_turned_off() -> None:
    with pytest.raises(PassFailedError, match="'breaker' produced an invalid graph"):
        PassManager([_Breaker()]).run(_relu_model())
    result = PassManager([_Breaker()], check=False).run(_relu_model())
    assert result.model.graph.node[-1].op_type == "NoSuchOp"


def test_numeric_instrument_catches_a_wrong_rewrite() -> None:
    with pytest.raises(VerificationError, match=r"after pass 'perturb' output 'y' differs.*rtol=0.0001"):
        PassManager([_Perturb()], verify=True).run(_relu_model())
    ok = PassManager("eliminate-identity", verify=True, rtol=1e-6, atol=1e-7).run(_relu_model())
    assert ok.report.verification is not None and ok.report.verification["ok"]
    assert ok.report.passes[0].max_abs_error == 0.0


def test_fixpoint_that_does_not_converge_raises() -> None:
    with pytest.raises(FixpointError, match="after 3 rounds"):
        PassManager([Fixpoint((_Toggle(),), max_rounds=3)]).run(_relu_model())


def test_fixpoint_rounds_are_recorded() -> None:
    report = PassManager("fixpoint(eliminate-identity,eliminate-dead-code)").run(_relu_model()).report
    # round 2 is skipped whole: eliminate-identity changed the graph and nothing changed it since
    # (passes are idempotent), eliminate-dead-code changed nothing on the graph as it stands
    assert [(r.name, r.round, r.modified) for r in report.passes] == [
        ("eliminate-identity", 1, True), ("eliminate-dead-code", 1, False),
    ]
    assert report.skipped == 2


def test_a_pass_runs_again_once_another_changed_the_graph() -> None:
    # Identity -> Add -> Relu, with a dead Neg: eliminate-dead-code changes the graph after
    # eliminate-identity ran, so round 2 runs eliminate-identity again; eliminate-dead-code, the
    # last to change it, is skipped
    model = _relu_model()
    model.graph.node.append(onnx.helper.make_node("Neg", ["x"], ["dead"]))
    report = PassManager("fixpoint(eliminate-identity,eliminate-dead-code)").run(model).report
    assert [(r.name, r.round, r.modified) for r in report.passes] == [
        ("eliminate-identity", 1, True), ("eliminate-dead-code", 1, True), ("eliminate-identity", 2, False),
    ]
    assert report.skipped == 1


@dataclass(frozen=True)
class _CountsReaders(Pass):
    """Claims to be blind to dead code, but renames a node after how many nodes read its input."""

    name = "counts-readers"
    blind_to_dead_code = True

    def call(self, graph: gs.Graph) -> PassResult:
        node = graph.nodes[0]
        name = f"read-by-{len(node.inputs[0].outputs)}"
        if node.name == name:
            return PassResult(graph, False)
        node.name = name
        return PassResult(graph, True)


def _with_dead_neg() -> onnx.ModelProto:
    made = _relu_model()
    made.graph.node.append(onnx.helper.make_node("Neg", ["x"], ["dead"]))
    return made


def test_dead_code_removal_does_not_rerun_the_passes_blind_to_it() -> None:
    # fold-constants and CSE decide from what nodes compute: after eliminate-dead-code removed the dead
    # Neg, round 2 reruns only eliminate-identity (which must: an Identity feeding a graph output can
    # go once nothing else reads its input)
    report = PassManager(
        "fixpoint(eliminate-identity,fold-constants,eliminate-common-subexpressions,eliminate-dead-code)",
        check_contracts=False,
    ).run(_with_dead_neg()).report
    assert [(r.name, r.round, r.modified) for r in report.passes] == [
        ("eliminate-identity", 1, True), ("fold-constants", 1, False), ("eliminate-common-subexpressions", 1, False),
        ("eliminate-dead-code", 1, True), ("eliminate-identity", 2, False),
    ]
    assert report.skipped == 3


def test_contract_mode_catches_a_pass_wrongly_declared_blind_to_dead_code() -> None:
    with pytest.raises(PassFailedError, match="'counts-readers' is declared blind_to_dead_code but changed"):
        PassManager([Fixpoint((_CountsReaders(), _dce()))], check_contracts=True).run(_with_dead_neg())
    # without contract checks the claim is trusted
    PassManager([Fixpoint((_CountsReaders(), _dce()))], check_contracts=False).run(_with_dead_neg())


def _dce() -> Pass:
    from passes.transforms.eliminate_dead_code import EliminateDeadCode

    return EliminateDeadCode()


def test_dump_ir_writes_every_intermediate_graph(tmp_path: Path) -> None:
    PassManager("eliminate-identity,eliminate-dead-code", dump_ir=tmp_path / "ir").run(_relu_model())
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00-input.onnx", "01-eliminate-identity.onnx", "02-eliminate-dead-code.onnx"]
    dumped = onnx.load(str(tmp_path / "ir" / "01-eliminate-identity.onnx"))
    assert [n.op_type for n in dumped.graph.node] == ["Add", "Relu"]


def test_a_crashing_pass_is_reported_by_name() -> None:
    @dataclass(frozen=True)
    class Crash(Pass):
        """Raises."""

        name = "crash"

        def call(self, graph: gs.Graph) -> PassResult:
            raise KeyError("boom")

    with pytest.raises(PassFailedError, match="pass 'crash' failed: KeyError"):
        PassManager([Crash()]).run(_relu_model())


def test_optimize_leaves_its_input_alone_and_keeps_metadata() -> None:
    original = _relu_model()
    helper.set_model_props(original, {"author": "test"})
    before = original.SerializeToString()
    optimized = passes.optimize(original, input_shapes={"x": [3, 4]})
    assert original.SerializeToString() == before
    assert [n.op_type for n in optimized.graph.node] == ["Add", "Relu"]
    assert {p.key: p.value for p in optimized.metadata_props} == {"author": "test"}
    dims = [d.dim_value for d in optimized.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 4]


def test_pass_call_on_a_model_returns_a_model() -> None:
    from passes.transforms.eliminate_identity import EliminateIdentity

    result = EliminateIdentity()(_relu_model())
    assert isinstance(result.model, onnx.ModelProto) and result.modified
    assert [n.op_type for n in result.model.graph.node] == ["Add", "Relu"]


def test_public_surface_is_lazy_and_small() -> None:
    assert set(passes.__all__) >= {"optimize", "PassManager", "Pass", "PassResult", "register_pass"}
    with pytest.raises(AttributeError):
        passes.no_such_name  # noqa: B018


def test_numeric_check_runs_models_over_the_protobuf_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 2 GB a model cannot be serialised to bytes: it goes to onnxruntime as a file with
    external data (simulated here by lowering the limit)."""
    import passes.numerics.hollow as hollow  # where ModelRunner's session source is made

    monkeypatch.setattr(hollow, "PROTOBUF_LIMIT", 64)
    result = PassManager("eliminate-identity", verify=True).run(_relu_model())
    assert result.report.verification is not None and result.report.verification["ok"]


def test_a_heavy_run_collects_garbage_once_memory_grew_by_heavy_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # the 16-byte weight is "heavy" past a 10-byte threshold; memory reads 6 bytes more each time: a
    # collection runs after every second modifying pass, not after each (70 ms each on a 600 MB model)
    from passes.infra import _memory, manager

    readings = iter(range(0, 10_000, 6))
    collections: list[int] = []
    monkeypatch.setattr(manager, "HEAVY_BYTES", 10)
    monkeypatch.setattr(_memory, "resident_bytes", lambda: next(readings))
    monkeypatch.setattr(manager.gc, "collect", lambda *a: collections.append(1) or 0)
    result = PassManager([_Toggle(), _Toggle(), _Toggle(), _Toggle()], check=False).run(_relu_model())
    assert [r.modified for r in result.report.passes] == [True] * 4
    assert len(collections) == 3  # after passes 2 and 4, and once after the run (it grew since its start)
    # memory that cannot be read: every modifying pass collects, and the run once more
    collections.clear()
    monkeypatch.setattr(_memory, "resident_bytes", lambda: None)
    PassManager([_Toggle(), _Toggle()], check=False).run(_relu_model())
    assert len(collections) == 3
