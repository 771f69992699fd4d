"""`passes.lowering`: optimized, shape-frozen ONNX -> Apache TVM (0.27) -> artifacts for one target.
May import core, numerics, infra, transforms, targets and `passes.kernels` (the same layer); never tuning or above.

    lowered = lower(model, target)              # Relax import, int8 rewrites, dlight schedules
    built = build(lowered, target)              # tvm.compile
    write_artifacts(built, Path("out/sd8gen2"))  # model.tar (+ model.so on the host), kernels/*.cl|*.metal
    outputs = run_host(built, {"input_ids": ids})   # host (x86 llvm) builds only

The only graph-side code that imports TVM; it does so lazily, when one of these names is first used
(`LoweringError` needs none). `passes.lowering.opencl_harness` runs the OpenCL kernels on PoCL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from passes.core._lazy import lazy_exports

_EXPORTS = {
    "LoweringError": "passes.lowering._errors",
    "lower": "passes.lowering._lower",
    "LoweredModel": "passes.lowering._lower",
    "build": "passes.lowering._build",
    "BuiltModel": "passes.lowering._build",
    "write_artifacts": "passes.lowering._build",
    "run_host": "passes.lowering._build",
    "TensorSpec": "passes.lowering._relax",
    "metal_source_problems": "passes.lowering._sources",
}

__all__ = ["BuiltModel", "LoweredModel", "LoweringError", "TensorSpec", "build", "lower", "metal_source_problems",
           "run_host", "write_artifacts"]

if TYPE_CHECKING:
    from passes.lowering._build import BuiltModel, build, run_host, write_artifacts
    from passes.lowering._errors import LoweringError
    from passes.lowering._lower import LoweredModel, lower
    from passes.lowering._relax import TensorSpec
    from passes.lowering._sources import metal_source_problems


__getattr__, __dir__ = lazy_exports("passes.lowering", globals(), _EXPORTS)
