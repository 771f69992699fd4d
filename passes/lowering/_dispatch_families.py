"""The INT8 kernel families `_dispatch` sends int8 matmuls to, and which one a target gets.

    x86-vnni    x86 llvm with AVX512-VNNI   vnni_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/16, Kp/4, 16, 4], corr[Np])
    arm-smmla   aarch64 llvm with i8mm      arm_smmla_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/2, Kp/8, 2, 8])
    arm-sdot    aarch64 llvm with dotprod   arm_sdot_gemm_m{M}_k{K}_n{N}(A_s8, W[Np/4, Kp/4, 4, 4])
    opencl-int8 OpenCL (Adreno, Mali)       opencl_int8_gem{m,v}_m{M}_k{K}_n{N}(A_s8[M, Kp], W[Kp/4, N, 4])

x86-vnni multiplies u8 x s8 and undoes its own +128 shift with `corr` = 128 * colsum(W); for an
activation that was uint8 (shifted to int8 by `_dispatch`) `corr` is zero, so the kernel multiplies
the uint8 values themselves. The ARM and OpenCL kernels are s8 x s8: `_dispatch` adds 128 * colsum(W)
to their result when the activation was uint8. The OpenCL kernel reads A zero padded to Kp: its tile_k
is fitted to K (`opencl_int8.fit_tile_k`), so A is padded (a concat of zeros) only when K % 4 != 0.
Tiles: x86 the kernel's defaults; ARM and OpenCL the target description's `schedule.gemm` / `gemv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax

from passes.kernels import arm_int8, opencl_int8, x86_vnni
from passes.kernels._gemm import GemmShape, shifted_gemm
from passes.lowering._dispatch import Int8Matmul, KernelFamily, KernelPlan, uint8_correction
from passes.lowering._schedule import max_threads


def choose_family(target: Any, tvm_target: tvm.target.Target) -> KernelFamily | None:
    """The kernel family for `target` (a TargetDescription) built as `tvm_target`, or None."""
    if target.backend == "opencl":
        return OpenclFamily(target, max_threads(tvm_target))
    if target.backend != "llvm" or tvm_target.kind.name != "llvm":
        return None
    if target_has_vnni(tvm_target):
        return VnniFamily()
    if _is_aarch64(tvm_target) and (arm_int8.has_i8mm(tvm_target) or arm_int8.has_dotprod(tvm_target)):
        return ArmFamily(target, arm_int8.pick_instruction(tvm_target))
    return None


def target_has_vnni(tvm_target: tvm.target.Target) -> bool:
    """Whether `tvm_target` is an x86 llvm target whose CPU has AVX512-VNNI."""
    if tvm_target.kind.name != "llvm":
        return False
    if not _triple(tvm_target).startswith(("x86_64", "i686", "i386")):
        return False
    return x86_vnni.has_vnni(tvm_target)


def _triple(tvm_target: tvm.target.Target) -> str:
    return str(tvm_target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())


def _is_aarch64(tvm_target: tvm.target.Target) -> bool:
    return _triple(tvm_target).startswith(("aarch64", "arm64"))


@dataclass(frozen=True)
class VnniFamily:
    """x86 AVX512-VNNI GEMM (`passes.kernels.x86_vnni`), default tiles."""

    name: str = "x86-vnni"

    def kernel(self, rows: int, depth: int, cols: int) -> KernelPlan:
        tiles = x86_vnni.default_tiles(rows)
        reference = shifted_gemm(GemmShape(rows, depth, cols, tiles.rows, tiles.cols))
        scheduled = x86_vnni.schedule_gemm(reference, tiles).mod["main"]
        return KernelPlan(f"vnni_gemm_m{rows}_k{depth}_n{cols}", scheduled, reference)

    def operands(self, matmul: Int8Matmul) -> tuple[list[relax.Expr], np.ndarray | None]:
        packed = x86_vnni.pack_weights(matmul.weight, cols=x86_vnni.default_tiles(matmul.rows).cols)
        correction = np.zeros_like(packed.correction) if matmul.unsigned else packed.correction
        return [matmul.activation, relax.const(packed.data), relax.const(correction)], None


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
