"""W8A8 INT8 GEMM/GEMV for OpenCL GPUs (Adreno, Mali): char4 loads and a 4-way int8 dot per step.

    C_i32[m, n] = sum_k A_s8[m, k] * B_s8[k, n]
    optional epilogue: C_f32[m, n] = f32(C_i32[m, n]) * a_scale * w_scale[n] + bias[n]

Layouts (zero padded by `pack_activations` / `pack_weights`; zeros add nothing to the sums):
A is `[M, Kp]`, B is packed `[Kp/4, N, 4]` (four consecutive k of one column form one char4), with
Kp = K rounded up to the kernel's `tile_k`. Neighbouring threads read neighbouring columns, so each
step of a work-group reads one contiguous run of B (coalesced); dlight's [N, K] Adreno matmul is not
used (it emits invalid OpenCL).

The kernel is a hand-scheduled TIR PrimFunc: blockIdx.x/y tile N/M, threadIdx.x/y pick the thread's
columns/rows inside the tile, each thread keeps `rows x cols` int32 accumulators in `local` scope
(registers; no shared memory, as Mali wants) and walks K in steps of `tile_k` with the dot products
unrolled. Rows and columns past M and N are clamped on load and not stored. The dot product is the
extern `passes_dot4_acc` defined by `_opencl_dot.PRELUDE` (vendor builtin behind `#ifdef`, portable
fallback), which the OpenCL code generator's post-processing hook (`_opencl_dot.install_postproc`)
prepends to each kernel's source. `reference_matmul` is the same product unscheduled, for the host.

Tiles come from the target's `schedule.gemm` (prefill, M >= 16) / `schedule.gemv` (decode): a GEMM runs
`work_group_x x work_group_y` threads over columns x rows, each `tile_n / work_group_x` columns by
`tile_m / work_group_y` rows; a GEMV runs all `work_group_x * work_group_y` threads over columns (no
split of K across threads, which would need local memory), each `tile_n / work_group_x` columns.
Work-groups are capped at the target's thread limit (Mali: 64).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ._gemm import round_up
from ._opencl_dot import EXTERN, install_postproc, with_prelude

if TYPE_CHECKING:
    from passes.targets._schema import KernelTiles, TargetDescription
    from tvm.target import Target
    from tvm.tirx import PrimFunc

    from passes.lowering._tir import KernelLaunch

DOT = 4
"""int8 pairs per dot product (one char4)."""


@dataclass(frozen=True)
class OpenclTiles:
    """Per-thread register tile (`rows` x `cols` accumulators), threads per work-group along M and N,
    and the K step (`tile_k`, a multiple of 4: `tile_k / 4` dot products unrolled per step)."""

    rows: int = 1
    cols: int = 4
    threads_m: int = 1
    threads_n: int = 64
    tile_k: int = 16

    def __post_init__(self) -> None:
        if min(self.rows, self.cols, self.threads_m, self.threads_n) < 1 or self.tile_k % DOT or self.tile_k < DOT:
            raise ValueError(f"opencl-int8: tile {self} needs positive sizes and tile_k a multiple of {DOT}")

    @property
    def threads(self) -> int:
        return self.threads_m * self.threads_n


def tiles_from_target(target: TargetDescription, m: int, max_threads: int | None = None) -> OpenclTiles:
    """The target's starting tiles for M rows: `schedule.gemv` when M = 1, else `schedule.gemm`; work-groups
    capped at the smaller of `schedule.max_work_group` and `max_threads` (the TVM target's limit)."""
    limit = min((x for x in (target.schedule.max_work_group, max_threads) if x), default=256)
    if m == 1:
        return _tiles(target.schedule.gemv, limit, gemv=True)
    return _tiles(target.schedule.gemm, limit, gemv=False)


def _tiles(tiles: KernelTiles, limit: int, gemv: bool) -> OpenclTiles:
    wg_x, wg_y = tiles.work_group_x or 1, tiles.work_group_y or 1
    cols = max(1, tiles.tile_n // wg_x)
    tile_k = round_up(tiles.tile_k, DOT)
    if gemv:
        return OpenclTiles(1, cols, 1, min(wg_x * wg_y, limit), tile_k)
    threads_m = max(1, min(wg_y, limit // wg_x))
    rows = max(1, tiles.tile_m // wg_y)
    return OpenclTiles(rows, cols, threads_m, min(wg_x, limit), tile_k)


@dataclass(frozen=True)
class Epilogue:
    """Fused per-channel dequantisation: C_f32 = C_i32 * a_scale * w_scale[n] + bias[n]."""

    bias: bool = True


def padded_k(k: int, tiles: OpenclTiles) -> int:
    return round_up(k, tiles.tile_k)


def fit_tile_k(tiles: OpenclTiles, k: int) -> OpenclTiles:
    """`tiles` with `tile_k` lowered to the largest multiple of 4 that divides K rounded up to 4, so that
    activations need no padding beyond K's next multiple of 4 (none for K % 4 == 0)."""
    depth = round_up(k, DOT)
    fitted = next(t for t in range(min(tiles.tile_k, depth), 0, -DOT) if depth % t == 0)
    return replace(tiles, tile_k=fitted)


def pack_activations(a: np.ndarray, tiles: OpenclTiles) -> np.ndarray:
    """A_s8[M, K] -> [M, Kp], zero padded."""
    _check_int8(a, "activations")
    out = np.zeros((a.shape[0], padded_k(a.shape[1], tiles)), np.int8)
    out[:, : a.shape[1]] = a
    return out


def pack_weights(b: np.ndarray, tiles: OpenclTiles) -> np.ndarray:
    """B_s8[K, N] -> [Kp/4, N, 4] (B[4q + d, n] at [q, n, d]), zero padded along K."""
    _check_int8(b, "weights")
    k, n = b.shape
    padded = np.zeros((padded_k(k, tiles), n), np.int8)
    padded[:k] = b
    return np.ascontiguousarray(padded.reshape(-1, DOT, n).transpose(0, 2, 1))


def _check_int8(x: np.ndarray, what: str) -> None:
    if x.dtype != np.int8 or x.ndim != 2:
        raise ValueError(f"opencl-int8: {what} must be a 2-D int8 array, got {x.dtype} {x.shape}")


def int8_matmul(m: int, k: int, n: int, tiles: OpenclTiles, epilogue: Epilogue | None = None) -> PrimFunc:
    """The scheduled PrimFunc `main(A[M, Kp], B[Kp/4, N, 4], C_i32[M, N])`, or with an epilogue
    `main(A, B, a_scale_f32[1], w_scale_f32[N], (bias_f32[N],) C_f32[M, N])`."""
    from tvm import tirx
    from tvm.script import tirx as T

    kp = padded_k(k, tiles)
    rows, cols, tm, tn = tiles.rows, tiles.cols, tiles.threads_m, tiles.threads_n
    steps, unroll = kp // tiles.tile_k, tiles.tile_k // DOT
    blocks_m, blocks_n = -(-m // (tm * rows)), -(-n // (tn * cols))
    a = tirx.decl_buffer((m, kp), "int8", name="A")
    b = tirx.decl_buffer((kp // DOT, n, DOT), "int8", name="B")
    out_dtype = "int32" if epilogue is None else "float32"
    c = tirx.decl_buffer((m, n), out_dtype, name="C")
    scales = [] if epilogue is None else [tirx.decl_buffer((1,), "float32", name="a_scale"),
                                          tirx.decl_buffer((n,), "float32", name="w_scale")]
    if epilogue is not None and epilogue.bias:
        scales.append(tirx.decl_buffer((n,), "float32", name="bias"))

    def store(acc: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
        if epilogue is None:
            return acc
        value = T.Cast("float32", acc) * scales[0][0] * scales[1][col]
        return value + scales[2][col] if epilogue.bias else value

    @T.prim_func(private=True, check_well_formed=False)
    def kernel() -> None:
        for bn in T.thread_binding(blocks_n, thread="blockIdx.x"):
            for bm in T.thread_binding(blocks_m, thread="blockIdx.y"):
                for txn in T.thread_binding(tn, thread="threadIdx.x"):
                    for tym in T.thread_binding(tm, thread="threadIdx.y"):
                        acc = T.decl_buffer((rows * cols,), "int32", scope="local")
                        for x in T.unroll(rows * cols):
                            acc[x] = 0
                        for step in range(steps):
                            for u in T.unroll(unroll):
                                for r in T.unroll(rows):
                                    for s in T.unroll(cols):
                                        acc[r * cols + s] = T.call_pure_extern(
                                            "int32", EXTERN,
                                            a.vload([T.min((bm * rows + r) * tm + tym, m - 1),
                                                     (step * unroll + u) * DOT], "int8x4"),
                                            b.vload([step * unroll + u, T.min((bn * cols + s) * tn + txn, n - 1), 0],
                                                    "int8x4"),
                                            acc[r * cols + s])
                        for r in T.unroll(rows):
                            for s in T.unroll(cols):
                                if (bm * rows + r) * tm + tym < m and (bn * cols + s) * tn + txn < n:
                                    c[(bm * rows + r) * tm + tym, (bn * cols + s) * tn + txn] = store(
                                        acc[r * cols + s], (bn * cols + s) * tn + txn)

    params = [a, b, *scales, c]
    func = tirx.PrimFunc(params, kernel.body)
    return func.with_attr({"global_symbol": "main", "tirx.noalias": True})


def reference_matmul(m: int, k: int, n: int, tiles: OpenclTiles) -> PrimFunc:
    """The unscheduled compute definition with `int8_matmul`'s parameters (A[M, Kp], B[Kp/4, N, 4],
    C_i32[M, N]): what the host builds to check the OpenCL kernel against."""
    from tvm import te

    kp = padded_k(k, tiles)
    a = te.placeholder((m, kp), "int8", name="A")
    b = te.placeholder((kp // DOT, n, DOT), "int8", name="B")
    r = te.reduce_axis((0, kp), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(
        a[i, r].astype("int32") * b[r // DOT, j, r % DOT].astype("int32"), axis=r), name="C")
    return te.create_prim_func([a, b, c])


@dataclass(frozen=True)
class OpenclKernel:
    """One lowered kernel: its OpenCL C (prelude included), the NDRange launch, and its parameters."""

    m: int
    k: int
    n: int
    tiles: OpenclTiles
    epilogue: Epilogue | None
    source: str
    launch: KernelLaunch


def build_opencl(m: int, k: int, n: int, tiles: OpenclTiles, target: Target,
                 epilogue: Epilogue | None = None) -> OpenclKernel:
    """Lower `int8_matmul` for an OpenCL `target` and generate its source with the dot-product prelude."""
    from passes.lowering._schedule import max_threads
    from passes.lowering._tir import codegen, lower_kernels

    install_postproc()
    limit = max_threads(target)
    if limit and tiles.threads > limit:
        raise ValueError(f"opencl-int8: {tiles.threads} threads per work-group exceed the target's {limit}")
    lowered = lower_kernels({"main": int8_matmul(m, k, n, tiles, epilogue)}, target)
    (launch,) = lowered.launches["main"]
    source = with_prelude(codegen(lowered.device_module, target))
    return OpenclKernel(m, k, n, tiles, epilogue, source, launch)
