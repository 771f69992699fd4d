"""Kernel sources: per-kernel sections, file names, and the structural Metal checks (MSL has vectors of
2-4 lanes only, no double, at most 31 buffer arguments)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from passes.lowering._sources import (
    kernel_file_stem,
    metal_source_problems,
    split_kernel_sources,
)

GOOD_MSL = """// Function: add_kernel
#include <metal_stdlib>
using namespace metal;

kernel void add_kernel(  device float* a_ptr [[ buffer(0) ]],
  device half4* b_ptr [[ buffer(1) ]],
  uint blockIdx [[threadgroup_position_in_grid]]
) {
  int8_t lanes = 4;
  float4 v = float4(a_ptr[0]);
  a_ptr[blockIdx] = v.x + (float)lanes;
}

// Function: copy_kernel
#include <metal_stdlib>
using namespace metal;

kernel void copy_kernel(  device char4* x_ptr [[ buffer(0) ]]) {
}
"""


def test_split_kernel_sources_keeps_each_section_whole() -> None:
    sections = split_kernel_sources(GOOD_MSL)
    assert list(sections) == ["add_kernel", "copy_kernel"]
    assert sections["add_kernel"].startswith("// Function: add_kernel\n#include <metal_stdlib>")
    assert sections["add_kernel"].rstrip().endswith("}")
    assert "copy_kernel" not in sections["add_kernel"]
    assert split_kernel_sources("no sections here") == {}


def test_well_formed_msl_has_no_problems() -> None:
    assert metal_source_problems(GOOD_MSL, ["add_kernel", "copy_kernel"]) == []


@pytest.mark.parametrize(("edit", "problem"), [
    (("float4 v", "float8 v"), "add_kernel: vector types MSL lacks: float8"),
    (("device half4*", "device half8*"), "add_kernel: vector types MSL lacks: half8"),
    (("device char4*", "device char16*"), "copy_kernel: vector types MSL lacks: char16"),
    (("(float)lanes", "(double)lanes"), "add_kernel: types MSL lacks: double"),
    (("buffer(1)", "buffer(31)"), "add_kernel: buffer index 31 beyond Metal's 31 buffer arguments"),
    (("kernel void add_kernel(", "void add_kernel("), "add_kernel: no `kernel void add_kernel(` entry point"),
    (("#include <metal_stdlib>\nusing namespace metal;\n\nkernel void add", "kernel void add"),
     "add_kernel: does not include <metal_stdlib>"),
])
def test_msl_problems_are_named(edit: tuple[str, str], problem: str) -> None:
    assert metal_source_problems(GOOD_MSL.replace(*edit, 1), ["add_kernel", "copy_kernel"]) == [problem]


def test_missing_kernel_section_is_a_problem() -> None:
    assert metal_source_problems(GOOD_MSL, ["gone_kernel"]) == ["gone_kernel: no `// Function: gone_kernel` section"]


def test_kernel_file_stems_are_safe_and_bounded() -> None:
    assert kernel_file_stem("fused_matmul_add2_kernel") == "fused_matmul_add2_kernel"
    assert kernel_file_stem("odd/name kernel") == "odd_name_kernel"
    long = "fused_" + "reshape_transpose_" * 20 + "kernel"
    stem = kernel_file_stem(long)
    assert len(stem) == 120 and stem.startswith("fused_reshape") and stem != kernel_file_stem(long + "_1")


@pytest.mark.slow
def test_metal_sources_of_the_sample_are_structurally_valid() -> None:
    from tests.lowering import built_sample

    built = built_sample("a16")
    kernels = sorted(built.kernel_sources())
    assert kernels and built.kernel_suffix == "metal"
    assert metal_source_problems(built.device_source(), kernels) == []


def test_importing_passes_lowering_does_not_import_tvm() -> None:
    code = ("import sys, passes.lowering; from passes.lowering import LoweringError; "
            "assert 'tvm' not in sys.modules, 'tvm imported'; passes.lowering.lower; assert 'tvm' in sys.modules; "
            "assert sorted(passes.lowering.__all__) == sorted(passes.lowering._EXPORTS)")
    subprocess.run([sys.executable, "-c", code], check=True)
