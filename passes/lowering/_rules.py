"""dlight rules adapted to a target description: tiles and work-group limits come from the target.

TVM 0.27's dlight rules pick their numbers by target kind (and by "android" in the host triple, so a
Mali phone gets Adreno's), some with fixed thread counts (GeneralReduction: 256 on OpenCL; the
Adreno GEMV: 128). The wrappers here keep every schedule within the target's work-group limit and
take the matmul tiling from `target.schedule.gemm`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

from passes.lowering._errors import LoweringError
from passes.lowering._tir import walk

#: work-group size dlight's GeneralReduction picks by target kind (0.27), and for other GPU kinds
_GENERAL_REDUCTION_THREADS = {"cuda": 256, "opencl": 256}
_GENERAL_REDUCTION_OTHER = 64
_BYTE_DTYPES = frozenset({"int8", "uint8"})


@dataclass(frozen=True)
class MatmulTiles:
    """A work-group's matmul tiling: threads along M and N, outputs per thread, K step, vector lanes."""

    threads_m: int
    threads_n: int
    per_thread_m: int
    per_thread_n: int
    step_k: int
    vector: int


def matmul_tiles(target: Any) -> MatmulTiles | None:
    """`target.schedule.gemm` as dlight tiling (None when it has no work-group shape, as on CPUs).

    gemm.tile_m x gemm.tile_n outputs per work-group of work_group_y (along M) x work_group_x (along N)
    threads; gemm.tile_k is the K step and gemm.vector_width the vector lanes.
    """
    gemm = getattr(getattr(target, "schedule", None), "gemm", None)
    if gemm is None or getattr(gemm, "work_group_x", None) is None or getattr(gemm, "work_group_y", None) is None:
        return None
    for tile, threads in (("tile_m", "work_group_y"), ("tile_n", "work_group_x")):
        if getattr(gemm, tile) % getattr(gemm, threads):
            raise LoweringError(f"target {target.name!r}: schedule.gemm.{tile} ({getattr(gemm, tile)}) is not a "
                                f"multiple of schedule.gemm.{threads} ({getattr(gemm, threads)})")
    return MatmulTiles(gemm.work_group_y, gemm.work_group_x, gemm.tile_m // gemm.work_group_y,
                       gemm.tile_n // gemm.work_group_x, gemm.tile_k, gemm.vector_width)


def _dlight_vector(tiles: MatmulTiles) -> int:
    """dlight's Matmul vectorizes the per-thread loops of both axes (and its write-back checks the
    wrong one), so its vector width must divide both per-thread tiles: their gcd with the target's."""
    return math.gcd(tiles.vector, tiles.per_thread_m, tiles.per_thread_n)


class ConfiguredMatmul(dl.gpu.Matmul):
    """dlight's Matmul with the target's tiles, shared memory only where the GPU has it, and at most
    `max_threads` threads per work-group (the wider thread axis halved until it fits).

    8-bit operands staged in shared memory are not vectorized: TVM 0.27's OpenCL code generator turns
    such a vector load into `convert_int4(<int>)`, which OpenCL compilers reject as ambiguous.
    """

    def __init__(self, tiles: MatmulTiles | None, use_shared: bool | None, max_threads: int,
                 *, vectorize: bool = True) -> None:
        super().__init__()
        self.tiles = tiles
        self.use_shared = use_shared
        self.max_threads = max_threads
        self.vectorize = vectorize

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Any:
        dtypes = {str(param.dtype) for param in func.params}
        # On Metal the rule first tries its simdgroup-matrix variant, which in 0.27 succeeds for float16
        # only and whose first use imports every tensor intrinsic TVM ships (~25 s); other dtypes go
        # straight to the generic path it falls back to anyway.
        if target.kind.name == "metal" and "float16" not in dtypes:
            target = generic_gpu(target, "opencl")
        if self.vectorize and dtypes & _BYTE_DTYPES and self.get_configs(target).use_shared:
            scalar = ConfiguredMatmul(self.tiles, self.use_shared, self.max_threads, vectorize=False)
            return scalar.apply(func, target, tunable)
        return super().apply(func, target, tunable)

    def get_configs(self, target: tvm.target.Target) -> dl.gpu.Matmul.Config:
        config = super().get_configs(target)
        if self.tiles is not None:
            config = _tiled(config, self.tiles)
        if self.use_shared is not None:
            config = dataclasses.replace(config, use_shared=self.use_shared)
        if not self.vectorize:
            config = dataclasses.replace(config, vector_size=1)
        while config.block_size_x * config.block_size_y > self.max_threads and max(config.block_size_x,
                                                                                    config.block_size_y) > 1:
            wider = "block_size_x" if config.block_size_x >= config.block_size_y else "block_size_y"
            config = dataclasses.replace(config, **{wider: getattr(config, wider) // 2})
        return config


def _tiled(config: dl.gpu.Matmul.Config, tiles: MatmulTiles) -> dl.gpu.Matmul.Config:
    """Tiles onto dlight's axes: with `inner_x` its y axis is M and x is N, otherwise x is M, y is N."""
    m_axis, n_axis = ("y", "x") if config.inner_x else ("x", "y")
    return dataclasses.replace(config, vthread_x=1, vthread_y=1, micro_size_k=tiles.step_k, vector_size=_dlight_vector(tiles),
                               **{f"block_size_{m_axis}": tiles.threads_m, f"micro_size_{m_axis}": tiles.per_thread_m,
                                  f"block_size_{n_axis}": tiles.threads_n, f"micro_size_{n_axis}": tiles.per_thread_n})


class CappedGeneralReduction(dl.gpu.GeneralReduction):
    """dlight's GeneralReduction (softmax, norms) within the work-group limit: when its 256 threads
    (OpenCL) are too many, it is asked for the 64-thread variant it uses on other GPU kinds."""

    def __init__(self, max_threads: int) -> None:
        super().__init__()
        self.max_threads = max_threads

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Any:
        if _GENERAL_REDUCTION_THREADS.get(target.kind.name, _GENERAL_REDUCTION_OTHER) > self.max_threads:
            if _GENERAL_REDUCTION_OTHER > self.max_threads:
                return None
            target = generic_gpu(target, "metal")
        return super().apply(func, target, tunable)


class WithinWorkGroup(dl.ScheduleRule):
    """A dlight rule whose schedules are dropped (so the next rule is tried) when they bind more
    threads per work-group than the target allows."""

    def __init__(self, rule: dl.ScheduleRule, max_threads: int) -> None:
        self.rule = rule
        self.max_threads = max_threads

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Any:
        result = self.rule.apply(func, target, tunable)
        schedules = result if isinstance(result, list) else [result] if result is not None else []
        if any(threads_per_group(sch.mod["main"]) > self.max_threads for sch in schedules):
            return None
        return result

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return self.rule.is_target_available(target)


def threads_per_group(func: tirx.PrimFunc) -> int:
    """Threads per work-group a scheduled PrimFunc launches with (product of threadIdx extents)."""
    extents: dict[str, int] = {}
    for node in walk(func.body):
        if isinstance(node, tirx.For) and node.thread_binding is not None:
            tag = str(node.thread_binding.thread_tag)
            if tag.startswith("threadIdx") and isinstance(node.extent, tirx.IntImm):
                extents[tag] = max(extents.get(tag, 1), int(node.extent))
    return math.prod(extents.values())


def generic_gpu(target: tvm.target.Target, kind: str) -> tvm.target.Target:
    """A target of `kind` with `target`'s thread and memory limits, to steer a rule's kind-based choice."""
    limits = {key: int(target.attrs[key]) for key in ("max_num_threads", "max_threads_per_block",
                                                      "max_shared_memory_per_block", "thread_warp_size")
              if key in target.attrs}
    return tvm.target.Target({"kind": kind, **limits})
