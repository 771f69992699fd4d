"""`passes`: graph-rewriting compiler passes for transformer ONNX exports bound for phone GPUs.

    import passes
    model = passes.optimize(onnx.load("graph.onnx"), "canonicalize", input_shapes={"input_ids": (1, 128)})

The public names below are imported lazily, so `import passes` stays fast and never imports TVM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "passes.api",
    "run_pipeline": "passes.api",
    "Pass": "passes._pass",
    "PassResult": "passes._pass",
    "Refusal": "passes._pass",
    "PassManager": "passes.manager",
    "PipelineReport": "passes.manager",
    "Instrument": "passes.manager",
    "Pipeline": "passes.pipeline",
    "Fixpoint": "passes.pipeline",
    "parse_pipeline": "passes.pipeline",
    "register_pass": "passes.registry",
    "PassRegistry": "passes.registry",
    "load_model": "passes.io",
    "save_model": "passes.io",
    "PassesError": "passes.errors",
    "load_target": "passes.targets",
    "list_targets": "passes.targets",
    "TargetDescription": "passes.targets",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from passes._pass import Pass, PassResult, Refusal
    from passes.api import optimize, run_pipeline
    from passes.errors import PassesError
    from passes.io import load_model, save_model
    from passes.manager import Instrument, PassManager, PipelineReport
    from passes.pipeline import Fixpoint, Pipeline, parse_pipeline
    from passes.registry import PassRegistry, register_pass
    from passes.targets import TargetDescription, list_targets, load_target


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'passes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
