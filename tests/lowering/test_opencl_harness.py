"""GPU kernels run on PoCL and match the host build: every kernel of the sample for an Adreno
(sd8gen2) and a Mali (tensor-g3) target, Metal schedules through the OpenCL code generator, int8
matmuls bit-exact; and the harness catches wrong kernels, stale sources and oversized work-groups."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto

from passes.lowering import LoweringError
from passes.lowering.opencl_harness import (
    FLOAT_ATOL,
    FLOAT_RTOL,
    check_kernels,
    unavailable_reason,
)
from tests.lowering import built_sample, lowered_sample, target

_UNAVAILABLE = unavailable_reason()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"OpenCL harness unavailable: {_UNAVAILABLE}")]


@pytest.mark.parametrize(("name", "limit"), [("sd8gen2", 256), ("tensor-g3", 64)])
def test_every_sample_kernel_runs_on_pocl_like_the_host_build(name: str, limit: int) -> None:
    """Artifact OpenCL C on PoCL vs the unscheduled PrimFunc on llvm: ints exact, float32 within
    rtol=1e-4 / atol=1e-4 (K-tiled and tree-reduced sums; observed max |diff| ~1e-5)."""
    built = built_sample(name)
    report = check_kernels(built)
    assert report.source == "artifact" and "Portable Computing Language" in report.device
    assert (report.rtol, report.atol) == (FLOAT_RTOL, FLOAT_ATOL) == (1e-4, 1e-4)
    assert report.passed, [(c.function, c.problem) for c in report.failures]
    assert {check.function for check in report.checks} == set(built.lowered.kernels)
    launched = {launch.kernel for check in report.checks for launch in check.launches}
    assert launched == set(built.kernel_sources())
    assert all(launch.threads_per_group <= limit for check in report.checks for launch in check.launches)
    by_name = {check.function: check for check in report.checks}
    assert by_name["fused_less_add_where"].exact  # int64 kernel: bit for bit
    assert [launch.arguments for launch in by_name["split"].launches] == [(1, 0), (2, 0), (3, 0)]
    assert all(check.max_abs_error < 1e-4 for check in report.checks)


def test_metal_schedules_run_through_the_opencl_code_generator() -> None:
    report = check_kernels(built_sample("a16"))
    assert report.source == "generated"
    assert report.passed, [(c.function, c.problem) for c in report.failures]
    assert {check.function for check in report.checks} == set(lowered_sample("a16").kernels)


@pytest.mark.parametrize("name", ["sd8gen2", "tensor-g3", "a16"])
@pytest.mark.parametrize("rows", [1, 16])
def test_int8_matmul_kernels_are_bit_exact(name: str, rows: int) -> None:
    from passes.lowering import build, lower
    from tests.lowering.test_int8 import matmul_integer_model

    made = matmul_integer_model(rows, 96, 40, TensorProto.UINT8, TensorProto.INT8, a_zero=128, b_zero=0)
    lowered = lower(made, target(name))
    assert lowered.int8_matmuls == 1
    report = check_kernels(build(lowered, target(name)))
    assert report.passed, [(c.function, c.problem) for c in report.failures]
    assert all(check.exact for check in report.checks)


def test_a_wrong_kernel_is_caught() -> None:
    built = built_sample("sd8gen2")
    source = built.device_source()
    wrong = source.replace("2.000000e+00f);", "3.000000e+00f);")  # power_kernel: x^2 -> x^3
    assert wrong != source
    report = check_kernels(built, source=wrong)
    assert report.source == "given"
    assert [check.function for check in report.failures] == ["power"]
    assert "values beyond rtol=0.0001, atol=0.0001" in report.failures[0].problem


def test_an_artifact_that_differs_from_the_lowered_tir_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from passes.lowering import BuiltModel

    built = built_sample("tensor-g3")
    original = BuiltModel.device_source
    monkeypatch.setattr(BuiltModel, "device_source", lambda self: original(self).replace("exp(", "exp((float)"))
    report = check_kernels(built)
    failing = {check.function: check.problem for check in report.failures}
    assert "softmax" in failing
    assert "differs from the one generated from the lowered TIR" in failing["softmax"]


def test_work_groups_beyond_the_target_limit_are_reported() -> None:
    import tvm

    lowered = lowered_sample("sd8gen2")
    smaller = tvm.target.Target({**{k: v for k, v in lowered.tvm_target.export().items() if k != "host"},
                                 "max_num_threads": 64, "max_threads_per_block": 64}, host=lowered.tvm_target.host)
    report = check_kernels(dataclasses.replace(lowered, tvm_target=smaller), functions=["softmax", "power"])
    assert report.source == "generated"
    assert {check.function: check.problem for check in report.failures} == {
        "softmax": "softmax_kernel: work-group of 256 threads exceeds the target's 64",
        "power": "power_kernel: work-group of 256 threads exceeds the target's 64",
    }


def test_harness_refuses_what_it_cannot_check() -> None:
    with pytest.raises(LoweringError, match="target 'host' has no GPU kernels to check"):
        check_kernels(built_sample("host"))
    with pytest.raises(LoweringError, match=r"no kernels named \['nope'\]"):
        check_kernels(built_sample("sd8gen2"), functions=["nope"])


def test_same_seed_same_report_and_random_inputs_cover_int8_range() -> None:
    from passes.lowering.opencl_harness import _random

    first = check_kernels(built_sample("tensor-g3"), functions=["matmul1"], seed=5)
    second = check_kernels(built_sample("tensor-g3"), functions=["matmul1"], seed=5)
    assert first.checks[0].max_abs_error == second.checks[0].max_abs_error
    values = _random(np.random.default_rng(0), (4096,), "int8")
    assert values.min() == -128 and values.max() == 127
