"""The ONNX backend node suite (`onnx.backend.test.case.node`, ~1,900 one-op cases) through the default
pipeline: what `tests/node_suite` asserts and what a plug-in author can run on their own pipeline.

    from passes import optimize                    # or your own model -> model pipeline
    for case in node_cases():                      # the cases onnxruntime runs (others: skipped)
        outcome = check_case(case, optimize)       # "preserved", "refused: <reason>" or raises

A case is preserved when the rewritten model (shapes frozen at the case's inputs) still runs in
onnxruntime and its outputs equal the original's under onnxruntime (same feeds; NaN where NaN; float
outputs within `RTOL`/`ATOL` x max |output|, others exactly). A `PassesError` is a refusal with a reason;
any other exception is a crash, and so is a mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from passes.core.errors import PassesError

#: what `check_case` runs: `passes.optimize`'s signature (model, input_shapes=...) -> model
Pipeline = Callable[..., onnx.ModelProto]

#: the pipeline may fold constants with numpy, which rounds differently from onnxruntime's kernels.
RTOL, ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class NodeCase:
    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    expected: dict[str, object]  # onnxruntime's outputs on the original


class CaseMismatch(AssertionError):
    """The rewritten model runs, but its outputs differ from the original's."""


def node_cases() -> Iterator[NodeCase]:
    """Every node-suite case with data whose original model onnxruntime loads and runs."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators divide by zero on purpose
        cases = collect_testcases(None)
    for case in cases:
        if case.model is None or not case.data_sets:
            continue
        inputs, _ = case.data_sets[0]
        names = [v.name for v in case.model.graph.input]
        if len(inputs) != len(names):
            continue
        feeds = dict(zip(names, inputs))
        try:
            expected = _run(case.model, feeds)
        except Exception:  # noqa: BLE001 - onnxruntime lacks the op or the opset: not a case for us
            continue
        yield NodeCase(case.name, case.model, feeds, expected)


def _run(model: onnx.ModelProto, feeds: Mapping[str, object]) -> dict[str, object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def frozen_shapes(case: NodeCase) -> dict[str, tuple[int, ...]]:
    """The case's input shapes, for the tensor inputs (sequences and optionals stay as they are)."""
    return {name: tuple(int(d) for d in value.shape) for name, value in case.feeds.items()
            if isinstance(value, np.ndarray)}


def check_case(case: NodeCase, optimize: Pipeline) -> str:
    """'preserved', or 'refused: <reason>'; raises `CaseMismatch` when the outputs differ, and whatever
    the pipeline raised when it crashed. `optimize(model, input_shapes=...)` is the pipeline under test
    (this module sits below the API and does not pick it)."""
    logging.getLogger("passes").setLevel(logging.ERROR)
    try:
        optimized = optimize(case.model, input_shapes=frozen_shapes(case))
    except PassesError as err:
        return f"refused: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    try:
        got = _run(optimized, case.feeds)
    except Exception as err:  # noqa: BLE001
        raise CaseMismatch(f"{case.name}: the rewritten model no longer runs: {str(err).splitlines()[0]}") from err
    for name, want in case.expected.items():
        if name not in got:
            raise CaseMismatch(f"{case.name}: output '{name}' is gone")
        _compare(case.name, name, want, got[name])
    return "preserved"


def _compare(case: str, name: str, want: object, got: object) -> None:
    if isinstance(want, list) or isinstance(got, list):  # sequence outputs
        if not isinstance(want, list) or not isinstance(got, list) or len(want) != len(got):
            raise CaseMismatch(f"{case}: sequence output '{name}' differs in length")
        for i, (w, g) in enumerate(zip(want, got)):
            _compare(case, f"{name}[{i}]", w, g)
        return
    if want is None or got is None:
        if (want is None) != (got is None):
            raise CaseMismatch(f"{case}: optional output '{name}' is {'set' if got is not None else 'empty'}")
        return
    w, g = np.asarray(want), np.asarray(got)
    if w.shape != g.shape or w.dtype != g.dtype:
        raise CaseMismatch(f"{case}: output '{name}' is {g.dtype}{list(g.shape)}, expected {w.dtype}{list(w.shape)}")
    if w.dtype.kind == "f":
        nan = np.isnan(w)
        if not np.array_equal(nan, np.isnan(g)):
            raise CaseMismatch(f"{case}: output '{name}' has NaN elsewhere")
        finite = np.isfinite(w) & ~nan
        if not np.array_equal(w[~finite & ~nan], g[~finite & ~nan]):
            raise CaseMismatch(f"{case}: output '{name}' differs at an infinity")
        scale = float(np.abs(w[finite]).max(initial=0.0))
        if not np.allclose(g[finite], w[finite], rtol=RTOL, atol=ATOL * max(1.0, scale)):
            error = float(np.abs(g[finite].astype(np.float64) - w[finite]).max())
            raise CaseMismatch(f"{case}: output '{name}' max abs error {error:.3g}")
    elif not np.array_equal(w, g):
        raise CaseMismatch(f"{case}: output '{name}' differs")
