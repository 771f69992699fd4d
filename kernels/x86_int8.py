"""x86 W8A8 GEMM, exact on every x86-64 CPU: one micro-kernel schedule over three dot-product ISAs.

    family        CPU feature   vector  instruction (`_x86_intrinsics`)        compute (`_gemm`)
    x86-vnni      avx512vnni    zmm 16  vpdpbusd, u8 x s8, 4 per lane           shifted_gemm (+128, correction)
    x86-avxvnni   avxvnni       ymm 8   {vex} vpdpbusd, u8 x s8, 4 per lane     shifted_gemm (+128, correction)
    x86-avx2      avx2          ymm 8   vpmovsxbw + vpmaddwd, i16 x i16, 2      widened_gemm (A as int16)

All three are exact for every int8 input: VNNI accumulates u8 x s8 products straight into int32, and
`vpmaddwd` sums two int16 x int16 products into int32 (|sum| <= 2^15). The saturating `vpmaddubsw`
(int16 pair sums of u8 x s8), which TVM's AVX2/AVX-512 intrinsics and onnxruntime's AVX2 u8s8 kernels
use, is never emitted (the tests check the assembly of every family). `best_isa` picks the first family
the target's CPU has, in the order above.

The schedule keeps a `rows x cols` block of int32 accumulators in registers (`rows * cols / lanes`
vectors), runs the K loop over it with one intrinsic per `lanes` columns x `depth` reductions,
parallelises over column tiles and vectorises the prologue (shift or widen) and the epilogue
(correction, crop). `design_space` exposes the knobs to MetaSchedule: the register tile (`rows`,
`cols`, sampled) and where the prologue and the parallel loop go (one space each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._gemm import SHIFT, GemmShape, shifted_gemm, widened_gemm
from ._x86_intrinsics import register_intrinsic

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.target import Target
    from tvm.tirx import PrimFunc


@dataclass(frozen=True)
class X86Isa:
    """One x86 int8 dot-product ISA: what the CPU needs, the vector shape, and the instruction."""

    family: str
    feature: str
    lanes: int
    depth: int
    shifted: bool
    llvm_intrinsic: str
    intrin_name: str
    max_col_vectors: int

    @property
    def prologue(self) -> str:
        """The block preparing A: `shift` (A + 128 as u8) or `widen` (A as int16)."""
        return "shift" if self.shifted else "widen"

    def shape(self, m: int, k: int, n: int, tiles: X86Tiles) -> GemmShape:
        return GemmShape(m, k, n, tiles.rows, tiles.cols, self.lanes, self.depth)

    def gemm_func(self, shape: GemmShape) -> PrimFunc:
        """The unscheduled compute: `shifted_gemm` (A, B, correction, C) or `widened_gemm` (A, B, C)."""
        return shifted_gemm(shape) if self.shifted else widened_gemm(shape)


VNNI = X86Isa("x86-vnni", "avx512vnni", 16, 4, True, "llvm.x86.avx512.vpdpbusd.512",
              "passes_x86_vnni_u8s8i32_16x4", max_col_vectors=4)
AVX_VNNI = X86Isa("x86-avxvnni", "avxvnni", 8, 4, True, "llvm.x86.avx512.vpdpbusd.256",
                  "passes_x86_avxvnni_u8s8i32_8x4", max_col_vectors=8)
AVX2 = X86Isa("x86-avx2", "avx2", 8, 2, False, "llvm.x86.avx2.pmadd.wd",
              "passes_x86_avx2_i16s8i32_8x2", max_col_vectors=8)
#: in order of preference: the first one a CPU has is the one it gets
ISAS: tuple[X86Isa, ...] = (VNNI, AVX_VNNI, AVX2)
#: largest row tile the design space samples
MAX_ROWS = 4


def isa_named(family: str) -> X86Isa:
    """The ISA of a family name (`x86-vnni`, `x86-avxvnni`, `x86-avx2`)."""
    for isa in ISAS:
        if isa.family == family:
            return isa
    raise ValueError(f"unknown x86 int8 family {family!r}; known: {', '.join(i.family for i in ISAS)}")


@dataclass(frozen=True)
class X86Tiles:
    """Register tile of the micro-kernel: `rows` activation rows x `cols` output columns.

    `prologue_per_tile` recomputes the prologue (A's shift or widening) inside each parallel column tile
    instead of in a separate parallel pass (one thread-pool launch fewer; pays off when A is a single
    row tile). `parallel_rows` spreads row tiles over the threads too, not only column tiles (narrow N).
    """

    rows: int = 4
    cols: int = 64
    prologue_per_tile: bool = False
    parallel_rows: bool = False

    def check(self, isa: X86Isa) -> X86Tiles:
        """`self`, or ValueError when the tile does not fit `isa`'s vectors."""
        if self.rows < 1 or self.cols < isa.lanes or self.cols % isa.lanes:
            raise ValueError(f"{isa.family}: tile {self} needs rows >= 1 and cols a multiple of {isa.lanes}")
        return self


def default_tiles(isa: X86Isa, m: int) -> X86Tiles:
    """Untuned defaults: one row for decode (M = 1, memory bound: 64 columns, the prologue per tile);
    otherwise 4 rows x 64 columns on zmm (16 accumulators of 32 registers), 4 x 16 on ymm (8 of 16)."""
    if m == 1:
        return X86Tiles(rows=1, cols=64, prologue_per_tile=True)
    return X86Tiles(rows=min(m, 4), cols=64 if isa.lanes == 16 else 16)


@dataclass(frozen=True)
class PackedWeights:
    """B[K, N] int8 packed to `[Np/lanes, Kp/depth, lanes, depth]`, and for the shifted ISAs the shift
    correction `128 * sum_k B[k, n]` (None for AVX2, which needs none)."""

    data: np.ndarray
    correction: np.ndarray | None
    k: int
    n: int

    def arrays(self) -> list[np.ndarray]:
        """The kernel's weight-side arguments, in order."""
        return [self.data] if self.correction is None else [self.data, self.correction]


def pack_weights(isa: X86Isa, b: np.ndarray, cols: int) -> PackedWeights:
    """Pack int8 weights B[K, N] for `isa` and a column tile of `cols` (N zero padded to a multiple)."""
    if b.dtype != np.int8 or b.ndim != 2:
        raise ValueError(f"{isa.family}: weights must be a 2-D int8 array, got {b.dtype} {b.shape}")
    shape = GemmShape(1, b.shape[0], b.shape[1], 1, cols, isa.lanes, isa.depth)
    padded = np.zeros((shape.k_padded, shape.n_padded), np.int8)
    padded[: shape.k, : shape.n] = b
    kb, nb = shape.k_padded // isa.depth, shape.n_padded // isa.lanes
    data = np.ascontiguousarray(padded.reshape(kb, isa.depth, nb, isa.lanes).transpose(2, 0, 3, 1))
    correction = None
    if isa.shifted:
        correction = (SHIFT * padded.astype(np.int32).sum(axis=0, dtype=np.int32)).astype(np.int32)
    return PackedWeights(data, correction, shape.k, shape.n)


def schedule_gemm(isa: X86Isa, func: PrimFunc, tiles: X86Tiles) -> Schedule:
    """Tile, tensorize, parallelise and vectorise `isa.gemm_func(...)` for `tiles`."""
    from tvm import s_tir

    tiles.check(isa)
    sch = s_tir.Schedule(func)
    _schedule(isa, sch, lambda *_: (tiles.rows, tiles.cols // isa.lanes), tiles.prologue_per_tile,
              tiles.parallel_rows)
    return sch


#: structural variants of the design space: (prologue_per_tile, parallel_rows); the tile sizes are sampled
SPACE_VARIANTS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def design_space(isa: X86Isa) -> Callable[[Schedule], list[Schedule]]:
    """MetaSchedule design space of `isa`'s compute (a `ScheduleFn`): one schedule per structural variant
    (`SPACE_VARIANTS`), each with the register tile sampled as perfect tiles of the padded sizes
    (`rows` | Mp, rows <= 4; `cols / lanes` | Np / lanes, at most `isa.max_col_vectors`), which
    MetaSchedule's tile-size mutator explores. Every point is bit-exact, so the search only trades speed."""

    def sampled(variant: Schedule, i: Any, j_vectors: Any) -> tuple[Any, Any]:
        rows = variant.sample_perfect_tile(i, n=2, max_innermost_factor=MAX_ROWS)[1]
        cols = variant.sample_perfect_tile(j_vectors, n=2, max_innermost_factor=isa.max_col_vectors)[1]
        return rows, cols

    def space(sch: Schedule) -> list[Schedule]:
        spaces = []
        for prologue_per_tile, parallel_rows in SPACE_VARIANTS:
            variant = sch.copy()
            _schedule(isa, variant, sampled, prologue_per_tile, parallel_rows)
            spaces.append(variant)
        return spaces

    return space


def _schedule(isa: X86Isa, sch: Schedule, pick: Callable[[Schedule, Any, Any], tuple[Any, Any]],
              prologue_per_tile: bool, parallel_rows: bool) -> None:
    """The micro-kernel schedule. `pick(sch, i, j_vectors)` gives the register tile as (rows, cols / lanes),
    ints or sampled variables, from the row loop and the loop over `lanes`-column vectors."""
    gemm, out, prologue = sch.get_sblock("gemm"), sch.get_sblock("output"), sch.get_sblock(isa.prologue)
    i, j, r = sch.get_loops(gemm)
    j_vectors, j_lane = sch.split(j, [None, isa.lanes])
    rows, col_vectors = pick(sch, i, j_vectors)
    i_tile, i_reg = sch.split(i, [None, rows])
    j_tile, j_vec = sch.split(j_vectors, [None, col_vectors])
    r_step, r_lane = sch.split(r, [None, isa.depth])
    sch.reorder(j_tile, i_tile, r_step, i_reg, j_vec, j_lane, r_lane)
    tile = sch.fuse(j_tile, i_tile) if parallel_rows else j_tile
    sch.parallel(tile)
    if prologue_per_tile:
        sch.compute_at(prologue, tile, preserve_unit_loops=True)
    sch.reverse_compute_at(out, tile if parallel_rows else i_tile, preserve_unit_loops=True)
    out_j = sch.get_loops(out)[-1]
    sch.vectorize(sch.split(out_j, [None, isa.lanes])[1])
    init = sch.decompose_reduction(gemm, r_step)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(j_lane, register_intrinsic(isa))
    sch.unroll(i_reg)
    sch.unroll(j_vec)
    p_fused = sch.fuse(*sch.get_loops(prologue)[-2:])
    p_outer, p_vec = sch.split(p_fused, [None, 64])
    if not prologue_per_tile:
        sch.parallel(p_outer)
    sch.vectorize(p_vec)


def host_target() -> Target:
    """The LLVM target of this machine with its CPU named (without `mcpu` LLVM emits generic x86-64)."""
    from tvm.target import Target, codegen

    return Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def cpu_target(mcpu: str) -> Target:
    """An x86-64 LLVM target for CPU `mcpu` (`znver3`, `alderlake`, ...): code for a CPU other than this one."""
    from tvm.target import Target

    return Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": mcpu})


def has_feature(isa: X86Isa, target: Target | None = None) -> bool:
    """Whether `target` (default: this machine) has what `isa` needs."""
    from tvm.target import codegen

    return bool(codegen.target_has_features(isa.feature, target or host_target()))


def best_isa(target: Target | None = None) -> X86Isa | None:
    """The first of `ISAS` that `target` (default: this machine) has; None for a CPU without AVX2."""
    return next((isa for isa in ISAS if has_feature(isa, target)), None)


@dataclass(frozen=True)
class X86Gemm:
    """A built kernel for one (ISA, M, K, N, tiles): call it with A_s8[M, K] and packed weights."""

    isa: X86Isa
    shape: GemmShape
    tiles: X86Tiles
    module: Any

    def __call__(self, a: np.ndarray, weights: PackedWeights) -> np.ndarray:
        run, out = self._bound(a, weights)
        run()
        return out.numpy()

    def runner(self, a: np.ndarray, weights: PackedWeights) -> Callable[[], None]:
        """A zero-argument call on device-resident copies of the inputs (for timing)."""
        return self._bound(a, weights)[0]

    def _bound(self, a: np.ndarray, weights: PackedWeights) -> tuple[Callable[[], None], Any]:
        import tvm

        self._check(a, weights)
        args = [tvm.runtime.tensor(x) for x in (a, *weights.arrays())]
        out = tvm.runtime.tensor(np.empty((self.shape.m, self.shape.n), np.int32))
        return (lambda: self.module(*args, out)), out

    def _check(self, a: np.ndarray, weights: PackedWeights) -> None:
        family = self.isa.family
        if a.dtype != np.int8 or a.shape != (self.shape.m, self.shape.k):
            raise ValueError(f"{family}: A must be int8 {(self.shape.m, self.shape.k)}, got {a.dtype} {a.shape}")
        if weights.data.shape != self.shape.packed_weight_shape or (weights.correction is None) == self.isa.shifted:
            raise ValueError(f"{family}: weights packed as {weights.data.shape}, kernel wants "
                             f"{self.shape.packed_weight_shape} (pack for {family} with cols={self.tiles.cols})")


def build_gemm(isa: X86Isa, m: int, k: int, n: int, tiles: X86Tiles | None = None,
               target: Target | None = None) -> X86Gemm:
    """Build C_i32[M, N] = A_s8[M, K] @ B_s8[K, N] with `isa` for `target` (default: this machine)."""
    import tvm

    tiles = (tiles or default_tiles(isa, m)).check(isa)
    target = target or host_target()
    if not has_feature(isa, target):
        raise ValueError(f"{isa.family}: target {target} has no {isa.feature}; use another int8 kernel")
    shape = isa.shape(m, k, n, tiles)
    sch = schedule_gemm(isa, isa.gemm_func(shape), tiles)
    return X86Gemm(isa, shape, tiles, tvm.compile(sch.mod, target=target))
