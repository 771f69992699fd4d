"""int8 matmuls of a lowered model go to the OpenCL INT8 kernels (`passes.kernels.opencl_int8`) for
Adreno (sd8gen2) and Mali (dimensity9200) targets.

Structure: every MatMulInteger of the static-W8A8 sample becomes a call of an `opencl_int8_*` kernel
(`LoweredModel.dispatched`), and the built model's OpenCL source and the kernel files `write_artifacts`
writes carry the `passes_dot4_acc` prelude (through TVM's `tvm_callback_opencl_postproc` hook).
Numerics (tolerance: none for integers, the harness's rtol=atol=1e-4 for float32 kernels):
- the artifact's kernels run on PoCL through `opencl_harness` against their host references (for a
  dispatched kernel: `opencl_int8.reference_matmul`, numpy-equivalent int32 sums), bit-exact;
- the dispatch rewrite itself (uint8 shift, K padding, packing, +128 * colsum correction) is checked end
  to end by lowering single MatMulInteger models for the host with the OpenCL family's operands and
  its reference kernels (`OnHost`): outputs equal onnxruntime's bit for bit. (The sample is not run
  that way here: the host VM's start-up alone takes ~15 s for it; single matmuls cover the same paths.)
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from onnx import TensorProto

from passes.kernels._opencl_dot import EXTERN, PRELUDE
from passes.lowering.opencl_harness import unavailable_reason
from tests.lowering import target
from tests.lowering.test_dispatch import (
    assert_bit_exact_with_reference,
    lower_on_host_with,
    matmul_integer_model,
    quantized_sample,
)

pytestmark = pytest.mark.slow
needs_pocl = pytest.mark.skipif(unavailable_reason() is not None, reason=f"no PoCL: {unavailable_reason()}")

S8, U8 = TensorProto.INT8, TensorProto.UINT8
ADRENO, MALI = "sd8gen2", "dimensity9200"
#: the quantized sample's five int8 matmul shapes (M' = 16 tokens): 9 matmuls, 5 kernels
SAMPLE_KERNELS = ("opencl_int8_gemm_m16_k176_n64", "opencl_int8_gemm_m16_k64_n192", "opencl_int8_gemm_m16_k64_n256",
                  "opencl_int8_gemm_m16_k64_n352", "opencl_int8_gemm_m16_k64_n64")


@cache
def _built(name: str, made_key: str = "sample"):  # -> BuiltModel
    from passes.lowering import build, lower

    made = quantized_sample() if made_key == "sample" else _CASES[made_key]()
    return build(lower(made, target(name)), target(name))


def _matmul_integers(made) -> int:
    return sum(node.op_type == "MatMulInteger" for node in made.graph.node)


@pytest.mark.parametrize("name", [ADRENO, MALI])
def test_every_int8_matmul_of_the_sample_goes_to_an_opencl_kernel(name: str) -> None:
    from passes.lowering._dispatch import Dispatched

    built = _built(name)
    lowered = built.lowered
    assert lowered.int8_matmuls == _matmul_integers(quantized_sample()) == 9
    assert dict(lowered.dispatched) == {"opencl-int8": Dispatched(9, SAMPLE_KERNELS)}
    assert all(lowered.kernels[kernel].attrs["tirx.is_scheduled"] for kernel in SAMPLE_KERNELS)
    assert not any("tirx.is_scheduled" in (lowered.reference_kernels[k].attrs or {}) for k in SAMPLE_KERNELS)
    sections = built.kernel_sources()
    for kernel in SAMPLE_KERNELS:
        section = sections[f"{kernel}_kernel"]
        assert f"{EXTERN}(vload4(" in section and PRELUDE in section
    assert not any(PRELUDE in text for kernel, text in sections.items() if not kernel.startswith("opencl_int8_"))
    assert built.device_source().count(PRELUDE) == len(SAMPLE_KERNELS)


@needs_pocl
def test_written_kernel_files_carry_the_prelude_and_compile_alone(tmp_path) -> None:
    import pyopencl as cl

    from passes.lowering import write_artifacts
    from passes.lowering.opencl_harness import _pick_device

    written = write_artifacts(_built(ADRENO), tmp_path)
    files = sorted(name for name in written if name.startswith("kernels/opencl_int8_"))
    assert files == [f"kernels/{kernel}_kernel.cl" for kernel in SAMPLE_KERNELS]
    context = cl.Context([_pick_device(cl)])
    for name in files:
        text = written[name].read_text()
        assert text.startswith(f"// Function: {name[8:-3]}\n{PRELUDE}")
        cl.Program(context, text).build()  # raises with PoCL's log when it does not compile


@needs_pocl
def test_adreno_sample_kernels_all_run_on_pocl_like_the_host() -> None:
    """The whole artifact: every kernel (dispatched or dlight-scheduled) vs its host reference."""
    from passes.lowering.opencl_harness import check_kernels

    built = _built(ADRENO)
    report = check_kernels(built)
    assert report.source == "artifact" and report.passed, [(c.function, c.problem) for c in report.failures]
    assert {check.function for check in report.checks} == set(built.lowered.kernels)
    assert all(check.exact for check in report.checks if check.function in SAMPLE_KERNELS)


@needs_pocl
def test_mali_dispatched_kernels_run_on_pocl_bit_exact_within_64_threads() -> None:
    from passes.lowering.opencl_harness import check_kernels

    report = check_kernels(_built(MALI), functions=list(SAMPLE_KERNELS))
    assert report.source == "artifact" and report.passed, [(c.function, c.problem) for c in report.failures]
    assert all(check.exact for check in report.checks)
    assert all(launch.threads_per_group <= 64 for check in report.checks for launch in check.launches)


_CASES = {
    "gemv-pad-u8": lambda: matmul_integer_model((1, 1, 37), 20, U8, a_zero=131),  # M' = 1, K % 4 != 0
    "gemm-rank4-s8": lambda: matmul_integer_model((2, 3, 5, 24), 33, S8),  # M' = 30, signed, N odd
    "gemm-u8": lambda: matmul_integer_model((1, 7, 130), 9, U8, seed=3),  # K % 4 != 0, N < one work-group
}


@pytest.mark.parametrize(("case", "name", "kernel"), [
    ("gemv-pad-u8", ADRENO, "opencl_int8_gemv_m1_k37_n20"),
    ("gemm-rank4-s8", MALI, "opencl_int8_gemm_m30_k24_n33"),
    ("gemm-u8", ADRENO, "opencl_int8_gemm_m7_k130_n9"),
])
def test_odd_shapes_dispatch_exactly(case: str, name: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device kernel on PoCL equals its reference, and the rewrite around it equals onnxruntime."""
    from passes.lowering._dispatch import Dispatched
    from passes.lowering._dispatch_families import OpenclFamily
    from passes.lowering.opencl_harness import check_kernels

    made = _CASES[case]()
    assert dict(_built(name, case).lowered.dispatched) == {"opencl-int8": Dispatched(1, (kernel,))}
    if unavailable_reason() is None:
        report = check_kernels(_built(name, case), functions=[kernel])
        assert report.passed and report.checks[0].exact, [(c.function, c.problem) for c in report.failures]
    on_host = lower_on_host_with(OpenclFamily(target(name), None), made, monkeypatch)
    assert_bit_exact_with_reference(on_host, made, range(2))


@pytest.mark.parametrize(("w_type", "constant_weight"), [(U8, True), (S8, False)],
                         ids=["uint8-weight", "weight-is-an-input"])
def test_matmuls_the_kernel_cannot_take_stay_relax_matmuls(w_type: int, constant_weight: bool) -> None:
    from passes.lowering import lower

    made = matmul_integer_model((1, 8, 12), 20, S8, w_type=w_type, constant_weight=constant_weight)
    lowered = lower(made, target(ADRENO))
    assert lowered.int8_matmuls == 1 and dict(lowered.dispatched) == {}
    assert not any(name.startswith("opencl_int8_") for name in lowered.kernels)


def test_kernel_family_follows_backend_and_cpu_features() -> None:
    import tvm

    from passes.kernels import x86_int8
    from passes.lowering._dispatch_families import choose_family
    from passes.targets import list_targets

    families = {}
    for name in list_targets():
        described = target(name)
        family = choose_family(described, described.tvm_target())
        families[name] = None if family is None else family.name
    best = x86_int8.best_isa()  # x86-vnni on Zen 4, x86-avx2 on Zen 3
    host = best.family if best is not None else None
    assert families == {"a16": None, "host": host, "sd888:cpu": "arm-sdot"} | {
        name: "opencl-int8" for name in ("sd8gen2", "sd8gen3", "sd888", "dimensity9200", "tensor-g3")} | {
        name: "arm-smmla" for name in ("a16:cpu", "sd8gen2:cpu", "sd8gen3:cpu", "dimensity9200:cpu", "tensor-g3:cpu")}
    plain = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert choose_family(target("sd8gen2:cpu"), plain) is None  # aarch64 without dotprod or i8mm


def test_int32_correction_of_uint8_activations() -> None:
    """matmul(a_u8, W) = matmul(a_u8 - 128, W) + 128 * colsum(W), exactly, at the extremes."""
    from passes.lowering._plan import uint8_correction

    rng = np.random.default_rng(0)
    a = rng.choice(np.array([0, 255], np.uint8), (5, 300))
    w = rng.choice(np.array([-128, 127], np.int8), (300, 7))
    shifted = (a.astype(np.int32) - 128).astype(np.int8)
    got = shifted.astype(np.int32) @ w.astype(np.int32) + uint8_correction(w)
    np.testing.assert_array_equal(got, a.astype(np.int32) @ w.astype(np.int32))
    assert uint8_correction(w).dtype == np.int32
