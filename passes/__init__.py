"""`passes`: graph-rewriting compiler passes for transformer ONNX exports bound for phone GPUs.
The public surface (the api layer): names from core, infra, numerics and targets, imported lazily.

    import passes
    model = passes.optimize(onnx.load("graph.onnx"), "canonicalize", input_shapes={"input_ids": (1, 128)})

The public names below are imported lazily, so `import passes` stays fast and never imports TVM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from passes.core._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "passes.api",
    "run_pipeline": "passes.api",
    "Pass": "passes.infra._pass",
    "PassResult": "passes.infra._pass",
    "Refusal": "passes.infra._pass",
    "PassManager": "passes.infra.manager",
    "PipelineReport": "passes.infra.manager",
    "Instrument": "passes.infra.manager",
    "Pipeline": "passes.infra.pipeline",
    "Fixpoint": "passes.infra.pipeline",
    "parse_pipeline": "passes.infra.pipeline",
    "register_pass": "passes.infra.registry",
    "PassRegistry": "passes.infra.registry",
    "load_model": "passes.core.io",
    "save_model": "passes.core.io",
    "PassesError": "passes.core.errors",
    "load_target": "passes.targets",
    "list_targets": "passes.targets",
    "TargetDescription": "passes.targets",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from passes.infra._pass import Pass, PassResult, Refusal
    from passes.api import optimize, run_pipeline
    from passes.core.errors import PassesError
    from passes.core.io import load_model, save_model
    from passes.infra.manager import Instrument, PassManager, PipelineReport
    from passes.infra.pipeline import Fixpoint, Pipeline, parse_pipeline
    from passes.infra.registry import PassRegistry, register_pass
    from passes.targets import TargetDescription, list_targets, load_target


__getattr__, __dir__ = lazy_exports("passes", globals(), _EXPORTS)
