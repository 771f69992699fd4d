"""`passes run`'s host check: the host build run on seeded inputs and compared with the exact reference.

Integer outputs bit for bit; float outputs to float rounding, scaled by the output's magnitude; where
activations are quantized, by accuracy against fp32 next to the reference's (see `QUANTIZED_MARGIN_DB`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from passes.core.errors import VerificationError
from passes.numerics.verify import compare_outputs, random_feeds, run_model

HOST_RTOL, HOST_ATOL = 1e-4, 1e-4  # float32: TVM's fused kernels reassociate reductions (atol x max |output|)
#: A model that quantizes activations can flip an int8 code where the build's float rounding upstream
#: differs from the reference's by an ulp (a value on a rounding boundary, or a run-time scale one ulp
#: apart); the flip moves that output by a quantization step, and later layers can amplify it (the
#: sample at hidden 1024, W8A8 dynamic: one flipped code in the first layer, 4 % of the logits' range
#: at the end). Both are then equally good samples of the quantized model, so such a build is judged by
#: what users get: its SQNR against fp32 may fall at most this far below the reference's. A saturating
#: or wrong int8 kernel lands far below (the README sample: 22.7 dB against 37 dB on a Zen 3).
QUANTIZED_MARGIN_DB = 1.0
#: ops that quantize activations (so codes can flip on an ulp of upstream rounding)
ACTIVATION_QUANTIZERS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear"})


def run_host_check(built: Any, optimized: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], run_host: Any,
                float_model: onnx.ModelProto | None) -> dict[str, Any]:
    """Run the host build on seeded inputs and compare it with the exact reference (`run_model`): integer
    outputs bit for bit; float outputs to float rounding (`HOST_RTOL`, `HOST_ATOL` x the output's
    magnitude), or, where activations are quantized and codes may flip, by SQNR against `float_model`
    (the model before quantization; see `QUANTIZED_MARGIN_DB`). `VerificationError` when it fails."""
    feeds = random_feeds(optimized, 0, input_shapes=shapes)
    expected, got = run_model(optimized, feeds), run_host(built, feeds)
    comparison = compare_outputs(expected, got, rtol=HOST_RTOL, atol=HOST_ATOL, scale_atol=True)
    result: dict[str, Any] = {**comparison.to_dict(), "reference": "onnxruntime, integer ops exact (passes.numerics.exact)",
                              "criterion": "allclose"}
    if comparison.ok:
        return result
    if float_model is not None and any(node.op_type in ACTIVATION_QUANTIZERS for node in optimized.graph.node):
        return _quantized_check(result, comparison, expected, got, run_model(float_model, feeds))
    worst = max(comparison.outputs, key=lambda o: o.max_abs_error)
    raise VerificationError(
        f"the host build differs from the reference (onnxruntime, integer ops exact): output '{worst.name}' "
        f"max abs error {worst.max_abs_error:.3g} (rtol={HOST_RTOL:g}, atol={HOST_ATOL:g} x max |output|)")


def _quantized_check(result: dict[str, Any], comparison: Any, expected: Mapping[str, np.ndarray],
                     got: Mapping[str, np.ndarray], fp32: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from passes.numerics.accuracy import sqnr_db

    floats = [o.name for o in comparison.outputs if o.dtype.startswith("float")]
    ints_exact = all(o.ok for o in comparison.outputs if not o.dtype.startswith("float"))
    versus_fp32 = {name: {"reference_db": sqnr_db(fp32[name], expected[name]), "build_db": sqnr_db(fp32[name], got[name]),
                          "build_vs_reference_db": sqnr_db(expected[name], got[name])} for name in floats}
    result.update(criterion="sqnr against fp32", margin_db=QUANTIZED_MARGIN_DB, sqnr=versus_fp32)
    short = [name for name, v in versus_fp32.items() if v["build_db"] < v["reference_db"] - QUANTIZED_MARGIN_DB]
    if ints_exact and not short:
        result["ok"] = True
        return result
    if not ints_exact:
        wrong = next(o for o in comparison.outputs if not o.ok and not o.dtype.startswith("float"))
        raise VerificationError(f"the host build differs from the reference (onnxruntime, integer ops exact): "
                                f"integer output '{wrong.name}' is not bit-exact")
    name = short[0]
    raise VerificationError(
        f"the host build is less accurate than the quantized model: output '{name}' SQNR against fp32 "
        f"{versus_fp32[name]['build_db']:.1f} dB, the reference's {versus_fp32[name]['reference_db']:.1f} dB "
        f"(at most {QUANTIZED_MARGIN_DB:g} dB below is allowed)")


