"""The generic property test: every registered pass, on generated graphs, must keep the graph
checker-valid and numerically equivalent, and be idempotent. A new pass is covered the day it is
registered; a pass that needs options to do anything still must be safe with its defaults."""

from __future__ import annotations

import onnx
import pytest
from hypothesis import given

from passes.registry import default_registry
from passes.testing import assert_pass_sound
from passes.testing.strategies import onnx_graphs, shape_chain_graphs

PASS_NAMES = default_registry().names()
# float32 rewrites may reassociate arithmetic (a folded constant, a fused op): stated tolerance.
RTOL, ATOL = 1e-5, 1e-6


def _check(name: str, original: onnx.ModelProto) -> None:
    assert_pass_sound(default_registry().get(name)(), original, rtol=RTOL, atol=ATOL)


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
