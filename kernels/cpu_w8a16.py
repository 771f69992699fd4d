"""W8A16 matmul for CPUs (llvm: x86 and the phones' ARM cores): float activations, int8 weights widened
to float in registers, per-column scales applied once per output.

    y[m, n] = (sum_k x[m, k] * float(P[n / t, k, n % t])) * scale[n]        P = W[K, N] packed in t-column panels

Decoding reads every weight once per token, so its speed is the weight bytes over the memory bandwidth:
int8 weights are a quarter of float32's bytes. The weights are packed as `pack-matmul-weights` packs
float ones (P[p, k, j] = W[k, p*t + j]: each panel one contiguous K x t block a thread streams), each
thread takes whole panels, and for each row keeps the panel's t sums in vector registers over K (t = 64:
four AVX-512 or eight AVX2 / NEON vectors). The sums are float32 products of the same operands a float
matmul of the dequantized weight W * scale sums, scaled after the sum instead of before: equal to it up
to float rounding.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

#: panel widths tried, widest first (the columns must be a multiple of one)
PANELS = (64, 32, 16)


def panel_for(n: int) -> int | None:
    """The widest panel that divides `n`, else None (the matmul is not dispatched)."""
    return next((t for t in PANELS if n % t == 0), None)


def pack_weights(w: np.ndarray, panel: int) -> np.ndarray:
    """W[K, N] -> P[N / panel, K, panel], contiguous (any dtype: `passes.lowering._packed_matmul` packs float
    weights the same way)."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // panel, panel).transpose(1, 0, 2))


def reference(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64 y = x @ (W * scale), the value the kernel rounds."""
    return x.astype(np.float64) @ (w.astype(np.float64) * scale.astype(np.float64))


def w8a16_compute(m: int, k: int, n: int, panel: int) -> tirx.PrimFunc:
    """The unscheduled kernel (its reference on this machine)."""
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n // panel, k, panel), "int8", name="w")
    scale = te.placeholder((n,), "float32", name="scale")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j // panel, r, j % panel].astype("float32"), axis=r),
                     name="acc")
    y = te.compute((m, n), lambda i, j: acc[i, j] * scale[j], name="y")
    return te.create_prim_func([x, w, scale, y]).with_attr("tirx.noalias", True)


def row_tile(m: int, panel: int, tile_m: int, tile_n: int) -> int:
    """Rows one panel pass accumulates together: the target's float register tile (`tile_m` x `tile_n`
    floats) spent on `panel`-wide rows, cut to a divisor of `m` (1 for decode)."""
    want = max(1, tile_m * tile_n // panel)
    return next(size for size in range(min(m, want), 0, -1) if m % size == 0)


def w8a16_matmul(m: int, k: int, n: int, panel: int, rows: int = 1) -> tirx.PrimFunc:
    """Scheduled: panels in parallel; per `rows` rows (`row_tile`), the panel's sums of each row in
    registers over K, each step's weights widened once for all of them; scale on the way out. One row at a
    time (decode) reads each weight once; a prefill's row tile widens each weight once per `rows` rows
    instead of once per row (the conversion, not the FMA, bounded a one-row loop)."""
    from tvm.script import from_source

    if m % rows:
        raise ValueError(f"row tile {rows} does not divide {m} rows")
    source = f"""
# from tvm.script import tirx as T
@T.prim_func(private=True)
def cpu_w8a16(x: T.Buffer(({m}, {k}), "float32"), w: T.Buffer(({n // panel}, {k}, {panel}), "int8"),
              scale: T.Buffer(({n},), "float32"), y: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True}})
    for p in T.parallel({n // panel}):
        for io in range({m // rows}):
            acc = T.decl_buffer(({rows}, {panel}), "float32", scope="local")
            wide = T.decl_buffer(({panel},), "float32", scope="local")
            for ii in T.unroll({rows}):
                for j in T.vectorized({panel}):
                    acc[ii, j] = T.float32(0)
            for r in range({k}):
                for j in T.vectorized({panel}):
                    wide[j] = T.Cast("float32", w[p, r, j])
                for ii in T.unroll({rows}):
                    for j in T.vectorized({panel}):
                        acc[ii, j] = acc[ii, j] + x[io * {rows} + ii, r] * wide[j]
            for ii in T.unroll({rows}):
                for j in T.vectorized({panel}):
                    y[io * {rows} + ii, p * {panel} + j] = acc[ii, j] * scale[p * {panel} + j]
"""
    return from_source(source)
