"""x86 AVX512-VNNI W8A8 GEMM: a `vpdpbusd` tensor intrinsic that verifies under LLVM 22, and its schedule.

TVM's shipped `dot_16x4_vnni` passes the operands as `<16 x i32>`, which LLVM 22's `vpdpbusd.512`
(`<16 x i32>, <64 x i8>, <64 x i8>`) rejects; its `dot_16x4_avx512` goes through `vpmaddubsw`, which
saturates int16 pairs. This intrinsic hands LLVM the byte vectors it declares:

    C[16] += sum_{k<4} u8(A[k]) * s8(B[16, k])   as   vpdpbusd(C, broadcast(A as i32) as u8x64, B as i8x64)

int8 x int8 goes through u8 x s8 with the shift of `_gemm.shifted_gemm` (A + 128, minus
`128 * sum_k B[k, n]` computed by `pack_weights`). The schedule keeps a `rows x cols` block of
int32 accumulators in registers (`rows * cols / 16` zmm), runs the K loop over it with one intrinsic
per 16 columns x 4 reductions, parallelises over column tiles and vectorises the prologue (shift)
and the epilogue (correction + crop). `design_space` exposes the knobs to MetaSchedule: the register
tile (`rows`, `cols`, sampled) and where the shift and the parallel loop go (one space each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._gemm import DEPTH, LANES, SHIFT, GemmShape, shifted_gemm

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.target import Target
    from tvm.tirx import PrimFunc

INTRIN_NAME = "passes_x86_vnni_u8s8i32_16x4"


@dataclass(frozen=True)
class VnniTiles:
    """Register tile of the micro-kernel: `rows` activation rows x `cols` output columns (16 | cols).

    `rows * cols / 16` accumulators must fit the 32 zmm registers with room for the B loads.
    `shift_per_tile` recomputes the +128 shift of A inside each parallel column tile instead of in a
    separate parallel pass (one thread-pool launch fewer; pays off when A is a single row tile).
    `parallel_rows` spreads row tiles over the threads too, not only column tiles (narrow N).
    """

    rows: int = 4
    cols: int = 64
    shift_per_tile: bool = False
    parallel_rows: bool = False

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < LANES or self.cols % LANES:
            raise ValueError(
                f"x86-vnni: tile {self} needs rows >= 1 and cols a multiple of {LANES}"
            )


def default_tiles(m: int) -> VnniTiles:
    """Untuned defaults: one row for decode (M = 1, memory bound), a 4 x 64 block otherwise."""
    if m == 1:
        return VnniTiles(rows=1, cols=64, shift_per_tile=True)
    return VnniTiles(rows=min(m, 4), cols=64)


def register_intrinsic() -> str:
    """Register the 16x4 u8 x s8 -> i32 VNNI intrinsic with TVM (once) and return its name."""
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(INTRIN_NAME, allow_missing=True) is None:
        desc, impl = _intrinsic_functions()
        TensorIntrin.register(INTRIN_NAME, desc, impl)
    return INTRIN_NAME


def _intrinsic_functions() -> tuple[PrimFunc, PrimFunc]:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((DEPTH,), "uint8", offset_factor=1),
        b: T.Buffer((LANES, DEPTH), "int8", offset_factor=1),
        c: T.Buffer((LANES,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((DEPTH,), "uint8", offset_factor=1),
        b: T.Buffer((LANES, DEPTH), "int8", offset_factor=1),
        c: T.Buffer((LANES,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            a_word = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_word, 16), dtype="uint8x64")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"),
                a_bytes,
                b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return desc, impl


@dataclass(frozen=True)
class PackedWeights:
    """B[K, N] int8 packed to `[Np/16, Kp/4, 16, 4]` plus the shift correction `128 * sum_k B[k, n]`."""

    data: np.ndarray
    correction: np.ndarray
    k: int
    n: int


def pack_weights(b: np.ndarray, cols: int = 64) -> PackedWeights:
    """Pack int8 weights B[K, N] for a column tile of `cols` (N is zero padded to a multiple of it)."""
    if b.dtype != np.int8 or b.ndim != 2:
        raise ValueError(
            f"x86-vnni: weights must be a 2-D int8 array, got {b.dtype} {b.shape}"
        )
    shape = GemmShape(1, b.shape[0], b.shape[1], 1, cols)
    padded = np.zeros((shape.k_padded, shape.n_padded), np.int8)
    padded[: shape.k, : shape.n] = b
    kb, nb = shape.k_padded // DEPTH, shape.n_padded // LANES
    data = np.ascontiguousarray(
        padded.reshape(kb, DEPTH, nb, LANES).transpose(2, 0, 3, 1)
    )
    correction = SHIFT * padded.astype(np.int32).sum(axis=0, dtype=np.int32)
    return PackedWeights(data, correction.astype(np.int32), shape.k, shape.n)


def schedule_gemm(func: PrimFunc, tiles: VnniTiles) -> Schedule:
    """Tile, tensorize, parallelise and vectorise `shifted_gemm` for `tiles`."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    _schedule(sch, lambda *_: (tiles.rows, tiles.cols // LANES), tiles.shift_per_tile, tiles.parallel_rows)
    return sch


#: structural variants of the design space: (shift_per_tile, parallel_rows); the tile sizes are sampled
SPACE_VARIANTS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
#: largest register tile the space samples: rows <= MAX_ROWS, cols <= 16 * MAX_COL_VECTORS
MAX_ROWS, MAX_COL_VECTORS = 4, 4


def design_space(sch: Schedule) -> list[Schedule]:
    """MetaSchedule design space of `shifted_gemm` (a `ScheduleFn`): one schedule per structural variant
    (`SPACE_VARIANTS`), each with the register tile sampled as perfect tiles of the padded sizes
    (`rows` | Mp, rows <= 4; `cols / 16` | Np / 16, cols <= 64), which MetaSchedule's tile-size mutator
    explores. Every point is bit-exact, so the search only trades speed."""

    def sampled(variant: Schedule, i: Any, j_vectors: Any) -> tuple[Any, Any]:
        rows = variant.sample_perfect_tile(i, n=2, max_innermost_factor=MAX_ROWS)[1]
        cols = variant.sample_perfect_tile(j_vectors, n=2, max_innermost_factor=MAX_COL_VECTORS)[1]
        return rows, cols

    spaces = []
    for shift_per_tile, parallel_rows in SPACE_VARIANTS:
        variant = sch.copy()
        _schedule(variant, sampled, shift_per_tile, parallel_rows)
        spaces.append(variant)
    return spaces


def _schedule(sch: Schedule, pick: Callable[[Schedule, Any, Any], tuple[Any, Any]],
              shift_per_tile: bool, parallel_rows: bool) -> None:
    """The micro-kernel schedule. `pick(sch, i, j_vectors)` gives the register tile as (rows, cols / 16),
    ints or sampled variables, from the row loop and the loop over 16-column vectors."""
    gemm, out, shift = (
        sch.get_sblock("gemm"),
        sch.get_sblock("output"),
        sch.get_sblock("shift"),
    )
    i, j, r = sch.get_loops(gemm)
    j_vectors, j_lane = sch.split(j, [None, LANES])
    rows, col_vectors = pick(sch, i, j_vectors)
    i_tile, i_reg = sch.split(i, [None, rows])
    j_tile, j_vec = sch.split(j_vectors, [None, col_vectors])
    r_step, r_lane = sch.split(r, [None, DEPTH])
    sch.reorder(j_tile, i_tile, r_step, i_reg, j_vec, j_lane, r_lane)
    tile = sch.fuse(j_tile, i_tile) if parallel_rows else j_tile
    sch.parallel(tile)
    if shift_per_tile:
        sch.compute_at(shift, tile, preserve_unit_loops=True)
    sch.reverse_compute_at(out, tile if parallel_rows else i_tile, preserve_unit_loops=True)
    out_j = sch.get_loops(out)[-1]
    sch.vectorize(sch.split(out_j, [None, LANES])[1])
    init = sch.decompose_reduction(gemm, r_step)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(j_lane, register_intrinsic())
    sch.unroll(i_reg)
    sch.unroll(j_vec)
    s_fused = sch.fuse(*sch.get_loops(shift)[-2:])
    s_outer, s_vec = sch.split(s_fused, [None, 64])
    if not shift_per_tile:
        sch.parallel(s_outer)
    sch.vectorize(s_vec)


def host_target() -> Target:
    """The LLVM target of this machine with its CPU named (without `mcpu` LLVM emits generic x86-64)."""
    from tvm.target import Target, codegen

    return Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def has_vnni(target: Target | None = None) -> bool:
    """Whether `target` (default: this machine) has AVX512-VNNI."""
    from tvm.target import codegen

    target = target or host_target()
    return bool(codegen.target_has_features("avx512vnni", target))


@dataclass(frozen=True)
class VnniGemm:
    """A built kernel for one (M, K, N, tiles): call it with A_s8[M, K] and packed weights."""

    shape: GemmShape
    tiles: VnniTiles
    module: Any

    def __call__(self, a: np.ndarray, weights: PackedWeights) -> np.ndarray:
        import tvm

        self._check(a, weights)
        out = tvm.runtime.tensor(np.empty((self.shape.m, self.shape.n), np.int32))
        self.module(
            *(tvm.runtime.tensor(x) for x in (a, weights.data, weights.correction)), out
        )
        return out.numpy()

    def runner(self, a: np.ndarray, weights: PackedWeights) -> Callable[[], None]:
        """A zero-argument call on device-resident copies of the inputs (for timing)."""
        import tvm

        self._check(a, weights)
        args = [tvm.runtime.tensor(x) for x in (a, weights.data, weights.correction)]
        args.append(
            tvm.runtime.tensor(np.empty((self.shape.m, self.shape.n), np.int32))
        )
        return lambda: self.module(*args)

    def _check(self, a: np.ndarray, weights: PackedWeights) -> None:
        if a.dtype != np.int8 or a.shape != (self.shape.m, self.shape.k):
            raise ValueError(
                f"x86-vnni: A must be int8 {(self.shape.m, self.shape.k)}, got {a.dtype} {a.shape}"
            )
        if weights.data.shape != self.shape.packed_weight_shape:
            raise ValueError(
                f"x86-vnni: weights packed as {weights.data.shape}, kernel wants {self.shape.packed_weight_shape}"
                f" (pack with cols={self.tiles.cols})"
            )


def build_gemm(
    m: int, k: int, n: int, tiles: VnniTiles | None = None, target: Target | None = None
) -> VnniGemm:
    """Build C_i32[M, N] = A_s8[M, K] @ B_s8[K, N] for `target` (default: this machine)."""
    import tvm

    tiles = tiles or default_tiles(m)
    target = target or host_target()
    if not has_vnni(target):
        raise ValueError(
            f"x86-vnni: target {target} has no avx512vnni; use another int8 kernel"
        )
    shape = GemmShape(m, k, n, tiles.rows, tiles.cols)
    sch = schedule_gemm(shifted_gemm(shape), tiles)
    return VnniGemm(shape, tiles, tvm.compile(sch.mod, target=target))
