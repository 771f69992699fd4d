"""The library entry points other converters call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from passes.infra.manager import PassManager, RunResult
from passes.infra.pipeline import Pipeline, PipelineElement


def optimize(
    model: onnx.ModelProto,
    pipeline: str | Pipeline | Sequence[PipelineElement] | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> onnx.ModelProto:
    """Rewrite `model` with `pipeline` (None: the target-independent `canonicalize` pipeline).

    `input_shapes` binds dynamic input dims (`{"input_ids": (1, 128)}`) and folds the shape
    computations that depended on them. The input model is not modified. The ONNX checker runs
    after every pass; use `PassManager` for reports, numeric checks and IR dumps.
    """
    return run_pipeline(model, pipeline, input_shapes=input_shapes).model


def run_pipeline(
    model: onnx.ModelProto,
    pipeline: str | Pipeline | Sequence[PipelineElement] | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> RunResult:
    """Like `optimize`, but also return the pipeline report."""
    return PassManager(pipeline, input_shapes=input_shapes).run(model)
