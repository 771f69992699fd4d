"""x86 INT8 GEMM (`passes.kernels.x86_int8`) over its three ISAs: bit-exact against numpy's int32 matmul.

Tolerance: none. The kernels are integer arithmetic end to end (VNNI u8 x s8 -> i32 dot products with
the +128 shift and its `128 * sum_k B` correction; AVX2 int16 x int16 pair sums), so every output must
equal `A.astype(int32) @ B.astype(int32)`.

Every ISA is compiled on any machine, for an LLVM CPU that has it (`CPUS`), and its assembly checked;
a kernel is executed only where this CPU has the ISA's feature, and skipped otherwise with a reason
naming the feature. Built modules are cached per (ISA, M, K, N, tiles).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from passes.kernels import x86_int8
from passes.kernels._gemm import GemmShape

pytestmark = pytest.mark.slow

#: family -> an LLVM CPU that has it (built on any x86 machine; run where this CPU has the feature too)
CPUS = {"x86-vnni": "znver4", "x86-avxvnni": "alderlake", "x86-avx2": "znver3"}
FAMILIES = list(CPUS)
#: the instruction each family's assembly must show (AT&T syntax, as LLVM prints it; a memory operand may come first)
INSTRUCTIONS = {"x86-vnni": r"\tvpdpbusd\t[^\n]*%zmm", "x86-avxvnni": r"\{vex\}\tvpdpbusd\t[^\n]*%ymm",
                "x86-avx2": r"\tvpmaddwd\t[^\n]*%ymm"}


def _isa(family: str) -> x86_int8.X86Isa:
    return x86_int8.isa_named(family)


def _tiles(family: str) -> list[x86_int8.X86Tiles]:
    lanes = _isa(family).lanes
    return [x86_int8.X86Tiles(1, lanes), x86_int8.X86Tiles(2, lanes, prologue_per_tile=True),
            x86_int8.X86Tiles(1, 4 * lanes), x86_int8.X86Tiles(3, 2 * lanes),
            x86_int8.X86Tiles(4, 2 * lanes, parallel_rows=True)]


def _executable(family: str) -> None:
    isa = _isa(family)
    if not x86_int8.has_feature(isa):
        pytest.skip(f"this CPU has no {isa.feature} to run {family} kernels on (built and checked, not executed)")


@functools.cache
def _kernel(family: str, m: int, k: int, n: int, tiles: x86_int8.X86Tiles) -> x86_int8.X86Gemm:
    return x86_int8.build_gemm(_isa(family), m, k, n, tiles, x86_int8.cpu_target(CPUS[family]))


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int32) @ b.astype(np.int32)


def _run(family: str, a: np.ndarray, b: np.ndarray, tiles: x86_int8.X86Tiles) -> np.ndarray:
    _executable(family)
    kernel = _kernel(family, a.shape[0], a.shape[1], b.shape[1], tiles)
    return kernel(a, x86_int8.pack_weights(_isa(family), b, tiles.cols))


@pytest.mark.parametrize("family", FAMILIES)
def test_pack_weights_layout_padding_and_correction(family: str) -> None:
    isa = _isa(family)
    b = np.arange(-60, 45, dtype=np.int8).reshape(7, 15)
    packed = x86_int8.pack_weights(isa, b, cols=2 * isa.lanes)
    padded_k = -(-7 // isa.depth) * isa.depth
    assert packed.data.shape == GemmShape(1, 7, 15, 1, 2 * isa.lanes, isa.lanes, isa.depth).packed_weight_shape
    assert packed.data.shape == (2, padded_k // isa.depth, isa.lanes, isa.depth)
    for n_block, k_block, lane, depth in np.ndindex(*packed.data.shape):
        k, n = isa.depth * k_block + depth, isa.lanes * n_block + lane
        assert packed.data[n_block, k_block, lane, depth] == (b[k, n] if k < 7 and n < 15 else 0)
    if not isa.shifted:
        assert packed.correction is None
        return
    expected = np.zeros(2 * isa.lanes, np.int32)
    expected[:15] = 128 * b.astype(np.int32).sum(axis=0)
    np.testing.assert_array_equal(packed.correction, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_assembly_has_the_exact_instruction_never_the_saturating_one(family: str) -> None:
    """Built for a CPU with the family's feature, on any machine: the dot product is the family's own
    instruction, and `vpmaddubsw` (int16 pair sums that saturate for u8 x s8) appears nowhere."""
    for m in (1, 4):
        asm = _kernel(family, m, 64, 64, x86_int8.default_tiles(_isa(family), m)).module.mod.inspect_source("asm")
        assert re.search(INSTRUCTIONS[family], asm)
        assert "vpmaddubsw" not in asm
        if family != "x86-vnni":
            assert "zmm" not in asm  # AVX2 / AVX-VNNI CPUs may have no AVX-512 at all


def test_best_isa_follows_cpu_features() -> None:
    assert x86_int8.best_isa(x86_int8.cpu_target("sapphirerapids")) is x86_int8.VNNI
    assert x86_int8.best_isa(x86_int8.cpu_target("znver4")) is x86_int8.VNNI
    assert x86_int8.best_isa(x86_int8.cpu_target("alderlake")) is x86_int8.AVX_VNNI
    assert x86_int8.best_isa(x86_int8.cpu_target("znver3")) is x86_int8.AVX2
    assert x86_int8.best_isa(x86_int8.cpu_target("haswell")) is x86_int8.AVX2
    assert x86_int8.best_isa(x86_int8.cpu_target("x86-64")) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_parallelises_vectorises_and_tensorizes(family: str) -> None:
    isa = _isa(family)
    tiles = x86_int8.X86Tiles(2, 2 * isa.lanes)
    script = x86_int8.schedule_gemm(isa, isa.gemm_func(isa.shape(5, 40, 48, tiles)), tiles).mod.script()
    assert "T.parallel" in script and "T.vectorized" in script
    assert isa.llvm_intrinsic in script


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("value_a, value_b", [(-128, -128), (127, -128), (-128, 127), (127, 127)])
def test_int8_extremes_accumulate_exactly(family: str, value_a: int, value_b: int) -> None:
    m, k, n = 3, 1031, 37  # 128 * 128 * 1031 = 16.9M: far from int32 overflow, far past int16
    a = np.full((m, k), value_a, np.int8)
    b = np.full((k, n), value_b, np.int8)
    tiles = x86_int8.X86Tiles(3, 2 * _isa(family).lanes)
    np.testing.assert_array_equal(_run(family, a, b, tiles), _reference(a, b))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m, k, n", [(1, 4, 16), (16, 256, 128), (128, 512, 256), (17, 1000, 70), (1, 1, 1)])
def test_default_tiles_bit_exact(family: str, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    np.testing.assert_array_equal(_run(family, a, b, x86_int8.default_tiles(_isa(family), m)), _reference(a, b))


@st.composite
def gemm_cases(draw: st.DrawFn) -> tuple[str, np.ndarray, np.ndarray, x86_int8.X86Tiles]:
    family = draw(st.sampled_from([f for f in FAMILIES if x86_int8.has_feature(_isa(f))] or FAMILIES))
    m = draw(st.sampled_from([1, 2, 3, 5, 7, 16, 17, 33]))
    k = draw(st.integers(1, 200))
    n = draw(st.integers(1, 150))
    tiles = draw(st.sampled_from(_tiles(family)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = np.array([-128, 127, -1, 0, 1], np.int8)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    if draw(st.booleans()):  # sprinkle the extremes
        a = np.where(rng.random(a.shape) < 0.3, rng.choice(values, a.shape), a).astype(np.int8)
        b = np.where(rng.random(b.shape) < 0.3, rng.choice(values, b.shape), b).astype(np.int8)
    return family, a, b, tiles


@given(gemm_cases())
@example(("x86-avx2", np.full((1, 1), -128, np.int8), np.full((1, 1), -128, np.int8), x86_int8.X86Tiles(1, 8)))
@example(("x86-avx2", np.full((17, 5), 127, np.int8), np.full((5, 65), -128, np.int8), x86_int8.X86Tiles(3, 16)))
@example(("x86-vnni", np.full((17, 5), 127, np.int8), np.full((5, 65), -128, np.int8), x86_int8.X86Tiles(3, 32)))
def test_property_bit_exact_over_shapes(case: tuple[str, np.ndarray, np.ndarray, x86_int8.X86Tiles]) -> None:
    family, a, b, tiles = case
    if not x86_int8.has_feature(_isa(family)):
        # an explicit example of a family this CPU cannot run (an AVX512-VNNI one on a Zen 3): built, not
        # run. Skipping here would skip the whole property test, the examples and draws it can run too.
        _kernel(family, a.shape[0], a.shape[1], b.shape[1], tiles)
        return
    np.testing.assert_array_equal(_run(family, a, b, tiles), _reference(a, b))


def test_refuses_weights_packed_for_another_tile_or_isa() -> None:
    kernel = _kernel("x86-avx2", 2, 8, 40, x86_int8.X86Tiles(2, 64))
    with pytest.raises(ValueError, match=r"pack for x86-avx2 with cols=64"):
        kernel(np.ones((2, 8), np.int8), x86_int8.pack_weights(x86_int8.AVX2, np.ones((8, 40), np.int8), cols=16))
    with pytest.raises(ValueError, match=r"pack for x86-avx2 with cols=64"):
        kernel(np.ones((2, 8), np.int8), x86_int8.pack_weights(x86_int8.AVX_VNNI, np.ones((8, 40), np.int8), cols=64))


def test_refuses_bad_tiles_dtypes_and_targets() -> None:
    with pytest.raises(ValueError, match="cols a multiple of 16"):
        x86_int8.X86Tiles(2, 24).check(x86_int8.VNNI)
    assert x86_int8.X86Tiles(2, 24).check(x86_int8.AVX2).cols == 24
    with pytest.raises(ValueError, match="2-D int8 array"):
        x86_int8.pack_weights(x86_int8.VNNI, np.ones((4, 4), np.int32), cols=16)
    with pytest.raises(ValueError, match="has no avx512vnni"):
        x86_int8.build_gemm(x86_int8.VNNI, 1, 4, 16, target=x86_int8.cpu_target("znver3"))
    with pytest.raises(ValueError, match="unknown x86 int8 family"):
        x86_int8.isa_named("x86-sse")
