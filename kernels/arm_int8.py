"""AArch64 W8A8 GEMM: `sdot` (dotprod) and `smmla` (i8mm) tensor intrinsics, weight packing, schedules.

Both instructions are signed x signed, so no +128 shift is needed (unlike x86's `vpdpbusd` in `x86_int8`):

    sdot  (4x4):  C[4]    += sum_{k<4} A[k] * B[4, k]      B row j = the 4 bytes of lane j
    smmla (2x2x8): C[2, 2] += sum_{k<8} A[2, k] * B[2, k]   one 2x8 A block times a 2x8 (= B^T) block

`sdot` broadcasts 4 activation bytes to all 4 lanes (`dup v.4s`, which LLVM folds into the lane-indexed
`sdot v.4s, v.16b, v.4b[i]`), weights packed `[Np/4, Kp/4, 4, 4]`. `smmla` consumes two activation
rows at once, so activations are packed `[Mp/2, Kp/8, 2, 8]` by a `pack` stage and weights
`[Np/2, Kp/8, 2, 8]`; its accumulator is kept in the instruction's layout `[Mp/2, Np/2, 2, 2]` and the
`output` stage un-interleaves it. TVM 0.27 ships an sdot intrinsic (`tensor_intrin.arm_cpu`) but no
i8mm one; both are defined here so the two kernels share one style and one registration path.

Padding: K to a multiple of the instruction depth and N to the column tile with zero weights, M to the
row tile with zero activations; padded rows/columns are computed and never stored. Schedule: a
`rows x cols` register block of int32 accumulators, the K loop outside it, one intrinsic per
instruction tile, column tiles in parallel; the block comes from the target description's
`schedule.gemm` / `schedule.gemv` (`tiles_from_target`) or `default_tiles`. The kernel picks smmla when
`target` has i8mm, else sdot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._gemm import round_up

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.target import Target
    from tvm.tirx import PrimFunc

    from passes.targets._schema import TargetDescription

SDOT_INTRIN = "passes_arm_sdot_s8s8i32_4x4"
SMMLA_INTRIN = "passes_arm_smmla_s8s8i32_2x2x8"


@dataclass(frozen=True)
class Instruction:
    """Geometry of one int8 instruction: output rows x cols it covers and reduction depth."""

    name: str
    rows: int
    cols: int
    depth: int


SDOT = Instruction("sdot", rows=1, cols=4, depth=4)
SMMLA = Instruction("smmla", rows=2, cols=2, depth=8)


@dataclass(frozen=True)
class ArmTiles:
    """Register block: `rows` x `cols` int32 outputs (multiples of the instruction's rows/cols).

    `rows * cols / 4` accumulator q-registers must fit the 32 NEON registers with the operand loads.
    """

    rows: int = 4
    cols: int = 16

    def check(self, inst: Instruction) -> None:
        if (
            self.rows < 1
            or self.cols < 1
            or self.rows % inst.rows
            or self.cols % inst.cols
        ):
            raise ValueError(
                f"arm-int8: tile {self} needs rows a multiple of {inst.rows} and cols a multiple"
                f" of {inst.cols} for {inst.name}"
            )


def default_tiles(m: int, inst: Instruction) -> ArmTiles:
    """Untuned defaults: one instruction row for decode (M = 1), a 4 x 16 block otherwise (16 q-regs)."""
    if m == 1:
        return ArmTiles(rows=inst.rows, cols=16)
    return ArmTiles(rows=4, cols=16)


def tiles_from_target(target: TargetDescription, m: int, inst: Instruction) -> ArmTiles:
    """The target's register block for M rows (`schedule.gemv` when M = 1, else `schedule.gemm`):
    `tile_m` x `tile_n` rounded up to the instruction's rows and cols."""
    tiles = target.schedule.gemv if m == 1 else target.schedule.gemm
    return ArmTiles(rows=round_up(tiles.tile_m, inst.rows), cols=round_up(tiles.tile_n, inst.cols))


def has_dotprod(target: Target) -> bool:
    return bool(target.attrs.get("feature.has_dotprod", False))


def has_i8mm(target: Target) -> bool:
    return bool(target.attrs.get("feature.has_matmul_i8", False))


def pick_instruction(target: Target) -> Instruction:
    """smmla where the core has i8mm, else sdot; refuse targets without dotprod."""
    if has_i8mm(target):
        return SMMLA
    if has_dotprod(target):
        return SDOT
    raise ValueError(f"arm-int8: target {target} has neither i8mm nor dotprod")


def register_intrinsics() -> None:
    """Register the sdot and smmla intrinsics with TVM (once)."""
    from tvm.s_tir import TensorIntrin

    for name, make in (
        (SDOT_INTRIN, _sdot_functions),
        (SMMLA_INTRIN, _smmla_functions),
    ):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *make())


def _sdot_functions() -> tuple[PrimFunc, PrimFunc]:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((4,), "int8", offset_factor=1),
        b: T.Buffer((4, 4), "int8", offset_factor=1),
        c: T.Buffer((4,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            for i, k in T.grid(4, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((4,), "int8", offset_factor=1),
        b: T.Buffer((4, 4), "int8", offset_factor=1),
        c: T.Buffer((4,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            a_word = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_word, 4), dtype="int8x16")
            c[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                c.vload([0], dtype="int32x4"),
                a_bytes,
                b.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            )

    return desc, impl


def _smmla_functions() -> tuple[PrimFunc, PrimFunc]:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((2, 8), "int8", offset_factor=1),
        b: T.Buffer((2, 8), "int8", offset_factor=1),
        c: T.Buffer((2, 2), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:2, 0:2], a[0:2, 0:8], b[0:2, 0:8])
            T.writes(c[0:2, 0:2])
            for i, j, k in T.grid(2, 2, 8):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    c[vi, vj] = c[vi, vj] + T.cast(a[vi, vk], "int32") * T.cast(
                        b[vj, vk], "int32"
                    )

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((2, 8), "int8", offset_factor=1),
        b: T.Buffer((2, 8), "int8", offset_factor=1),
        c: T.Buffer((2, 2), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:2, 0:2], a[0:2, 0:8], b[0:2, 0:8])
            T.writes(c[0:2, 0:2])
            c[0, T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
                c.vload([0, 0], dtype="int32x4"),
                a.vload([0, 0], dtype="int8x16"),
                b.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            )

    return desc, impl


@dataclass(frozen=True)
class ArmShape:
    """Logical GEMM sizes with the padded sizes one instruction and one register block need."""

    m: int
    k: int
    n: int
    inst: Instruction
    tiles: ArmTiles

    def __post_init__(self) -> None:
        if min(self.m, self.k, self.n) < 1:
            raise ValueError(f"arm-int8: sizes must be positive, got {self}")
        self.tiles.check(self.inst)

    @property
    def m_padded(self) -> int:
        return round_up(self.m, self.tiles.rows)

    @property
    def k_padded(self) -> int:
        return round_up(self.k, self.inst.depth)

    @property
    def n_padded(self) -> int:
        return round_up(self.n, self.tiles.cols)

    @property
    def packed_weight_shape(self) -> tuple[int, int, int, int]:
        inst = self.inst
        return (
            self.n_padded // inst.cols,
            self.k_padded // inst.depth,
            inst.cols,
            inst.depth,
        )


def pack_weights(b: np.ndarray, inst: Instruction, cols: int = 16) -> np.ndarray:
    """Pack int8 B[K, N] to `[Np/c, Kp/d, c, d]` for instruction `inst` (c cols, d depth), N padded to `cols`."""
    if b.dtype != np.int8 or b.ndim != 2:
        raise ValueError(
            f"arm-int8: weights must be a 2-D int8 array, got {b.dtype} {b.shape}"
        )
    shape = ArmShape(inst.rows, b.shape[0], b.shape[1], inst, ArmTiles(inst.rows, cols))
    padded = np.zeros((shape.k_padded, shape.n_padded), np.int8)
    padded[: shape.k, : shape.n] = b
    kb, nb = shape.k_padded // inst.depth, shape.n_padded // inst.cols
    return np.ascontiguousarray(
        padded.reshape(kb, inst.depth, nb, inst.cols).transpose(2, 0, 3, 1)
    )


def gemm_func(shape: ArmShape) -> PrimFunc:
    """`main(A_s8[M,K], B_packed, C_i32[M,N])` with stages `pack` (zero-padded A), `gemm`, `output`.

    sdot: `pack` is A padded to [Mp, Kp], `gemm` is [Mp, Np]. smmla: `pack` is A interleaved to
    [Mp/2, Kp/8, 2, 8], `gemm` is [Mp/2, Np/2, 2, 2] (the smmla accumulator layout).
    """
    from tvm import te, tirx

    m, k, n, inst = shape.m, shape.k, shape.n, shape.inst
    a = te.placeholder((m, k), "int8", name="A")
    b = te.placeholder(shape.packed_weight_shape, "int8", name="B")

    def padded_a(i: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
        value = a[tirx.min(i, m - 1), tirx.min(j, k - 1)]
        return tirx.Select(tirx.all(i < m, j < k), value, tirx.const(0, "int8"))

    r = te.reduce_axis((0, shape.k_padded), name="r")
    d, mp, np_ = inst.depth, shape.m_padded, shape.n_padded
    if inst is SDOT:
        pack = te.compute((mp, shape.k_padded), padded_a, name="pack")
        gemm = te.compute(
            (mp, np_),
            lambda i, j: te.sum(
                pack[i, r].astype("int32")
                * b[j // 4, r // d, j % 4, r % d].astype("int32"),
                axis=r,
            ),
            name="gemm",
        )
        out = te.compute((m, n), lambda i, j: gemm[i, j], name="output")
    else:
        pack = te.compute(
            (mp // 2, shape.k_padded // d, 2, d),
            lambda io, kb, ii, kk: padded_a(io * 2 + ii, kb * d + kk),
            name="pack",
        )
        gemm = te.compute(
            (mp // 2, np_ // 2, 2, 2),
            lambda io, jo, ii, ji: te.sum(
                pack[io, r // d, ii, r % d].astype("int32")
                * b[jo, r // d, ji, r % d].astype("int32"),
                axis=r,
            ),
            name="gemm",
        )
        out = te.compute(
            (m, n), lambda i, j: gemm[i // 2, j // 2, i % 2, j % 2], name="output"
        )
    return te.create_prim_func([a, b, out])


def schedule_gemm(func: PrimFunc, shape: ArmShape, tensorize: bool = True) -> Schedule:
    """Register-block, tensorize (sdot or smmla), parallelise over column tiles, vectorise the rest.

    `tensorize=False` keeps every other step (the control the tests compare against: same loops,
    LLVM's own widening multiplies instead of the instruction).
    """
    from tvm import s_tir

    register_intrinsics()
    sch = s_tir.Schedule(func)
    gemm, out, pack = (sch.get_sblock(x) for x in ("gemm", "output", "pack"))
    tiles, inst = shape.tiles, shape.inst
    if inst is SDOT:
        i, j, r = sch.get_loops(gemm)
        i_tile, i_reg = sch.split(i, [None, tiles.rows])
        j_tile, j_vec, j_lane = sch.split(j, [None, tiles.cols // 4, 4])
        r_step, r_lane = sch.split(r, [None, 4])
        sch.reorder(j_tile, i_tile, r_step, i_reg, j_vec, j_lane, r_lane)
        unrolled, tensorized, intrin = (i_reg, j_vec), j_lane, SDOT_INTRIN
    else:
        io, jo, ii, ji, r = sch.get_loops(gemm)
        i_tile, i_reg = sch.split(io, [None, tiles.rows // 2])
        j_tile, j_reg = sch.split(jo, [None, tiles.cols // 2])
        r_step, r_lane = sch.split(r, [None, 8])
        sch.reorder(j_tile, i_tile, r_step, i_reg, j_reg, ii, ji, r_lane)
        unrolled, tensorized, intrin = (i_reg, j_reg), ii, SMMLA_INTRIN
    sch.parallel(j_tile)
    sch.reverse_compute_at(out, i_tile, preserve_unit_loops=True)
    out_j = sch.get_loops(out)[-1]
    sch.vectorize(sch.split(out_j, [None, 4])[1])
    init = sch.decompose_reduction(gemm, r_step)
    sch.vectorize(sch.fuse(*sch.get_loops(init)[-2 if inst is SMMLA else -1 :]))
    if tensorize:
        sch.tensorize(tensorized, intrin)
    for loop in unrolled:
        sch.unroll(loop)
    p_outer, p_vec = sch.split(sch.fuse(*sch.get_loops(pack)), [None, 16])
    sch.parallel(p_outer)
    sch.vectorize(p_vec)
    return sch


@dataclass(frozen=True)
class ArmGemm:
    """A kernel built for one (M, K, N, instruction, tiles); `module` is the compiled TVM module."""

    shape: ArmShape
    module: Any

    @property
    def instruction(self) -> Instruction:
        return self.shape.inst

    def assembly(self) -> str:
        return self.module.mod.inspect_source("asm")

    def pack(self, b: np.ndarray) -> np.ndarray:
        return pack_weights(b, self.shape.inst, self.shape.tiles.cols)


def build_gemm(
    m: int,
    k: int,
    n: int,
    target: Target,
    tiles: ArmTiles | None = None,
    inst: Instruction | None = None,
    tensorize: bool = True,
) -> ArmGemm:
    """Build C_i32[M, N] = A_s8[M, K] @ B_s8[K, N] for an aarch64 `target` (instruction from its features)."""
    import tvm

    inst = inst or pick_instruction(target)
    shape = ArmShape(m, k, n, inst, tiles or default_tiles(m, inst))
    sch = schedule_gemm(gemm_func(shape), shape, tensorize)
    return ArmGemm(shape, tvm.compile(sch.mod, target=target))
