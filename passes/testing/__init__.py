"""`passes.testing`: test helpers for pass authors: numeric equivalence, seeded feeds, graph strategies.
May import core, numerics and infra (the public testing surface); never TVM.

    from passes.testing import assert_equivalent, random_feeds
    assert_equivalent(original, rewritten, rtol=1e-5, atol=1e-6)

`passes.testing.strategies` holds hypothesis strategies that generate small valid graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from passes.infra._pass import Pass, PassResult
from passes.numerics.verify import Comparison, compare_models, random_feeds, run_model

__all__ = ["assert_equivalent", "assert_pass_sound", "random_feeds", "run_model", "EquivalenceError"]


class EquivalenceError(AssertionError):
    """Two models gave different outputs on the same inputs."""


def assert_equivalent(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    rtol: float,
    atol: float,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Comparison:
    """Run `a` and `b` on the same inputs (given, or seeded random) and raise unless every output
    of `a` matches `b`'s in shape, dtype and value within `rtol`/`atol` (integers: exactly).

    onnxruntime runs both (its graph optimisations off); ops it lacks fall back to onnx.reference.
    Returns the comparison for further assertions.
    """
    comparison = compare_models(a, b, feeds=feeds, input_shapes=input_shapes, seed=seed, rtol=rtol, atol=atol)
    if not comparison.ok:
        lines = [
            f"  {o.name}: {o.problem or f'max abs error {o.max_abs_error:.3g}, max rel error {o.max_rel_error:.3g}'}"
            for o in comparison.outputs
            if not o.ok
        ]
        raise EquivalenceError(f"models differ (rtol={rtol:g}, atol={atol:g}, seed={seed}):\n" + "\n".join(lines))
    return comparison


def assert_pass_sound(
    pass_: Pass,
    model: onnx.ModelProto,
    *,
    rtol: float,
    atol: float,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> PassResult:
    """The three properties every pass owes on every graph: the result passes the full ONNX checker,
    computes the same outputs (within `rtol`/`atol`), and a second run reports `modified=False` (unless
    the pass declares `idempotent = False`). Returns the first run's result for further assertions."""
    once = pass_(model)
    assert isinstance(once.model, onnx.ModelProto)
    onnx.checker.check_model(once.model, full_check=True)
    assert_equivalent(model, once.model, rtol=rtol, atol=atol, input_shapes=input_shapes)
    if pass_.idempotent:
        again = pass_(once.model)
        assert not again.modified, f"{pass_.name} is not idempotent: the second run reported {again.stats}"
    return once
