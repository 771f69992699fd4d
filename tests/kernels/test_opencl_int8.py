"""OpenCL W8A8 INT8 GEMM/GEMV (`passes.kernels.opencl_int8`) on PoCL, for Adreno and Mali targets.

Tolerance: none for the int32 kernels (integer arithmetic end to end: every output must equal
`A.astype(int32) @ B.astype(int32)`). The fused dequant epilogue is float32 and compared with numpy's
float32 evaluation of the same expression at rtol=1e-6, atol=1e-6 (the OpenCL compiler may contract the
multiply-add into an fma).
Each example compiles one OpenCL program on PoCL (~1 s), so the property tests cap their examples
(`max_examples=6` per target) to keep the file near 30 s; the soak profile is unaffected by design.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from passes.kernels import opencl_int8 as ocl
from passes.lowering.opencl_harness import run_int8_kernel
from passes.kernels._opencl_dot import ARM_BUILTIN, EXTERN, PRELUDE, QCOM_BUILTIN
from passes.targets import load_target

from passes.lowering.opencl_harness import unavailable_reason

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"no PoCL: {unavailable_reason()}"),
]

TARGETS = ["sd8gen2", "tensor-g3"]


@functools.cache
def _target(name: str):
    return load_target(name)


@functools.cache
def _kernel(name: str, m: int, k: int, n: int, tiles: ocl.OpenclTiles | None = None,
            epilogue: ocl.Epilogue | None = None) -> ocl.OpenclKernel:
    desc = _target(name)
    return ocl.build_opencl(m, k, n, tiles or ocl.tiles_from_target(desc, m), desc.tvm_target(), epilogue)


def _operands(seed: int, m: int, k: int, n: int, extremes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if extremes:  # every product is +-16384: the worst case for the int32 sums
        return (rng.choice(np.array([-128, 127], np.int8), (m, k)),
                rng.choice(np.array([-128, 127], np.int8), (k, n)))
    return (rng.integers(-128, 127, (m, k), endpoint=True).astype(np.int8),
            rng.integers(-128, 127, (k, n), endpoint=True).astype(np.int8))


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int32) @ b.astype(np.int32)


def test_pack_weights_layout() -> None:
    b = np.arange(-50, 55, dtype=np.int8).reshape(7, 15)
    packed = ocl.pack_weights(b, ocl.OpenclTiles(tile_k=8))
    assert packed.shape == (2, 15, 4)
    for q, n, d in np.ndindex(*packed.shape):
        assert packed[q, n, d] == (b[4 * q + d, n] if 4 * q + d < 7 else 0)


def test_tiles_follow_the_target_and_respect_mali_work_group_limit() -> None:
    mali = _target("tensor-g3")
    gemm, gemv = ocl.tiles_from_target(mali, 64), ocl.tiles_from_target(mali, 1)
    assert gemm == ocl.OpenclTiles(rows=2, cols=4, threads_m=8, threads_n=8, tile_k=16)
    assert gemv == ocl.OpenclTiles(rows=1, cols=4, threads_m=1, threads_n=64, tile_k=256)
    for m in (1, 16, 100):
        assert _kernel("tensor-g3", m, 32, 40).launch.threads_per_group <= 64
    with pytest.raises(ValueError, match="exceed the target's 64"):
        ocl.build_opencl(1, 8, 8, ocl.OpenclTiles(threads_n=128), mali.tvm_target())
    with pytest.raises(ValueError, match="tile_k a multiple of 4"):
        ocl.OpenclTiles(tile_k=6)


@pytest.mark.parametrize("name", TARGETS)
def test_source_has_vendor_dot_behind_ifdef_and_a_fallback(name: str) -> None:
    source = _kernel(name, 16, 64, 64).source
    head, _, body = source.partition(PRELUDE)
    assert head == "// Function: main_kernel\n"  # the hook's output follows TVM's section mark
    assert "#pragma OPENCL EXTENSION" not in body and PRELUDE not in body
    assert f"{EXTERN}(vload4(" in body and "__local" not in body  # char4 loads, no shared memory
    assert "int acc_ptr[" in body  # the accumulators are private (registers), not a global array
    lines = PRELUDE.splitlines()
    arm_if = lines.index("#if defined(cl_arm_integer_dot_product_accumulate_int8)")
    qcom_if = next(i for i, line in enumerate(lines) if line.startswith("#elif defined(cl_qcom_dot_product8)"))
    fallback = lines.index("#else")
    assert arm_if < next(i for i, line in enumerate(lines) if ARM_BUILTIN + "(" in line) < qcom_if
    assert qcom_if < next(i for i, line in enumerate(lines) if QCOM_BUILTIN + "(" in line) < fallback
    assert "(int)a.w * (int)b.w" in "\n".join(lines[fallback:])


def test_vendor_branches_compile_and_match_when_their_macros_are_defined() -> None:
    """PoCL has neither extension: define the macros and stand-in builtins (the documented semantics) to
    check each #ifdef branch's plumbing, including the unsigned-qcom correction, bit-exactly."""
    kernel = _kernel("sd8gen2", 3, 21, 9)
    a, b = _operands(7, 3, 21, 9, extremes=True)
    stand_ins = {
        ("#define cl_arm_integer_dot_product_accumulate_int8 1\n#define arm_dot_acc(a, b, c) "
        "((c) + (int)(a).x*(b).x + (int)(a).y*(b).y + (int)(a).z*(b).z + (int)(a).w*(b).w)\n"),
        ("#define cl_qcom_dot_product8 1\n#define PASSES_QCOM_DOT8_UNSIGNED 1\n"
        "#define qcom_dot8_acc(p, q, c) ((c) + (int)(as_uchar4(p).x*as_uchar4(q).x + as_uchar4(p).y*as_uchar4(q).y"
        " + as_uchar4(p).z*as_uchar4(q).z + as_uchar4(p).w*as_uchar4(q).w))\n"),
    }
    for defines in stand_ins:
        variant = dataclasses.replace(kernel, source=defines + kernel.source)
        np.testing.assert_array_equal(run_int8_kernel(variant, a, b), _reference(a, b))


@pytest.mark.parametrize("name", TARGETS)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 4096 // 8, 257), (16, 64, 64), (37, 100, 33)])
def test_int8_extremes_bit_exact(name: str, m: int, k: int, n: int) -> None:
    a, b = _operands(1, m, k, n, extremes=True)
    np.testing.assert_array_equal(run_int8_kernel(_kernel(name, m, k, n), a, b), _reference(a, b))


_sizes = st.integers(1, 80)


@pytest.mark.parametrize("name", TARGETS)
@settings(max_examples=6)
@given(m=st.sampled_from([1, 1, 16, 19]) | st.integers(2, 40), k=_sizes, n=_sizes, seed=st.integers(0, 2**16))
@example(m=1, k=1, n=1, seed=0)
@example(m=17, k=131, n=65, seed=1)
def test_gemm_and_gemv_bit_exact_over_shapes(name: str, m: int, k: int, n: int, seed: int) -> None:
    a, b = _operands(seed, m, k, n)
    np.testing.assert_array_equal(run_int8_kernel(_kernel(name, m, k, n), a, b), _reference(a, b))


@settings(max_examples=4)
@given(tiles=st.builds(ocl.OpenclTiles, rows=st.integers(1, 3), cols=st.integers(1, 3),
                       threads_m=st.integers(1, 4), threads_n=st.integers(1, 8),
                       tile_k=st.sampled_from([4, 8, 12, 32])),
       m=st.integers(1, 20), k=st.integers(1, 50), n=st.integers(1, 30))
def test_any_tiles_are_bit_exact(tiles: ocl.OpenclTiles, m: int, k: int, n: int) -> None:
    a, b = _operands(m * 1000 + k, m, k, n)
    np.testing.assert_array_equal(run_int8_kernel(_kernel("tensor-g3", m, k, n, tiles), a, b), _reference(a, b))


@pytest.mark.parametrize("name", TARGETS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_dequant_epilogue(name: str, bias: bool) -> None:
    m, k, n = 5, 70, 23
    a, b = _operands(3, m, k, n)
    rng = np.random.default_rng(4)
    a_scale = np.array([0.013], np.float32)
    w_scale = rng.uniform(1e-3, 2e-2, n).astype(np.float32)
    scales = (a_scale, w_scale, rng.standard_normal(n).astype(np.float32)) if bias else (a_scale, w_scale)
    got = run_int8_kernel(_kernel(name, m, k, n, epilogue=ocl.Epilogue(bias)), a, b, scales)
    want = _reference(a, b).astype(np.float32) * a_scale[0] * w_scale
    if bias:
        want = want + scales[2]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture
def restore_postproc():
    """Put back whatever OpenCL post-processing hook was registered before the test."""
    import tvm_ffi

    from passes.kernels import _opencl_dot

    saved = {name: tvm_ffi.get_global_func(name, allow_missing=True)
             for name in (_opencl_dot.POSTPROC_HOOK, _opencl_dot._OURS)}
    yield
    for name, function in saved.items():
        if function is not None:
            tvm_ffi.register_global_func(name, function, override=True)
        else:
            tvm_ffi.register_global_func(name, lambda code, target: code, override=True)


def _generated(m: int, k: int, n: int) -> str:
    """TVM's OpenCL codegen output for the kernel (through the post-processing hook, if any)."""
    from passes.lowering._tir import codegen, lower_kernels

    target = _target("tensor-g3").tvm_target()
    lowered = lower_kernels({"main": ocl.int8_matmul(m, k, n, ocl.OpenclTiles())}, target)
    return codegen(lowered.device_module, target)


def test_postproc_hook_is_idempotent_and_composes_with_an_earlier_one(restore_postproc) -> None:
    """TVM 0.27 calls `tvm_callback_opencl_postproc(code, target)` on each kernel's source: ours runs an
    earlier hook first, prepends the prelude once, and installing it again changes nothing."""
    import tvm_ffi

    from passes.kernels._opencl_dot import POSTPROC_HOOK, install_postproc

    seen: list[str] = []

    def earlier(code: str, target: object) -> str:
        seen.append(type(target).__name__)
        return "// earlier hook\n" + code

    tvm_ffi.register_global_func(POSTPROC_HOOK, earlier, override=True)
    install_postproc()
    hook = tvm_ffi.get_global_func(POSTPROC_HOOK)
    install_postproc()
    assert tvm_ffi.get_global_func(POSTPROC_HOOK).same_as(hook)
    source = _generated(2, 8, 4)
    assert seen == ["Target"]  # one kernel, one call, with the TVM target
    assert source.count(PRELUDE) == 1 and source.index(PRELUDE) < source.index("// earlier hook")
    assert hook("__kernel void f() {}", None) == "// earlier hook\n__kernel void f() {}"  # no dot: no prelude
    assert hook(PRELUDE + f"x = {EXTERN}(a, b, c);", None).count(PRELUDE) == 1


def test_without_the_hook_the_generated_source_lacks_the_prelude(restore_postproc) -> None:
    """The control: TVM alone emits the call and no definition (the prelude comes from the hook)."""
    import tvm_ffi

    from passes.kernels._opencl_dot import POSTPROC_HOOK

    tvm_ffi.register_global_func(POSTPROC_HOOK, lambda code, target: code, override=True)
    source = _generated(2, 8, 4)
    assert f"{EXTERN}(vload4(" in source and PRELUDE not in source


@pytest.mark.parametrize(("tile_k", "k", "fitted"), [(32, 176, 16), (128, 64, 64), (128, 4096, 128), (256, 37, 40),
                                                      (16, 12, 12), (8, 1, 4)])
def test_tile_k_is_fitted_so_activations_need_no_padding_beyond_a_multiple_of_4(tile_k: int, k: int,
                                                                                 fitted: int) -> None:
    tiles = ocl.fit_tile_k(ocl.OpenclTiles(tile_k=tile_k), k)
    assert tiles.tile_k == fitted and ocl.padded_k(k, tiles) == -(-k // 4) * 4


def test_reference_matmul_has_the_kernels_parameters_and_is_exact() -> None:
    """The host reference the harness checks a dispatched kernel against: same buffers, numpy's sums."""
    tiles = ocl.OpenclTiles(tile_k=8)
    reference, kernel = ocl.reference_matmul(3, 13, 5, tiles), ocl.int8_matmul(3, 13, 5, tiles)
    assert [tuple(map(int, p.shape)) for p in reference.params] == [(3, 16), (4, 5, 4), (3, 5)]
    assert [tuple(map(int, p.shape)) for p in kernel.params] == [(3, 16), (4, 5, 4), (3, 5)]
    a, b = _operands(5, 3, 13, 5, extremes=True)
    built = tvm.compile(tvm.IRModule({"main": reference}), tvm.target.Target("llvm"))
    out = tvm.runtime.tensor(np.zeros((3, 5), np.int32))
    built(tvm.runtime.tensor(ocl.pack_activations(a, tiles)), tvm.runtime.tensor(ocl.pack_weights(b, tiles)), out)
    np.testing.assert_array_equal(out.numpy(), _reference(a, b))
