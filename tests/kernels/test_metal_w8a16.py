"""Metal W8A16 GEMV/GEMM (`passes.kernels.metal_w8a16`): MSL structure, and numerics through PoCL.

The MSL cannot run here, so (as the design says) the same scheduled TIR, thread bindings included, is
compiled by TVM's OpenCL code generator and run on PoCL. PoCL has no cl_khr_fp16, so that run uses
float32 activations; the float16 variant is checked on the host llvm build of the unscheduled compute.

Tolerances: float32 kernels vs numpy `x @ (f32(w) * scale) + bias`: rtol=1e-5, atol=1e-5 * (1 + max|y|)
(the products are exact, only the summation order differs: K-split across lanes / K tiles). float16:
rtol=atol=2e-3 (the output is rounded to half, 2^-11 relative, once).
Shapes for the property tests come from a small pool (each shape is one TVM lowering plus one PoCL
compile, ~1 s, cached per module) with the data drawn per example.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from passes.kernels import metal_w8a16 as mw
from passes.lowering.opencl_harness import _PoclRunner, unavailable_reason
from passes.lowering._tir import KernelLaunch, codegen, lower_kernels
from passes.targets import load_target

pytestmark = pytest.mark.slow
needs_pocl = pytest.mark.skipif(unavailable_reason() is not None, reason=f"no PoCL: {unavailable_reason()}")

#: (M, K, N): decode with K/N not multiples of anything (K % 4 != 0 reads X one element at a time),
#: prefill with partial row/column tiles
GEMV_SHAPES = [(1, 256, 40), (1, 250, 37), (1, 7, 3), (1, 260, 5)]
GEMM_SHAPES = [(16, 64, 64), (33, 70, 37), (40, 250, 9), (2, 12, 4)]


@functools.cache
def _a16():
    return load_target("a16")


def _metal_target() -> tvm.target.Target:
    return _a16().tvm_target()


def _opencl_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "opencl", "max_num_threads": 256}, host={"kind": "llvm"})


def _tiles(m: int) -> mw.Tiles:
    return mw.tiles_from_target(_a16(), m)


@functools.cache
def _metal_source(m: int, k: int, n: int, dtype: str, bias: bool) -> tuple[str, tuple[KernelLaunch, ...]]:
    target = _metal_target()
    lowered = lower_kernels({"main": mw.w8a16_matmul(m, k, n, _tiles(m), dtype, bias)}, target)
    return codegen(lowered.device_module, target), lowered.launches["main"]


@functools.cache
def _pocl_kernel(m: int, k: int, n: int) -> tuple[_PoclRunner, tuple[KernelLaunch, ...]]:
    target = _opencl_target()
    lowered = lower_kernels({"main": mw.w8a16_matmul(m, k, n, _tiles(m), "float32", bias=True)}, target)
    return _PoclRunner(codegen(lowered.device_module, target)), lowered.launches["main"]


def _operands(seed: int, m: int, k: int, n: int, dtype: str = "float32"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.integers(-127, 127, (k, n), endpoint=True).astype(np.int8)
    scale = rng.uniform(1e-3, 2e-2, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return x, w, scale, bias


def _run_pocl(m: int, k: int, n: int, seed: int) -> None:
    runner, launches = _pocl_kernel(m, k, n)
    x, w, scale, bias = _operands(seed, m, k, n)
    got = runner.run(launches, [x, mw.pack_weights(w, _tiles(m)), scale, bias, np.zeros((m, n), np.float32)])[-1]
    expected = mw.reference(x, w, scale, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * (1 + np.abs(expected).max()))


def test_tiles_follow_the_a16_target() -> None:
    assert _tiles(1) == mw.GemvTiles(lanes=32, groups=4, cols=4, vector=4, unroll=1)
    assert _tiles(16) == mw.GemmTiles(rows=8, cols=1, threads_m=4, threads_n=32, tile_k=32, vector=4)
    assert _tiles(1).tile_k == 128 and _tiles(16).tile_m == 32 and _tiles(16).tile_n == 32
    with pytest.raises(ValueError, match="vector 1, 2 or 4"):
        mw.GemvTiles(vector=3)
    with pytest.raises(ValueError, match="multiples of 4"):
        mw.GemmTiles(cols=1, threads_n=2)


def test_pack_weights_layouts() -> None:
    w = np.arange(-60, 45, dtype=np.int8).reshape(7, 15)
    gemv, gemm = mw.pack_weights(w, mw.GemvTiles(groups=2, cols=2)), mw.pack_weights(w, mw.GemmTiles())
    assert gemv.shape == (16, 128) and gemm.shape == (32, 32)
    np.testing.assert_array_equal(gemv[:15, :7], w.T)
    np.testing.assert_array_equal(gemm[:7, :15], w)
    assert not gemv[15:].any() and not gemv[:, 7:].any() and not gemm[7:].any() and not gemm[:, 15:].any()
    with pytest.raises(ValueError, match="2-D int8"):
        mw.pack_weights(w.astype(np.int16), mw.GemmTiles())


def test_gemv_msl_reduces_in_simdgroups_and_dequantizes_char4_to_half4() -> None:
    source, launches = _metal_source(1, 4096, 64, "float16", False)
    assert "simd_shuffle_down(" in source and "threadgroup " not in source
    assert re.search(r"\(half4\)\*\(device char4\*\)\(W_ptr", source)  # 4 weights per load -> half4
    assert "*(device half4*)(X_ptr" in source
    assert "device char* W_ptr" in source and "device float* W_ptr" not in source
    assert all(launch.threads_per_group == 128 <= 256 for launch in launches)
    assert mw.packed_shape(4096, 64, _tiles(1)) == (64, 4096)


def test_gemm_msl_stages_dequantized_weights_in_threadgroup_memory() -> None:
    source, launches = _metal_source(64, 128, 96, "float16", True)
    assert "threadgroup half w_tile[" in source and "threadgroup half x_tile[" in source
    assert "threadgroup_barrier(mem_flags::mem_threadgroup)" in source
    assert re.search(r"= \(\(half4\)\*\(device char4\*\)\(W_ptr", source)
    assert "thread float acc[8]" in source  # float32 accumulators in registers
    assert "device char* W_ptr" in source and "bias_ptr" in source
    assert all(launch.threads_per_group == 128 <= 256 for launch in launches)


def test_msl_passes_the_structural_checks() -> None:
    from passes.lowering._sources import metal_source_problems

    for m, k, n in ((1, 250, 37), (40, 250, 9)):
        source, launches = _metal_source(m, k, n, "float16", False)
        assert metal_source_problems(source, [launch.kernel for launch in launches]) == []


@needs_pocl
@given(shape=st.sampled_from(GEMV_SHAPES), seed=st.integers(0, 2**16))
@example(shape=(1, 250, 37), seed=0)
def test_gemv_on_pocl_matches_numpy(shape: tuple[int, int, int], seed: int) -> None:
    _run_pocl(*shape, seed)


@needs_pocl
@given(shape=st.sampled_from(GEMM_SHAPES), seed=st.integers(0, 2**16))
@example(shape=(33, 70, 37), seed=0)
def test_gemm_on_pocl_matches_numpy(shape: tuple[int, int, int], seed: int) -> None:
    _run_pocl(*shape, seed)


@functools.cache
def _host_reference(m: int, k: int, n: int, dtype: str):
    func = mw.w8a16_compute(m, k, n, _tiles(m), dtype, bias=True)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm.target.Target("llvm"))


@given(shape=st.sampled_from([(1, 250, 37), (33, 70, 37)]), dtype=st.sampled_from(["float16", "float32"]),
       seed=st.integers(0, 2**16))
def test_unscheduled_compute_matches_numpy_in_half_and_float(shape: tuple[int, int, int], dtype: str,
                                                              seed: int) -> None:
    m, k, n = shape
    x, w, scale, bias = _operands(seed, m, k, n, dtype)
    out = tvm.runtime.tensor(np.zeros((m, n), dtype))
    _host_reference(m, k, n, dtype)["main"](*(tvm.runtime.tensor(a) for a in (x, mw.pack_weights(w, _tiles(m)),
                                                                            scale, bias)), out)
    expected = mw.reference(x, w, scale, bias)
    tolerance = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(out.numpy().astype(np.float32), expected.astype(np.float32),
                               rtol=tolerance, atol=tolerance * (1 + np.abs(expected.astype(np.float32)).max()))
