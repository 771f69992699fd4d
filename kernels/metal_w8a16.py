"""W8A16 GEMV/GEMM for Apple GPUs (Metal): int8 weights dequantized in registers, float accumulation.

    Y[m, n] = (sum_k f32(X[m, k]) * f32(T(W_s8[k, n]))) * scale[n] (+ bias[n])     T = X's dtype

X is float16 or float32 (`T`); the int8 weight is converted to `T` as it is loaded (four at a time:
char4 -> half4; exact, |w| <= 127), each product is taken in float32 (exact: 11 + 8 significant bits)
and summed in float32; the per-column scale (and bias) are applied once per output, which is then
cast back to `T`. Apple GPUs have no int8 dot product or int8 SIMD-group matrix, so this is the form
INT8 weights take there: half the bytes of float16 weights, dequantized for free in the load.

Two hand-scheduled TIR PrimFuncs with the same parameters `(X[M, K], W_packed, scale[N], (bias[N],)
Y[M, N])`, weights zero padded at pack time (zeros add nothing), X loads and Y stores predicated:

- GEMV (decode, M = 1): W packed `[Np, Kp]` (each column's K contiguous). Threadgroups of `groups`
  SIMD-groups x `lanes` threads; a SIMD-group owns `cols` columns, lane l reads the char4 at
  k = 4 * (step * lanes + l) of each (one coalesced 128-byte run per column per step), and the lanes'
  partial sums meet in `tvm_thread_allreduce`, which TVM lowers to `simd_shuffle_down` on Metal (and
  to a local-memory tree on OpenCL). One row of X per threadgroup row (blockIdx.y), so any M works.
- GEMM (prefill): W packed `[Kp, Np]`. Threadgroups of `threads_n x threads_m` threads compute a
  `tile_m x tile_n` output tile (each thread `rows x cols`, strided by the thread counts); each K step
  stages X[tile_m, tile_k] and the dequantized W[tile_k, tile_n] in threadgroup memory (char4 loads
  along N), then every thread runs its register tile over the staged step.

Tiles come from the target's `schedule.gemv` (M = 1) and `schedule.gemm` (see `tiles_from_target`);
every size is a field of `GemvTiles` / `GemmTiles` so tuning can vary them. When K is not a multiple
of the vector width, X is read one element at a time (the weights keep their padded layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._gemm import round_up

if TYPE_CHECKING:
    from passes.targets._schema import TargetDescription
    from tvm.tirx import Buffer, PrimExpr, PrimFunc

ACTIVATION_DTYPES = ("float16", "float32")
"""Activation (and output) dtypes the kernels take."""
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class GemvTiles:
    """Decode: `groups` SIMD-groups of `lanes` threads per threadgroup, `cols` columns per SIMD-group,
    `vector` weights per load; one K step covers `lanes * vector * unroll` (= `tile_k`)."""

    lanes: int = 32
    groups: int = 4
    cols: int = 4
    vector: int = 4
    unroll: int = 1

    def __post_init__(self) -> None:
        if min(self.lanes, self.groups, self.cols, self.vector, self.unroll) < 1 or self.vector not in (1, 2, 4):
            raise ValueError(f"metal-w8a16: GEMV tile {self} needs positive sizes and vector 1, 2 or 4")

    @property
    def threads(self) -> int:
        return self.lanes * self.groups

    @property
    def tile_k(self) -> int:
        return self.lanes * self.vector * self.unroll

    @property
    def tile_n(self) -> int:
        return self.groups * self.cols


@dataclass(frozen=True)
class GemmTiles:
    """Prefill: `threads_n x threads_m` threads, each `rows x cols` outputs; K staged `tile_k` at a
    time; X read `vector` elements per load (the weights always four: char4)."""

    rows: int = 8
    cols: int = 1
    threads_m: int = 4
    threads_n: int = 32
    tile_k: int = 32
    vector: int = 4

    def __post_init__(self) -> None:
        if min(self.rows, self.cols, self.threads_m, self.threads_n, self.tile_k) < 1:
            raise ValueError(f"metal-w8a16: GEMM tile {self} needs positive sizes")
        if self.vector not in (1, 2, 4) or self.tile_k % 4 or self.tile_n % 4:
            raise ValueError(f"metal-w8a16: GEMM tile {self} needs vector 1, 2 or 4 and tile_k, tile_n multiples of 4")

    @property
    def threads(self) -> int:
        return self.threads_m * self.threads_n

    @property
    def tile_m(self) -> int:
        return self.rows * self.threads_m

    @property
    def tile_n(self) -> int:
        return self.cols * self.threads_n


Tiles = GemvTiles | GemmTiles


def tiles_from_target(target: TargetDescription, m: int) -> Tiles:
    """The target's starting tiles for M rows: `schedule.gemv` when M = 1 (work_group_y lanes,
    work_group_x SIMD-groups, tile_n columns per SIMD-group), else `schedule.gemm` (work_group_x x
    work_group_y threads over tile_n x tile_m); threadgroups are capped at `schedule.max_work_group`."""
    limit = target.schedule.max_work_group or 256
    if m == 1:
        gemv = target.schedule.gemv
        lanes = min(gemv.work_group_y or 32, limit)
        groups = max(1, min(gemv.work_group_x or 1, limit // lanes))
        vector = min(gemv.vector_width, 4)
        return GemvTiles(lanes, groups, gemv.tile_n, vector, max(1, gemv.tile_k // (lanes * vector)))
    gemm = target.schedule.gemm
    threads_n = min(gemm.work_group_x or 32, limit)
    threads_m = max(1, min(gemm.work_group_y or 1, limit // threads_n))
    cols = max(1, gemm.tile_n // threads_n)
    return GemmTiles(max(1, gemm.tile_m // threads_m), cols, threads_m, threads_n,
                     round_up(gemm.tile_k, 4), min(gemm.vector_width, 4))


def packed_shape(k: int, n: int, tiles: Tiles) -> tuple[int, int]:
    """GEMV: [Np, Kp]; GEMM: [Kp, Np] (K and N zero padded to the tiles)."""
    kp, np_ = round_up(k, tiles.tile_k), round_up(n, tiles.tile_n)
    return (np_, kp) if isinstance(tiles, GemvTiles) else (kp, np_)


def pack_weights(w: np.ndarray, tiles: Tiles) -> np.ndarray:
    """W_s8[K, N] -> the layout the kernel for `tiles` reads, zero padded."""
    if w.dtype != np.int8 or w.ndim != 2:
        raise ValueError(f"metal-w8a16: weights must be a 2-D int8 array, got {w.dtype} {w.shape}")
    k, n = w.shape
    out = np.zeros(packed_shape(k, n, tiles), np.int8)
    if isinstance(tiles, GemvTiles):
        out[:n, :k] = w.T
    else:
        out[:k, :n] = w
    return out


def reference(x: np.ndarray, w: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy: x @ (f32(w) * scale) (+ bias) in float32, cast to x's dtype."""
    y = x.astype(np.float32) @ (w.astype(np.float32) * scale.astype(np.float32))
    return (y if bias is None else y + bias.astype(np.float32)).astype(x.dtype)


@dataclass(frozen=True)
class _Params:
    x: Buffer
    w: Buffer
    scale: Buffer
    bias: Buffer | None
    y: Buffer

    def all(self) -> list[Buffer]:
        return [self.x, self.w, self.scale, *([self.bias] if self.bias is not None else []), self.y]

    def output(self, acc: PrimExpr, col: PrimExpr) -> PrimExpr:
        """T(acc * scale[col] (+ bias[col]))."""
        from tvm import tirx

        value = acc * self.scale[col]
        if self.bias is not None:
            value = value + self.bias[col]
        return tirx.Cast(self.y.dtype, value)

    def x_load(self, row: PrimExpr, start: PrimExpr, vec: int, k: int) -> PrimExpr:
        """f32 of X[row, start : start + vec], zero past K (`vec` divides K, so a load is all in or out)."""
        from tvm import tirx

        wide = f"float32x{vec}" if vec > 1 else "float32"
        loaded = self.x.vload([row, start], f"{self.x.dtype}x{vec}") if vec > 1 else self.x[row, start]
        zero = tirx.Broadcast(tirx.const(0, "float32"), vec) if vec > 1 else tirx.const(0, "float32")
        return tirx.if_then_else(start < k, tirx.Cast(wide, loaded), zero)

    def w_load(self, indices: list[PrimExpr], vec: int) -> PrimExpr:
        """W at `indices` (`vec` consecutive int8 along the last axis) dequantized to T."""
        from tvm import tirx

        loaded = self.w.vload(indices, f"int8x{vec}") if vec > 1 else self.w[tuple(indices)]
        return tirx.Cast(f"{self.x.dtype}x{vec}" if vec > 1 else self.x.dtype, loaded)


def _params(m: int, k: int, n: int, tiles: Tiles, dtype: str, bias: bool) -> _Params:
    from tvm import tirx

    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"metal-w8a16: activations must be one of {ACTIVATION_DTYPES}, got {dtype}")
    if min(m, k, n) < 1:
        raise ValueError(f"metal-w8a16: sizes must be positive, got M={m} K={k} N={n}")
    return _Params(tirx.decl_buffer((m, k), dtype, name="X"),
                   tirx.decl_buffer(packed_shape(k, n, tiles), "int8", name="W"),
                   tirx.decl_buffer((n,), "float32", name="scale"),
                   tirx.decl_buffer((n,), "float32", name="bias") if bias else None,
                   tirx.decl_buffer((m, n), dtype, name="Y"))


def w8a16_compute(m: int, k: int, n: int, tiles: Tiles, dtype: str = "float16", bias: bool = False) -> PrimFunc:
    """The unscheduled compute definition on the packed layout of `tiles` (the host reference)."""
    from tvm import te

    p = _params(m, k, n, tiles, dtype, bias)
    x, w = te.placeholder(p.x.shape, dtype, "X"), te.placeholder(p.w.shape, "int8", "W")
    scale = te.placeholder((n,), "float32", "scale")
    extra = [te.placeholder((n,), "float32", "bias")] if bias else []
    gemv = isinstance(tiles, GemvTiles)
    r = te.reduce_axis((0, k), "r")
    acc = te.compute((m, n), lambda i, j: te.sum(
        x[i, r].astype("float32") * (w[j, r] if gemv else w[r, j]).astype(dtype).astype("float32"), axis=r),
        name="acc")

    def out(i: PrimExpr, j: PrimExpr) -> PrimExpr:
        value = acc[i, j] * scale[j]
        return (value + extra[0][j] if bias else value).astype(dtype)

    y = te.compute((m, n), out, name="Y")
    return te.create_prim_func([x, w, scale, *extra, y])


def w8a16_matmul(m: int, k: int, n: int, tiles: Tiles, dtype: str = "float16", bias: bool = False) -> PrimFunc:
    """The scheduled PrimFunc `main(X[M, K], W_packed, scale[N], (bias[N],) Y[M, N])` for `tiles`."""
    from tvm import tirx

    p = _params(m, k, n, tiles, dtype, bias)
    body = _gemv_body(p, m, k, n, tiles) if isinstance(tiles, GemvTiles) else _gemm_body(p, m, k, n, tiles)
    return tirx.PrimFunc(p.all(), body).with_attr({"global_symbol": "main", "tirx.noalias": True})


def _x_vector(k: int, vector: int) -> int:
    """Elements of X per load: the tile's vector when it divides K (loads stay in the row), else 1."""
    return vector if k % vector == 0 else 1


def _dot(a: PrimExpr, b: PrimExpr, lanes: int) -> PrimExpr:
    """float32 dot product of two `lanes`-vectors (MSL and OpenCL both have `dot(floatN, floatN)`)."""
    from tvm import tirx

    if lanes == 1:
        return a * b
    return tirx.call_pure_extern("float32", "dot", a, b)


def _sum_reducer() -> object:
    from tvm import tirx

    lhs, rhs = tirx.Var("a", "float32"), tirx.Var("b", "float32")
    return tirx.CommReducer([lhs], [rhs], [lhs + rhs], [tirx.const(0, "float32")])


def _gemv_body(p: _Params, m: int, k: int, n: int, t: GemvTiles) -> object:
    """Lane l of SIMD-group g sums its K slice for `cols` columns; the lanes meet in an allreduce."""
    from tvm.script import tirx as T

    vec = _x_vector(k, t.vector)
    wide = f"float32x{vec}" if vec > 1 else "float32"
    steps = packed_shape(k, n, t)[1] // t.tile_k
    lanes, groups, cols = t.lanes, t.groups, t.cols
    blocks, per_step = round_up(n, t.tile_n) // t.tile_n, lanes * vec
    reducer, y = _sum_reducer(), p.y
    loads = t.tile_k // per_step  # loads per lane per step

    @T.prim_func(private=True, check_well_formed=False)
    def kernel() -> None:
        for bn in T.thread_binding(blocks, thread="blockIdx.x"):
            for row in T.thread_binding(m, thread="blockIdx.y"):
                for group in T.thread_binding(groups, thread="threadIdx.y"):
                    for lane in T.thread_binding(lanes, thread="threadIdx.x"):
                        acc = T.decl_buffer((cols,), "float32", scope="local")
                        for c in T.unroll(cols):
                            acc[c] = T.float32(0)
                        x_reg = T.decl_buffer((1,), wide, scope="local")
                        for step in range(steps):
                            for u in T.unroll(loads):
                                x_reg[0] = p.x_load(row, ((step * loads + u) * lanes + lane) * vec, vec, k)
                                for c in T.unroll(cols):
                                    acc[c] = acc[c] + _dot(x_reg[0], T.Cast(wide, p.w_load(
                                        [(bn * groups + group) * cols + c, ((step * loads + u) * lanes + lane) * vec],
                                        vec)), vec)
                        for c in range(cols):  # serial: TVM lowers one allreduce per loop body, not unrolled
                            total = T.decl_buffer((1,), "float32", scope="local")
                            with T.attr(reducer, "reduce_scope", T.reinterpret("handle", T.uint64(0))):
                                T.tvm_thread_allreduce(T.uint32(1), acc[c], T.bool(True), total[0], lane)
                            if lane == 0 and (bn * groups + group) * cols + c < n:
                                y[row, (bn * groups + group) * cols + c] = p.output(
                                    total[0], (bn * groups + group) * cols + c)

    return kernel.body


def _gemm_body(p: _Params, m: int, k: int, n: int, t: GemmTiles) -> object:
    """Stage X[tile_m, tile_k] and T(W[tile_k, tile_n]) in threadgroup memory, then register tiles."""
    from tvm import tirx
    from tvm.script import tirx as T

    vec, dtype = _x_vector(k, t.vector), p.x.dtype
    rows, cols, tm, tn, tile_k = t.rows, t.cols, t.threads_m, t.threads_n, t.tile_k
    tile_m, tile_n, threads = t.tile_m, t.tile_n, t.threads
    steps = packed_shape(k, n, t)[0] // tile_k
    x_loads, w_loads = tile_m * tile_k // vec, tile_k * tile_n // 4  # vectors per stage
    x_rounds, w_rounds = -(-x_loads // threads), -(-w_loads // threads)
    x_per_row, w_per_row = tile_k // vec, tile_n // 4
    x_vec = f"{dtype}x{vec}" if vec > 1 else dtype
    y = p.y

    def x_stage(bm: PrimExpr, step: PrimExpr, index: PrimExpr) -> PrimExpr:
        row, start = bm * tile_m + index // x_per_row, step * tile_k + index % x_per_row * vec
        zero = T.Broadcast(T.Cast(dtype, 0), vec) if vec > 1 else T.Cast(dtype, 0)
        loaded = p.x.vload([T.min(row, m - 1), start], x_vec) if vec > 1 else p.x[T.min(row, m - 1), start]
        return T.if_then_else(tirx.all(row < m, start < k), loaded, zero)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel() -> None:
        for bn in T.thread_binding(packed_shape(k, n, t)[1] // tile_n, thread="blockIdx.x"):
            for bm in T.thread_binding(-(-m // tile_m), thread="blockIdx.y"):
                for ty in T.thread_binding(tm, thread="threadIdx.y"):
                    for tx in T.thread_binding(tn, thread="threadIdx.x"):
                        x_tile = T.decl_buffer((tile_m * tile_k,), dtype, scope="shared")
                        w_tile = T.decl_buffer((tile_k * tile_n,), dtype, scope="shared")
                        acc = T.decl_buffer((rows * cols,), "float32", scope="local")
                        for a in T.unroll(rows * cols):
                            acc[a] = T.float32(0)
                        for step in range(steps):
                            for i in T.unroll(x_rounds):
                                if i * threads + ty * tn + tx < x_loads:
                                    x_tile[T.Ramp((i * threads + ty * tn + tx) * vec, 1, vec) if vec > 1 else
                                           i * threads + ty * tn + tx] = x_stage(bm, step, i * threads + ty * tn + tx)
                            for i in T.unroll(w_rounds):
                                if i * threads + ty * tn + tx < w_loads:
                                    w_tile[T.Ramp((i * threads + ty * tn + tx) * 4, 1, 4)] = p.w_load(
                                        [step * tile_k + (i * threads + ty * tn + tx) // w_per_row,
                                         bn * tile_n + (i * threads + ty * tn + tx) % w_per_row * 4], 4)
                            T.tvm_storage_sync("shared")
                            for kk in range(tile_k):
                                for r in T.unroll(rows):
                                    for c in T.unroll(cols):
                                        acc[r * cols + c] = acc[r * cols + c] + T.Cast(
                                            "float32", x_tile[(r * tm + ty) * tile_k + kk]) * T.Cast(
                                            "float32", w_tile[kk * tile_n + c * tn + tx])
                            T.tvm_storage_sync("shared")
                        for r in T.unroll(rows):
                            for c in T.unroll(cols):
                                if bm * tile_m + r * tm + ty < m and bn * tile_n + c * tn + tx < n:
                                    y[bm * tile_m + r * tm + ty, bn * tile_n + c * tn + tx] = p.output(
                                        acc[r * cols + c], bn * tile_n + c * tn + tx)

    return kernel.body
