"""The pass manager: runs a pipeline over one graph and reports what every pass did.

The model is converted to a graphsurgeon graph once, every pass rewrites it in place, and it is
exported once at the end. Instruments observe each pass: the ONNX checker (on by default), a numeric
comparison with the original model (onnxruntime, seeded inputs, stated tolerance), and IR dumps.
Timing, node counts and op histograms are always recorded. The run returns the optimized model and a
JSON-serialisable `PipelineReport`; the library prints nothing.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra import _memory
from passes.infra._dump import check_dump_folder  # noqa: F401 (part of the manager's surface)
from passes.infra._pass import Pass
from passes.core.errors import FixpointError, PassesError, PassFailedError, VerificationError
from passes.core.io import save_model
from passes.infra.pipeline import Fixpoint, Pipeline, PipelineElement, as_pipeline, with_input_shapes
from passes.numerics.verify import DEFAULT_ATOL, DEFAULT_RTOL, Comparison, compare_outputs, random_feeds, run_model

logger = logging.getLogger(__name__)

#: a graph whose constants pass this is collected after a modifying pass once the process grew by as much
HEAVY_BYTES = 256 * 2**20


@dataclass
class PassRecord:
    """One application of one pass."""

    index: int
    name: str
    spec: str
    round: int | None
    wall_s: float
    modified: bool
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)
    refusals: list[dict[str, str]] = field(default_factory=list)
    checked: bool = False
    max_abs_error: float | None = None


@dataclass
class PipelineReport:
    """What a pipeline run did, pass by pass; `to_dict()` is what `--json` prints."""

    pipeline: str
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    wall_s: float = 0.0
    passes: list[PassRecord] = field(default_factory=list)
    #: applications left out because the pass had already run on the graph as it stands (see `_Runner`)
    skipped: int = 0
    verification: dict[str, Any] | None = None
    #: Constant nodes the import turned into initializers, as the pipeline's fold-constants would have
    constants_lifted_at_import: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def time_by_pass(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for record in self.passes:
            totals[record.name] = totals.get(record.name, 0.0) + record.wall_s
        return totals


@dataclass
class RunResult:
    model: onnx.ModelProto
    report: PipelineReport
    #: with `PassManager.run(..., hollow=True)`: the values of the model's hollow initializers, by name
    weights: dict[str, Any] | None = None


class StepView:
    """The graph after a pass, with the exported model computed at most once for all instruments."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self._model: onnx.ModelProto | None = None

    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = ir.export_model(self.graph)
        return self._model


class Instrument:
    """Observes a pipeline run. Override any hook; raise a `PassesError` to stop the run."""

    def before_pipeline(self, original: onnx.ModelProto, report: PipelineReport) -> None:
        """Called once with the input model."""

    def before_pass(self, pass_: Pass, round_: int | None) -> None:
        """Called before every pass application (`round_` is the fixpoint round, None outside one)."""

    def after_pass(self, pass_: Pass, view: StepView, record: PassRecord) -> None:
        """Called after every pass application, with the graph as the pass left it."""

    def after_pipeline(self, model: onnx.ModelProto, report: PipelineReport) -> None:
        """Called once with the final model."""


class CheckerInstrument(Instrument):
    """Runs the ONNX checker after every pass that modified the graph (on its weightless skeleton,
    so the check costs the same for any model size and never meets protobuf's 2 GB limit)."""

    def after_pass(self, pass_: Pass, view: StepView, record: PassRecord) -> None:
        if not record.modified:
            return
        try:
            ir.check_graph(view.graph)
        except onnx.checker.ValidationError as err:
            first = str(err).strip().splitlines()[0]
            raise PassFailedError(f"pass {pass_.name!r} produced an invalid graph: {first}") from err
        record.checked = True


@dataclass
class NumericInstrument(Instrument):
    """Compares the running graph with the original on seeded inputs after every modifying pass."""

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    seed: int = 0
    input_shapes: Mapping[str, Sequence[int]] | None = None
    _feeds: dict[str, Any] = field(default_factory=dict, repr=False)
    _expected: dict[str, Any] = field(default_factory=dict, repr=False)
    _last: Comparison | None = field(default=None, repr=False)

    def before_pipeline(self, original: onnx.ModelProto, report: PipelineReport) -> None:
        self._feeds = random_feeds(original, self.seed, input_shapes=self.input_shapes)
        self._expected = run_model(original, self._feeds)

    def after_pass(self, pass_: Pass, view: StepView, record: PassRecord) -> None:
        if not record.modified:
            return
        comparison = compare_outputs(
            self._expected, run_model(view.model(), self._feeds), rtol=self.rtol, atol=self.atol, seed=self.seed
        )
        record.max_abs_error = comparison.max_abs_error
        self._last = comparison
        if not comparison.ok:
            worst = max(comparison.outputs, key=lambda o: (not o.ok, o.max_abs_error))
            detail = worst.problem or f"max abs error {worst.max_abs_error:.3g}"
            raise VerificationError(
                f"after pass {pass_.name!r} output '{worst.name}' differs from the original "
                f"({detail}; rtol={self.rtol:g}, atol={self.atol:g}, seed={self.seed})"
            )

    def after_pipeline(self, model: onnx.ModelProto, report: PipelineReport) -> None:
        if self._last is None:  # nothing modified: compare the final model once anyway
            self._last = compare_outputs(
                self._expected, run_model(model, self._feeds), rtol=self.rtol, atol=self.atol, seed=self.seed
            )
        report.verification = self._last.to_dict()


@dataclass
class DumpIRInstrument(Instrument):
    """Writes the original and every intermediate graph as `NN-<pass>.onnx` into `folder`."""

    folder: Path

    def before_pipeline(self, original: onnx.ModelProto, report: PipelineReport) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_model(original, self.folder / "00-input.onnx")

    def after_pass(self, pass_: Pass, view: StepView, record: PassRecord) -> None:
        save_model(view.model(), self.folder / f"{record.index:02d}-{pass_.name}.onnx")


@dataclass
class PassManager:
    """Runs `pipeline` with instruments. `input_shapes` binds dynamic input dims (freeze-shapes)."""

    pipeline: str | Pipeline | Sequence[PipelineElement] | None = None
    input_shapes: Mapping[str, Sequence[int]] | None = None
    check: bool = True
    verify: bool = False
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    seed: int = 0
    dump_ir: str | Path | None = None
    #: compare whole-graph fingerprints around every pass that reports no change (see `Pass.run_checked`);
    #: None: on when the environment sets PASSES_CHECK_CONTRACTS=1 (the test suite does), else the cheap
    #: node-identity check, as compilers keep their expensive checks for their own tests.
    check_contracts: bool | None = None
    instruments: Sequence[Instrument] = ()

    def resolved_pipeline(self) -> Pipeline:
        return with_input_shapes(as_pipeline(self.pipeline), self.input_shapes)

    def _instruments(self) -> list[Instrument]:
        chosen: list[Instrument] = []
        if self.check:
            chosen.append(CheckerInstrument())
        if self.verify:
            chosen.append(NumericInstrument(self.rtol, self.atol, self.seed, self.input_shapes))
        if self.dump_ir is not None:
            chosen.append(DumpIRInstrument(Path(self.dump_ir)))
        return chosen + list(self.instruments)

    def _full_contracts(self) -> bool:
        if self.check_contracts is not None:
            return self.check_contracts
        return ir.contracts_checked()

    def run(self, model: onnx.ModelProto, *, weights: Mapping[str, Any] | None = None,
            hollow: bool = False) -> RunResult:
        """Run the pipeline on `model` (left untouched) and return the new model and the report.

        `weights` gives the values of the model's hollow initializers by name (`ir.hollow_export`,
        `passes.numerics.verify.split_weights`): the graph uses those arrays, uncopied. With `hollow` the
        result is a hollow model too, and `RunResult.weights` its values: the graph's own arrays, so a
        large model's weights are never copied into protobuf messages."""
        # graphsurgeon graphs are dense with reference cycles (tensor <-> node); the cyclic collector rescans
        # them over and over while passes allocate, costing ~30 % on 7,000-node graphs (see `_Runner.heavy`)
        collecting = gc.isenabled()
        gc.disable()
        try:
            result, heavy = self._run(model, weights, hollow)
        finally:
            if collecting:
                gc.enable()
        if heavy:
            gc.collect()  # the run's graph held weights it loaded or made (in cycles), a heap's worth past HEAVY_BYTES
        return result

    def _run(self, model: onnx.ModelProto, weights: Mapping[str, Any] | None = None,
             hollow: bool = False) -> tuple[RunResult, bool]:
        """The run, and whether the graph's constants passed HEAVY_BYTES (the caller then collects the
        graph's cycles as soon as it is gone)."""
        pipeline = self.resolved_pipeline()
        instruments = self._instruments()
        start = time.perf_counter()
        lift = any(pass_.lifts_constant_nodes for pass_ in pipeline.passes())
        graph = ir.import_graph(model, weights=weights, lift_constants=lift)
        histogram = ir.op_histogram(graph)
        lifted = ir.lifted_count(graph)  # the input's nodes, as the report tells them, include those lifted
        report = PipelineReport(pipeline.spec(), len(graph.nodes) + lifted, len(graph.nodes),
                                {**histogram, "Constant": histogram.get("Constant", 0) + lifted} if lifted else histogram,
                                histogram, constants_lifted_at_import=lifted)
        for instrument in instruments:
            instrument.before_pipeline(model, report)
        heavy = ir.weights_past(model, graph, HEAVY_BYTES)
        start_resident = _memory.resident_bytes() if heavy else None
        _Runner(graph, report, instruments, self._full_contracts(), ops=histogram, heavy=heavy,
                resident=start_resident).run_elements(pipeline.elements, None)
        grown = heavy and _memory.grew(start_resident, HEAVY_BYTES)  # before the export, whose model is no garbage
        values = None
        if hollow:
            result, values = ir.hollow_export(graph)
        else:
            result = ir.export_model(graph)
        report.nodes_after = len(graph.nodes)
        report.ops_after = ir.op_histogram(graph)
        for instrument in instruments:
            instrument.after_pipeline(result, report)
        report.wall_s = time.perf_counter() - start
        return RunResult(result, report, values), grown


@dataclass
class _Runner:
    graph: gs.Graph
    report: PipelineReport
    instruments: list[Instrument]
    check_contracts: bool
    #: the graph's fingerprint and op histogram, carried across passes that change nothing
    fingerprint: int | None = None
    ops: dict[str, int] | None = None
    #: how many applications changed the graph (all; those that did more than remove dead nodes), and per
    #: pass instance (by id) both counts after its last application and whether that changed the graph
    version: int = 0
    live_version: int = 0
    last_run: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    #: weights past HEAVY_BYTES: collect the cycles a modifying pass leaves (gc is off during runs), each
    #: time the resident memory grew by HEAVY_BYTES since `resident` (None where it cannot be read: always)
    heavy: bool = False
    resident: int | None = None

    def run_elements(self, elements: Sequence[PipelineElement], round_: int | None) -> bool:
        modified = False
        for element in elements:
            if isinstance(element, Fixpoint):
                modified |= self.run_fixpoint(element)
            else:
                modified |= self.run_pass(element, round_)
        return modified

    def run_fixpoint(self, group: Fixpoint) -> bool:
        any_change = False
        for round_ in range(1, group.max_rounds + 1):
            if not self.run_elements(group.elements, round_):
                return any_change
            any_change = True
        raise FixpointError(
            f"fixpoint group {group.spec()} still modified the graph after {group.max_rounds} rounds; "
            "two of its passes probably undo each other"
        )

    def settled(self, pass_: Pass, *, dead_code_blind: bool = True) -> bool:
        """The pass already ran on the graph as it stands, and running it again would change nothing:
        its last run changed nothing (passes are deterministic), or it changed the graph and nothing
        ran since (passes are idempotent: `Pass.idempotent`, held by tests/infra/test_every_pass.py);
        for a pass `blind_to_dead_code`, dead-code removal since does not count. This ends a fixpoint
        round early and spares most of a fixpoint's last, all-quiet round."""
        last = self.last_run.get(id(pass_))
        if last is None or (last[2] and not pass_.idempotent):
            return False
        if dead_code_blind and pass_.blind_to_dead_code:
            return last[1] == self.live_version
        return last[0] == self.version

    def run_pass(self, pass_: Pass, round_: int | None) -> bool:
        if self.settled(pass_):
            if self.check_contracts and not self.settled(pass_, dead_code_blind=False):
                self._check_blind_to_dead_code(pass_)
            self.report.skipped += 1
            return False
        for instrument in self.instruments:
            instrument.before_pass(pass_, round_)
        nodes_before = len(self.graph.nodes)
        ops_before = self.ops if self.ops is not None else ir.op_histogram(self.graph)
        start = time.perf_counter()
        try:
            result, self.fingerprint = pass_.run_checked(
                self.graph, check_contract=self.check_contracts, fingerprint=self.fingerprint
            )
        except PassesError:
            raise
        except Exception as err:
            raise PassFailedError(f"pass {pass_.name!r} failed: {type(err).__name__}: {err}") from err
        wall = time.perf_counter() - start
        record = PassRecord(
            index=len(self.report.passes) + 1,
            name=pass_.name,
            spec=pass_.spec(),
            round=round_,
            wall_s=wall,
            modified=result.modified,
            nodes_before=nodes_before,
            nodes_after=len(self.graph.nodes),
            ops_before=ops_before,
            ops_after=ir.op_histogram(self.graph) if result.modified else ops_before,
            stats=dict(result.stats),
            refusals=[r.to_dict() for r in result.refusals],
        )
        self.report.passes.append(record)
        if result.modified and self.heavy and _memory.grew(self.resident, HEAVY_BYTES):
            gc.collect()  # replaced weights sit in node <-> tensor cycles; each collection ~70 ms on 600 MB
            self.resident = _memory.resident_bytes()
        self.ops = record.ops_after
        self.version += result.modified
        self.live_version += result.modified and not pass_.only_removes_dead_nodes
        self.last_run[id(pass_)] = (self.version, self.live_version, result.modified)
        view = StepView(self.graph)
        for instrument in self.instruments:
            instrument.after_pass(pass_, view, record)
        return result.modified

    def _check_blind_to_dead_code(self, pass_: Pass) -> None:
        """Contract mode: run a pass skipped as `blind_to_dead_code` anyway; it must change nothing."""
        result, self.fingerprint = pass_.run_checked(self.graph, check_contract=True, fingerprint=self.fingerprint)
        if result.modified:
            raise PassFailedError(f"pass {pass_.name!r} is declared blind_to_dead_code but changed the graph "
                                  "after dead-code removal")
