"""The INT8 kernel families `_dispatch` sends int8 matmuls to, and which one a target gets.

    x86-vnni    x86 llvm with AVX512-VNNI   vnni_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/16, Kp/4, 16, 4], corr[Np])
    x86-avxvnni x86 llvm with AVX-VNNI      avxvnni_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/8, Kp/4, 8, 4], corr[Np])
    x86-avx2    x86 llvm with AVX2          avx2_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/8, Kp/2, 8, 2])
    arm-smmla   aarch64 llvm with i8mm      arm_smmla_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/2, Kp/8, 2, 8])
    arm-sdot    aarch64 llvm with dotprod   arm_sdot_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/4, Kp/4, 4, 4])
    opencl-int8 OpenCL (Adreno, Mali)       opencl_int8_gem{m,v}_m{M}_k{K}_n{N}(A_s8[M, Kp], W[Kp/4, N, 4])

x86-vnni and x86-avxvnni multiply u8 x s8 and undo their own +128 shift with `corr` = 128 * colsum(W);
for an activation that was uint8 (shifted to int8 by `_dispatch`) `corr` is zero, so the kernel
multiplies the uint8 values themselves. x86-avx2, the ARM and the OpenCL kernels are s8 x s8:
`_dispatch` adds 128 * colsum(W) to their result when the activation was uint8. An x86 CPU without
AVX2 gets no family: its int8 matmuls stay Relax matmuls, which TVM legalizes to exact int32 loops. The OpenCL kernel reads A zero padded to Kp: its tile_k
is fitted to K (`opencl_int8.fit_tile_k`), so A is padded (a concat of zeros) only when K % 4 != 0.
Tiles: x86 the kernels' defaults (`x86_int8.default_tiles`); ARM and OpenCL the target description's `schedule.gemm` / `gemv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax

from passes.kernels import arm_int8, opencl_int8, x86_int8
from passes.lowering._plan import Int8Matmul, KernelFamily, KernelPlan, uint8_correction
from passes.lowering._schedule import max_threads


def choose_family(target: Any, tvm_target: tvm.target.Target) -> KernelFamily | None:
    """The kernel family for `target` (a TargetDescription) built as `tvm_target`, or None."""
    if target.backend == "opencl":
        return OpenclFamily(target, max_threads(tvm_target))
    if target.backend != "llvm" or tvm_target.kind.name != "llvm":
        return None
    if _is_x86(tvm_target):
        isa = x86_int8.best_isa(tvm_target)
        return X86Family(isa) if isa is not None else None
    if _is_aarch64(tvm_target) and (arm_int8.has_i8mm(tvm_target) or arm_int8.has_dotprod(tvm_target)):
        return ArmFamily(target, arm_int8.pick_instruction(tvm_target))
    return None


def x86_isa(tvm_target: tvm.target.Target) -> x86_int8.X86Isa | None:
    """The x86 int8 ISA `tvm_target` gets (None: not an x86 llvm target, or a CPU without AVX2)."""
    if tvm_target.kind.name != "llvm" or not _is_x86(tvm_target):
        return None
    return x86_int8.best_isa(tvm_target)


def _is_x86(tvm_target: tvm.target.Target) -> bool:
    return _triple(tvm_target).startswith(("x86_64", "i686", "i386"))


def _triple(tvm_target: tvm.target.Target) -> str:
    return str(tvm_target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())


def _is_aarch64(tvm_target: tvm.target.Target) -> bool:
    return _triple(tvm_target).startswith(("aarch64", "arm64"))


@dataclass(frozen=True)
class X86Family:
    """x86 GEMM over one dot-product ISA (`passes.kernels.x86_int8`: AVX512-VNNI, AVX-VNNI or AVX2),
    default tiles."""

    isa: x86_int8.X86Isa

    @property
    def name(self) -> str:
        return self.isa.family

    def kernel(self, rows: int, depth: int, cols: int) -> KernelPlan:
        tiles = x86_int8.default_tiles(self.isa, rows)
        reference = self.isa.gemm_func(self.isa.shape(rows, depth, cols, tiles))
        scheduled = x86_int8.schedule_gemm(self.isa, reference, tiles).mod["main"]
        prefix = self.isa.family.removeprefix("x86-")
        return KernelPlan(f"{prefix}_gemm_m{rows}_k{depth}_n{cols}", scheduled, reference)

    def operands(self, matmul: Int8Matmul) -> tuple[list[relax.Expr], np.ndarray | None]:
        packed = x86_int8.pack_weights(self.isa, matmul.weight, x86_int8.default_tiles(self.isa, matmul.rows).cols)
        weights = [relax.const(packed.data)]
        if packed.correction is None:  # s8 x s8: a uint8 activation was shifted by _dispatch
            return [matmul.activation, *weights], uint8_correction(matmul.weight) if matmul.unsigned else None
        correction = np.zeros_like(packed.correction) if matmul.unsigned else packed.correction
        return [matmul.activation, *weights, relax.const(correction)], None


@dataclass(frozen=True)
class ArmFamily:
    """AArch64 sdot / smmla GEMM (`passes.kernels.arm_int8`), tiles from the target description."""

    target: Any
    instruction: arm_int8.Instruction

    @property
    def name(self) -> str:
        return f"arm-{self.instruction.name}"

    def _shape(self, rows: int, depth: int, cols: int) -> arm_int8.ArmShape:
        tiles = arm_int8.tiles_from_target(self.target, rows, self.instruction)
        return arm_int8.ArmShape(rows, depth, cols, self.instruction, tiles)

    def kernel(self, rows: int, depth: int, cols: int) -> KernelPlan:
        shape = self._shape(rows, depth, cols)
        reference = arm_int8.gemm_func(shape)
        scheduled = arm_int8.schedule_gemm(reference, shape).mod["main"]
        return KernelPlan(f"arm_{self.instruction.name}_gemm_m{rows}_k{depth}_n{cols}", scheduled, reference)

    def operands(self, matmul: Int8Matmul) -> tuple[list[relax.Expr], np.ndarray | None]:
        shape = self._shape(matmul.rows, matmul.depth, matmul.cols)
        packed = arm_int8.pack_weights(matmul.weight, self.instruction, shape.tiles.cols)
        return [matmul.activation, relax.const(packed)], uint8_correction(matmul.weight) if matmul.unsigned else None


@dataclass(frozen=True)
class OpenclFamily:
    """OpenCL W8A8 GEMM / GEMV (`passes.kernels.opencl_int8`), tiles from the target description,
    work-groups within `max_threads` (the TVM target's limit)."""

    target: Any
    max_threads: int | None
    name: str = "opencl-int8"

    def _tiles(self, rows: int, depth: int) -> opencl_int8.OpenclTiles:
        return opencl_int8.fit_tile_k(opencl_int8.tiles_from_target(self.target, rows, self.max_threads), depth)

    def kernel(self, rows: int, depth: int, cols: int) -> KernelPlan:
        from passes.kernels._opencl_dot import install_postproc

        install_postproc()  # the device source TVM generates for this kernel must define passes_dot4_acc
        tiles = self._tiles(rows, depth)
        kind = "gemv" if rows == 1 else "gemm"
        return KernelPlan(f"opencl_int8_{kind}_m{rows}_k{depth}_n{cols}",
                          opencl_int8.int8_matmul(rows, depth, cols, tiles),
                          opencl_int8.reference_matmul(rows, depth, cols, tiles))

    def operands(self, matmul: Int8Matmul) -> tuple[list[relax.Expr], np.ndarray | None]:
        tiles = self._tiles(matmul.rows, matmul.depth)
        padding = opencl_int8.padded_k(matmul.depth, tiles) - matmul.depth
        activation = matmul.activation
        if padding:
            zeros = relax.const(np.zeros((matmul.rows, padding), np.int8))
            activation = relax.op.concat([activation, zeros], axis=1)
        packed = opencl_int8.pack_weights(matmul.weight, tiles)
        return [activation, relax.const(packed)], uint8_correction(matmul.weight) if matmul.unsigned else None
