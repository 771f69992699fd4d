"""`passes`: graph-rewriting compiler passes for transformer ONNX exports bound for phone GPUs.

    import passes
    model = passes.optimize(onnx.load("graph.onnx"), "canonicalize", input_shapes={"input_ids": (1, 128)})

The public names below are imported lazily, so `import passes` stays fast and never imports TVM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from passes._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports("passes", globals(), _EXPORTS)
