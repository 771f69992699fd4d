"""Run under an emulated Zen 3 by `tests/emulated/test_zen3.py`; prints one JSON line of findings.

What it checks there: the CPU LLVM detects, the x86 int8 family the host build gets, onnxruntime's own
u8 x s8 MatMulInteger on products that saturate int16 pair sums, the exact reference on the same model,
and a quantized MatMul lowered and built for `host` and run, against the exact reference.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(m: int, k: int, n: int, weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "zen3",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, m, n])], [numpy_helper.from_array(weight, "w")])
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    made.ir_version = 8
    return made


def main() -> None:
    import onnxruntime as ort

    from passes.kernels import x86_int8
    from passes.lowering import build, lower, run_host
    from passes.targets import load_target
    from passes.numerics.verify import run_model

    m, k, n = 8, 512, 64
    saturating = _model(m, k, n, np.full((k, n), -128, np.int8))
    a = np.full((1, m, k), 255, np.uint8)
    raw = ort.InferenceSession(saturating.SerializeToString()).run(None, {"a": a})[0]
    host = load_target("host")
    rng = np.random.default_rng(0)
    random = _model(m, k, n, rng.integers(-128, 128, (k, n), dtype=np.int8))
    feeds = {"a": rng.integers(0, 256, (1, m, k), dtype=np.uint8)}
    feeds["a"][0, 0, :] = 255
    lowered = lower(random, host)
    built = run_host(build(lowered, host), feeds)["y"]
    best = x86_int8.best_isa()
    print(json.dumps({
        "mcpu": str(host.tvm_target().attrs["mcpu"]),
        "family": best.family if best else None,
        "dispatched": sorted(lowered.dispatched),
        "true": int(255 * -128 * k),
        "onnxruntime": int(raw[0, 0, 0]),
        "reference": int(run_model(saturating, {"a": a})["y"][0, 0, 0]),
        "build_exact": bool(np.array_equal(built, run_model(random, feeds)["y"])),
        "build_numpy": bool(np.array_equal(built[0], feeds["a"][0].astype(np.int64)
                                           @ numpy_helper.to_array(random.graph.initializer[0]).astype(np.int64))),
    }))


if __name__ == "__main__":
    main()
