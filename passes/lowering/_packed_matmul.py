"""Float matmuls with constant weights, for CPU (llvm) targets: the weight packed into column panels once,
at lowering, instead of on every call.

    matmul(x[.., M, K], W[K, N])  ->  y[.., i, j] = sum_k x[.., i, k] * P[j / t, k, j % t]
                                      P[p, k, c] = W[k, p*t + c]          (a constant, laid out here)

The default matmul schedule (`_cpu_rules.CpuMatmul`) gives each thread whole `t`-column panels and
streams a panel's K x t block once per row tile; with a row-major W it first copied each panel out
contiguous, on every call (a 1024 x 5472 weight: 22 MB read and written before any multiply). Packed at
lowering, the kernel reads the panels where they lie: 128 x 1024 x 5472 went from 166-198 to 225-236
GMAC/s on 2 AVX-512 threads (onnxruntime's MLAS, which also packs at load: 196). `t` is the column tile
the schedule picks (`vector_tile` of the target's `schedule.float_gemm`); the schedule recognises a B of
shape [N / t, K, t] (`_cpu_rules._in_panels`, which survives fusion with an epilogue, unlike a function
attribute) and copies nothing. The sums are the same products in the same order as the unpacked kernel's.

Only multi-row float32 matmuls whose weight is a 2-D constant change: decode's one-row matmuls are packed
for the GEMV tile in the graph (`pack-matmul-weights`), other dtypes keep TVM's legalization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tvm
from tvm import relax, te

from passes.kernels import cpu_w8a16

def legalize_map(target: Any) -> dict[str, Callable[[relax.BlockBuilder, relax.Call], relax.Expr]]:
    """`LegalizeOps(customize_legalize_map=...)` entries for an llvm target with a float GEMM tile."""
    tiles = getattr(getattr(target, "schedule", None), "float_gemm", None)
    if tiles is None:
        return {}

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        packed = _packed(bb, call, tiles)
        return packed if packed is not None else call.op.get_attr("FLegalize")(bb, call)

    return {"relax.matmul": legalize}


def _packed(bb: relax.BlockBuilder, call: relax.Call, tiles: Any) -> relax.Expr | None:
    from passes.lowering._cpu_rules import vector_tile

    x, weight = call.args
    kinds = [getattr(x, "ty", None), getattr(weight, "ty", None), call.ty]
    if not isinstance(weight, tvm.ir.GenericConst) or not all(isinstance(k, relax.TensorType) for k in kinds):
        return None
    if any(k.dtype != "float32" for k in kinds) or len(weight.value.shape) != 2 or kinds[0].shape is None:
        return None
    dims = [int(d) if hasattr(d, "value") or isinstance(d, int) else None for d in kinds[0].shape.values]
    if len(dims) < 2 or None in dims:
        return None
    depth, cols = (int(d) for d in weight.value.shape)
    if dims[-2] <= tiles.tile_m or dims[-1] != depth:
        return None  # one row tile (decode, as the schedule decides it): `pack-matmul-weights` lays those out
    panel = vector_tile(cols, tiles.tile_n, tiles.vector_width)
    values = cpu_w8a16.pack_weights(weight.value.numpy(), panel)  # the same column panels, any dtype

    def compute(a: te.Tensor, p: te.Tensor) -> te.Tensor:
        r = te.reduce_axis((0, depth), name="k")
        return te.compute((*dims[:-1], cols), lambda *i: te.sum(
            a[(*i[:-1], r)] * p[i[-1] // panel, r, i[-1] % panel], axis=r), name="T_matmul")

    return bb.call_te(compute, x, relax.const(values), primfunc_name_hint="matmul")
