"""The generic property test: every registered pass, on generated graphs, must keep the graph
checker-valid and numerically equivalent, and be idempotent. A new pass is covered the day it is
registered; a pass that needs options to do anything still must be safe with its defaults."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, reject

from passes.core.errors import VerificationError
from passes.infra.registry import default_registry
from passes.testing import assert_pass_sound
from passes.testing.strategies import onnx_graphs, shape_chain_graphs
from passes.numerics.verify import random_feeds, run_model

PASS_NAMES = default_registry().names()
# float32 rewrites may reassociate arithmetic (a folded constant, a fused op): stated tolerance.
RTOL, ATOL = 1e-5, 1e-6


def _check(name: str, original: onnx.ModelProto) -> None:
    try:  # the oracle must run the input: onnxruntime without its optimisations fails on some drawn graphs
        run_model(original, random_feeds(original, 0))  # (Range over a Size, a buffer reused at a wrong size)
    except VerificationError:
        reject()
    pass_ = default_registry().get(name)()
    if pass_.exact:
        assert_pass_sound(pass_, original, rtol=RTOL, atol=ATOL)
        return
    # a lossy pass (quantization, fp16) owes validity, idempotence, and finite outputs of the same
    # names, shapes and types; its own tests state its accuracy bound
    once = pass_(original)
    onnx.checker.check_model(once.model, full_check=True)
    assert not pass_.idempotent or not pass_(once.model).modified, f"{name} is not idempotent"
    feeds = random_feeds(original, 0)
    expected, got = run_model(original, feeds), run_model(once.model, feeds)
    for key, value in expected.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert np.isfinite(got[key]).all() or not np.isfinite(value).all(), key


def test_every_builtin_is_covered() -> None:
    assert {"eliminate-dead-code", "eliminate-identity", "eliminate-common-subexpressions",
            "fold-constants", "freeze-shapes"} <= set(PASS_NAMES)


@pytest.mark.parametrize("name", PASS_NAMES)
@given(original=onnx_graphs())
def test_every_pass_on_random_graphs(name: str, original: onnx.ModelProto) -> None:
    _check(name, original)


@pytest.mark.parametrize("name", PASS_NAMES)
@given(original=shape_chain_graphs())
def test_every_pass_on_shape_chains(name: str, original: onnx.ModelProto) -> None:
    _check(name, original)
