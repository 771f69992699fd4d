"""Default CPU schedules (`passes.lowering._cpu_rules`): every kernel class of an llvm build is scheduled
from the target description's `schedule.float_gemm` (`float_gemv` for decode), stays exact (float32: K-tiling reassociates sums,
rtol 1e-4 / atol 1e-4 x max |C|, seeded inputs), and the ARM build uses NEON vector FMA."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lowering import built_sample, target

tvm = pytest.importorskip("tvm")

pytestmark = pytest.mark.slow


def _matmul(batch: int, m: int, k: int, n: int, transposed: bool):  # -> PrimFunc
    from tvm import te

    a = te.placeholder((batch, m, k), name="A")
    b = te.placeholder((batch, n, k) if transposed else (batch, k, n), name="B")
    r = te.reduce_axis((0, k), name="r")
    read = (lambda s, j, q: b[s, j, q]) if transposed else (lambda s, j, q: b[s, q, j])
    c = te.compute((batch, m, n), lambda s, i, j: te.sum(a[s, i, r] * read(s, j, r), axis=r), name="C")
    d = te.compute((batch, m, n), lambda s, i, j: c[s, i, j] * 0.5 + 1.0, name="D")
    return te.create_prim_func([a, b, d])


def _scheduled(func, rule_target: str = "host"):  # -> (Schedule, tvm target)
    from passes.lowering._schedule import cpu_rules

    described = target(rule_target)
    tvm_target = described.tvm_target()
    matmul, loops = cpu_rules(described)
    with tvm_target:
        sch = matmul.apply(func, tvm_target, False)
    return sch, tvm_target, loops


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 4, 7, 16, 33]), st.sampled_from([8, 24, 130]),
       st.sampled_from([16, 48, 70, 96]), st.booleans(), st.integers(0, 2**16))
def test_property_matmul_schedule_matches_numpy(batch: int, m: int, k: int, n: int, transposed: bool,
                                                seed: int) -> None:
    sch, tvm_target, _ = _scheduled(_matmul(batch, m, k, n, transposed))
    assert sch is not None
    script = sch.mod.script()
    assert "T.parallel" in script and "T.vectorized" in script
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    b = rng.standard_normal((batch, n, k) if transposed else (batch, k, n)).astype(np.float32)
    module = tvm.compile(sch.mod, target=tvm_target)
    out = tvm.runtime.tensor(np.zeros((batch, m, n), np.float32))
    module(tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    expected = (a @ (b.transpose(0, 2, 1) if transposed else b)) * 0.5 + 1.0
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_tiles_come_from_the_target_description() -> None:
    sch, _, _ = _scheduled(_matmul(1, 16, 1024, 5472, False))
    loops = [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("C_update"))]
    host = target("host").schedule.float_gemm
    # 5472 has no 64-column divisor that is whole vectors; 48 is: 3 vectors of vector_width, tile_m rows
    assert loops[-3:] == [host.tile_m, 48 // host.vector_width, host.vector_width]
    assert host.tile_k in loops  # 1024 steps of tile_k


def test_a_decode_matmul_takes_the_gemv_tiles() -> None:
    # one row (M = 1): 512-column panels streamed once, from schedule.float_gemv
    sch, _, _ = _scheduled(_matmul(1, 1, 1024, 4096, False))
    loops = [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("C_update"))]
    gemv = target("host").schedule.float_gemv
    assert gemv is not None and gemv.tile_n != target("host").schedule.float_gemm.tile_n
    assert loops[-2:] == [gemv.tile_n // gemv.vector_width, gemv.vector_width]
    assert loops[0] == 4096 // gemv.tile_n and gemv.tile_k in loops


def test_a_reduction_that_is_not_a_matmul_is_left_to_the_loop_rule() -> None:
    from tvm import te

    x = te.placeholder((8, 64), name="X")
    r = te.reduce_axis((0, 64), name="r")
    total = te.compute((8,), lambda i: te.sum(x[i, r], axis=r), name="S")
    func = te.create_prim_func([x, total])
    sch, tvm_target, loops = _scheduled(func)
    assert sch is None
    scheduled = loops.apply(func, tvm_target, False)
    assert "T.parallel" in scheduled.mod.script()


def test_arm_cpu_build_uses_neon_fma_without_sve() -> None:
    built = built_sample("sd8gen2:cpu")

    def walk(module):
        yield module
        for imported in module.imports:
            yield from walk(imported)

    asm = "".join(m.inspect_source("asm") for m in walk(built.executable.mod) if m.kind == "llvm")
    assert re.search(r"\tfmla\tv\d+\.4s", asm), "no NEON vector FMA in the fp32 kernels"
    assert not re.search(r"\bz\d+\.[sbhd]\b", asm), "SVE registers in a Snapdragon build (SVE is off there)"


def _loop_scheduled(func):  # -> scheduled PrimFunc (the loop rule, host target)
    _, tvm_target, loops = _scheduled(func)
    with tvm_target:
        return loops.apply(func, tvm_target, False).mod["main"], tvm_target


def _blocks(func) -> list[str]:
    return [name for name in re.findall(r'T\.sblock\("(\w+)"\)', func.script()) if name != "root"]


def _run(func, tvm_target, *arrays: np.ndarray, out_shape) -> np.ndarray:
    built = tvm.compile(tvm.IRModule({"main": func}), target=tvm_target)
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, np.float32))]
    built["main"](*args)
    return args[-1].numpy()


def test_an_elementwise_chain_is_computed_in_one_pass() -> None:
    # dequantize -> scale -> SiLU -> multiply, the shape of a fused MLP epilogue: every intermediate block is
    # inlined into the one that writes the output (no intermediate buffers); exact in float32 up to rounding
    from tvm import te, topi

    q = te.placeholder((32, 64), "int32", name="Q")
    scale = te.placeholder((64,), name="S")
    deq = te.compute((32, 64), lambda i, j: q[i, j].astype("float32") * scale[j], name="deq")
    silu = topi.multiply(deq, topi.sigmoid(deq))
    out = te.compute((32, 64), lambda i, j: silu[i, j] * 2.0, name="out")
    func, tvm_target = _loop_scheduled(te.create_prim_func([q, scale, out]))
    assert _blocks(func) == ["out"]
    rng = np.random.default_rng(0)
    qv, sv = rng.integers(-100, 100, (32, 64)).astype(np.int32), rng.uniform(0.01, 0.05, 64).astype(np.float32)
    d = qv * sv
    expected = 2 * d / (1 + np.exp(-d))
    np.testing.assert_allclose(_run(func, tvm_target, qv, sv, out_shape=(32, 64)), expected, rtol=1e-5, atol=1e-6)


def test_a_block_read_transposed_or_twice_stays_stored() -> None:
    # `scaled` is read transposed by the output: inlined, the chain would run on gathers, so it stays;
    # `e` feeds a sum and a division: inlined, it would be computed twice, so it stays too
    from tvm import te

    x = te.placeholder((16, 48), name="X")
    scaled = te.compute((16, 48), lambda i, j: x[i, j] * 3.0, name="scaled")
    transposed = te.compute((48, 16), lambda j, i: scaled[i, j] + 1.0, name="transposed")
    func, tvm_target = _loop_scheduled(te.create_prim_func([x, transposed]))
    assert _blocks(func) == ["scaled", "transposed"]
    xv = np.random.default_rng(1).standard_normal((16, 48)).astype(np.float32)
    np.testing.assert_allclose(_run(func, tvm_target, xv, out_shape=(48, 16)), (xv * 3 + 1).T, rtol=1e-6)

    r = te.reduce_axis((0, 48), name="r")
    e = te.compute((16, 48), lambda i, j: te.exp(x[i, j]), name="e")
    total = te.compute((16,), lambda i: te.sum(e[i, r], axis=r), name="total")
    ratio = te.compute((16, 48), lambda i, j: e[i, j] / total[i], name="ratio")
    func, _ = _loop_scheduled(te.create_prim_func([x, ratio]))
    assert "e" in _blocks(func) and "ratio" in _blocks(func)


def test_host_transcendentals_are_vectorisable_polynomials_within_float32_rounding() -> None:
    # exp, sigmoid, tanh, erf, softmax and GELU: the host build calls no libm function (one call per element
    # kept every vectorised loop scalar) and matches onnxruntime within rtol 1e-5, atol 1e-6 (the polynomial
    # forms are within ~3e-7 of float64; seeded inputs in [-8, 8])
    import onnx
    from onnx import TensorProto, helper

    from passes.lowering import build, lower, run_host
    from tests.lowering import run_reference

    ops = [("Exp", {}), ("Sigmoid", {}), ("Tanh", {}), ("Erf", {}), ("Softmax", {"axis": -1}),
           ("Gelu", {}), ("Gelu", {"approximate": "tanh"})]
    nodes = [helper.make_node(op, ["x"], [f"y{i}"], **attrs) for i, (op, attrs) in enumerate(ops)]
    graph = helper.make_graph(nodes, "fast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [8, 64]) for i in range(len(ops))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    built = build(lower(model, target("host")), target("host"))
    ir_text = "".join(m.inspect_source("ll") for m in [built.executable.mod, *built.executable.mod.imports]
                      if m.kind == "llvm")
    called = sorted(set(re.findall(r"call [^@]*@(llvm\.(?:exp|tanh|erf)[\w.]*|(?:exp|tanh|erf)f?)\(", ir_text)))
    assert not called, f"libm calls left in the host build: {called}"
    feeds = {"x": np.random.default_rng(2).uniform(-8, 8, (8, 64)).astype(np.float32)}
    ours, reference = run_host(built, feeds), run_reference(model, feeds)
    for i, (op, _) in enumerate(ops):
        np.testing.assert_allclose(ours[f"y{i}"], reference[f"y{i}"], rtol=1e-5, atol=1e-6, err_msg=op)


def test_constant_weights_of_prefill_matmuls_are_packed_at_lowering_and_read_in_place() -> None:
    # MatMul(x[1, 16, 64], W[64, 192]) + bias: the weight becomes P[192 / t, 64, t] (t = the schedule's column
    # tile), the kernel copies no panel at run time, and the result matches onnxruntime (rtol 1e-5, atol 1e-5
    # x max |y|: the same products, K-tiled)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from passes.lowering import build, lower, run_host
    from passes.lowering._cpu_rules import vector_tile
    from tests.lowering import run_reference

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 192)).astype(np.float32)
    bias = rng.standard_normal(192).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 192])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    host = target("host")
    lowered = lower(model, host)
    tiles = host.schedule.float_gemm
    panel = vector_tile(192, tiles.tile_n, tiles.vector_width)
    kernels = {name: func for name, func in lowered.kernels.items() if "matmul" in name}
    assert kernels, sorted(lowered.kernels)
    for name, func in kernels.items():
        assert f"T.Buffer((T.int64({192 // panel}), T.int64(64), T.int64({panel})), \"float32\")" in func.script(), name
        assert "_global" not in func.script(), f"{name} copies weight panels at run time"
    feeds = {"x": rng.standard_normal((1, 16, 64)).astype(np.float32)}
    ours = run_host(build(lowered, host), feeds)["y"]
    expected = run_reference(model, feeds)["y"]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_row_reductions_are_vectorised_along_the_row() -> None:
    # RMS-norm shape: the sum of squares over each 256-wide row is split into 16-lane partials (rfactor) that
    # accumulate in vectors, rows in parallel; equal to float64 numpy within rtol 1e-5 (lane-wise reassociation)
    from tvm import te

    x = te.placeholder((32, 256), name="X")
    r = te.reduce_axis((0, 256), name="r")
    total = te.compute((32,), lambda i: te.sum(x[i, r] * x[i, r], axis=r), name="S")
    y = te.compute((32, 256), lambda i, j: x[i, j] / te.sqrt(total[i] / 256.0 + 1e-6), name="Y")
    func, tvm_target = _loop_scheduled(te.create_prim_func([x, y]))
    script = func.script()
    assert "S_rf_update" in script and re.search(r"T\.vectorized\(16\):\s+with T\.sblock\(\"S_rf_update\"\)", script)
    assert "T.parallel(32)" in script
    xv = np.random.default_rng(4).standard_normal((32, 256)).astype(np.float32)
    expected = xv / np.sqrt((xv.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(_run(func, tvm_target, xv, out_shape=(32, 256)), expected, rtol=1e-5, atol=1e-6)
