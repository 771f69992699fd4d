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
    w8a16 = _w8a16_close(host)
    print(json.dumps({
        "w8a16_close": w8a16,
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


def _w8a16_close(host: object) -> bool:
    """The CPU W8A16 kernel (float vectors, int8 widened in registers) on AVX2: equal to float64 within
    float32 rounding (rtol=1e-5, atol=1e-5 x max |y|)."""
    import tvm

    from passes.kernels import cpu_w8a16

    m, k, n, panel = 3, 96, 128, 64
    func = cpu_w8a16.w8a16_matmul(m, k, n, panel).with_attr("global_symbol", "main")
    library = tvm.compile(tvm.IRModule({"main": func}), host.tvm_target())  # type: ignore[attr-defined]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    scale = (rng.random(n) * 0.02).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    library["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(cpu_w8a16.pack_weights(w, panel)),
                    tvm.runtime.tensor(scale), y)
    expected = cpu_w8a16.reference(x, w, scale)
    return bool(np.allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max())))


if __name__ == "__main__":
    main()
