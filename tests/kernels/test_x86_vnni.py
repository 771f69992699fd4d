"""x86 VNNI INT8 GEMM (`passes.kernels.x86_vnni`): bit-exact against numpy's int32 matmul.

Tolerance: none. The kernel is integer arithmetic end to end (u8 x s8 -> i32 dot products, the +128 shift
and its `128 * sum_k B` correction), so every output must equal `A.astype(int32) @ B.astype(int32)`.
Built modules are cached per (M, K, N, tiles); the file builds a few dozen small kernels.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from passes.kernels import x86_vnni
from passes.kernels._gemm import GemmShape

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not x86_vnni.has_vnni(), reason="host CPU has no avx512vnni"),
]

TILES = [
    x86_vnni.VnniTiles(1, 16),
    x86_vnni.VnniTiles(2, 16, shift_per_tile=True),
    x86_vnni.VnniTiles(1, 64),
    x86_vnni.VnniTiles(3, 32),
    x86_vnni.VnniTiles(4, 64),
]


@functools.cache
def _kernel(m: int, k: int, n: int, tiles: x86_vnni.VnniTiles) -> x86_vnni.VnniGemm:
    return x86_vnni.build_gemm(m, k, n, tiles)


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int32) @ b.astype(np.int32)


def _run(a: np.ndarray, b: np.ndarray, tiles: x86_vnni.VnniTiles) -> np.ndarray:
    kernel = _kernel(a.shape[0], a.shape[1], b.shape[1], tiles)
    return kernel(a, x86_vnni.pack_weights(b, tiles.cols))


def test_pack_weights_layout_padding_and_correction() -> None:
    b = np.arange(-60, 45, dtype=np.int8).reshape(7, 15)
    packed = x86_vnni.pack_weights(b, cols=32)
    assert (
        packed.data.shape
        == GemmShape(1, 7, 15, 1, 32).packed_weight_shape
        == (2, 2, 16, 4)
    )
    for n_block, k_block, lane, depth in np.ndindex(*packed.data.shape):
        k, n = 4 * k_block + depth, 16 * n_block + lane
        assert packed.data[n_block, k_block, lane, depth] == (
            b[k, n] if k < 7 and n < 15 else 0
        )
    expected = np.zeros(32, np.int32)
    expected[:15] = 128 * b.astype(np.int32).sum(axis=0)
    np.testing.assert_array_equal(packed.correction, expected)


def test_kernel_uses_vpdpbusd_not_the_saturating_path() -> None:
    kernel = _kernel(4, 64, 64, x86_vnni.VnniTiles(4, 64))
    asm = kernel.module.mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "zmm" in asm
    assert "vpmaddubsw" not in asm  # TVM's avx512 intrinsic: saturates int16 pair sums


def test_schedule_parallelises_and_vectorises() -> None:
    from passes.kernels._gemm import shifted_gemm

    shape = GemmShape(5, 40, 48, 2, 32)
    script = x86_vnni.schedule_gemm(
        shifted_gemm(shape), x86_vnni.VnniTiles(2, 32)
    ).mod.script()
    assert "T.parallel" in script and "T.vectorized" in script
    assert "llvm.x86.avx512.vpdpbusd.512" in script


@pytest.mark.parametrize(
    "value_a, value_b", [(-128, -128), (127, -128), (-128, 127), (127, 127)]
)
def test_int8_extremes_accumulate_exactly(value_a: int, value_b: int) -> None:
    m, k, n = (
        3,
        1031,
        37,
    )  # 128 * 128 * 1031 = 16.9M: far from int32 overflow, far past int16
    a = np.full((m, k), value_a, np.int8)
    b = np.full((k, n), value_b, np.int8)
    np.testing.assert_array_equal(
        _run(a, b, x86_vnni.VnniTiles(3, 32)), _reference(a, b)
    )


@pytest.mark.parametrize(
    "m, k, n", [(1, 4, 16), (16, 256, 128), (128, 512, 256), (17, 1000, 70), (1, 1, 1)]
)
def test_default_tiles_bit_exact(m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    tiles = x86_vnni.default_tiles(m)
    np.testing.assert_array_equal(_run(a, b, tiles), _reference(a, b))


@st.composite
def gemm_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, x86_vnni.VnniTiles]:
    m = draw(st.sampled_from([1, 2, 3, 5, 7, 16, 17, 33]))
    k = draw(st.integers(1, 200))
    n = draw(st.integers(1, 150))
    tiles = draw(st.sampled_from(TILES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = np.array([-128, 127, -1, 0, 1], np.int8)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    if draw(st.booleans()):  # sprinkle the extremes
        a = np.where(rng.random(a.shape) < 0.3, rng.choice(values, a.shape), a).astype(
            np.int8
        )
        b = np.where(rng.random(b.shape) < 0.3, rng.choice(values, b.shape), b).astype(
            np.int8
        )
    return a, b, tiles


@given(gemm_cases())
@example((np.full((1, 1), -128, np.int8), np.full((1, 1), -128, np.int8), TILES[0]))
@example((np.full((17, 5), 127, np.int8), np.full((5, 65), -128, np.int8), TILES[3]))
def test_property_bit_exact_over_shapes(
    case: tuple[np.ndarray, np.ndarray, x86_vnni.VnniTiles],
) -> None:
    a, b, tiles = case
    np.testing.assert_array_equal(_run(a, b, tiles), _reference(a, b))


def test_refuses_weights_packed_for_another_tile() -> None:
    kernel = _kernel(2, 8, 40, x86_vnni.VnniTiles(2, 64))
    weights = x86_vnni.pack_weights(np.ones((8, 40), np.int8), cols=16)
    with pytest.raises(ValueError, match=r"pack with cols=64"):
        kernel(np.ones((2, 8), np.int8), weights)


def test_refuses_bad_tiles_and_dtypes() -> None:
    with pytest.raises(ValueError, match="cols a multiple of 16"):
        x86_vnni.VnniTiles(2, 24)
    with pytest.raises(ValueError, match="2-D int8 array"):
        x86_vnni.pack_weights(np.ones((4, 4), np.int32))
