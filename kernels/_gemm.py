"""W8A8 GEMM compute definitions shared by the x86 INT8 kernels: C_i32[M, N] = sum_k A_s8[M, K] * B_s8[K, N].

Weights arrive pre-packed as `[Np/lanes, Kp/depth, lanes, depth]`: `lanes` output columns (the int32
lanes of one vector register) x `depth` reduction steps (the int8 products one instruction sums into a
lane); 16 x 4 = 64 bytes is the operand of one 512-bit `vpdpbusd`. Two forms:

- `shifted_gemm`, for dot products that are unsigned x signed (x86 VNNI `vpdpbusd`): activations are
  shifted to u8 by +128 and the shift is undone by a per-column correction computed when the weights
  are packed:

      sum_k A[m,k] B[k,n] = sum_k (A[m,k] + 128) B[k,n] - 128 * sum_k B[k,n]

- `widened_gemm`, for AVX2 without VNNI: activations are widened to int16 and multiplied with the
  (sign-extended) weights by `vpmaddwd`, whose int16 x int16 pair sums land in int32 and cannot saturate
  (|a * b| <= 2^14, two of them < 2^31). No shift, no correction.

Padding: K is padded to a multiple of 4 and N to a multiple of the column tile with zero weights, M to a
multiple of the row tile with zero activations; the padded rows and columns are never stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tvm.tirx import PrimFunc

LANES = 16
"""Output columns of one 512-bit dot-product instruction (its int32 lanes); the default of `GemmShape`."""
DEPTH = 4
"""Reduction steps of one `vpdpbusd` (int8 products summed per int32 lane); the default of `GemmShape`."""
SHIFT = 128
"""Added to every int8 activation to make it a u8 operand."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class GemmShape:
    """Logical sizes of one GEMM and the padded sizes its tiles need."""

    m: int
    k: int
    n: int
    row_tile: int
    col_tile: int
    lanes: int = LANES
    depth: int = DEPTH

    def __post_init__(self) -> None:
        if min(self.m, self.k, self.n, self.row_tile, self.lanes, self.depth) < 1:
            raise ValueError(f"int8 gemm: sizes must be positive, got {self}")
        if self.col_tile % self.lanes:
            raise ValueError(
                f"int8 gemm: column tile {self.col_tile} is not a multiple of {self.lanes}"
            )

    @property
    def m_padded(self) -> int:
        return round_up(self.m, self.row_tile)

    @property
    def k_padded(self) -> int:
        return round_up(self.k, self.depth)

    @property
    def n_padded(self) -> int:
        return round_up(self.n, self.col_tile)

    @property
    def packed_weight_shape(self) -> tuple[int, int, int, int]:
        return (self.n_padded // self.lanes, self.k_padded // self.depth, self.lanes, self.depth)


def shifted_gemm(shape: GemmShape) -> PrimFunc:
    """The PrimFunc `main(A_s8[M,K], B_packed, correction_i32[Np], C_i32[M,N])`.

    Stages (block names the schedules use): `shift` (A + 128 as u8, zero padded to [Mp, Kp]),
    `gemm` (u8 x s8 -> i32 over the padded sizes), `output` (gemm - correction, cropped to [M, N]).
    """
    from tvm import te, tirx

    a, b = _operands(shape)
    correction = te.placeholder((shape.n_padded,), "int32", name="correction")

    def shifted(value: tirx.PrimExpr) -> tirx.PrimExpr:
        return (value.astype("int32") + SHIFT).astype("uint8")

    a_u8 = _padded(shape, a, "shift", "uint8", shifted)
    gemm = _gemm(shape, a_u8, b)
    out = te.compute((shape.m, shape.n), lambda i, j: gemm[i, j] - correction[j], name="output")
    return te.create_prim_func([a, b, correction, out])


def widened_gemm(shape: GemmShape) -> PrimFunc:
    """The PrimFunc `main(A_s8[M,K], B_packed, C_i32[M,N])`.

    Stages: `widen` (A as int16, zero padded to [Mp, Kp]), `gemm` (i16 x s8 -> i32 over the padded
    sizes), `output` (gemm cropped to [M, N]).
    """
    from tvm import te

    a, b = _operands(shape)
    a_i16 = _padded(shape, a, "widen", "int16", lambda value: value.astype("int16"))
    gemm = _gemm(shape, a_i16, b)
    out = te.compute((shape.m, shape.n), lambda i, j: gemm[i, j], name="output")
    return te.create_prim_func([a, b, out])


def _operands(shape: GemmShape) -> tuple[Any, Any]:
    from tvm import te

    return (te.placeholder((shape.m, shape.k), "int8", name="A"),
            te.placeholder(shape.packed_weight_shape, "int8", name="B"))


def _padded(shape: GemmShape, a: Any, name: str, dtype: str, convert: Callable[[Any], Any]) -> Any:
    """`convert(A)` zero padded to [Mp, Kp]."""
    from tvm import te, tirx

    m, k = shape.m, shape.k

    def element(i: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
        inside = tirx.all(i < m, j < k)
        return tirx.Select(inside, convert(a[tirx.min(i, m - 1), tirx.min(j, k - 1)]), tirx.const(0, dtype))

    return te.compute((shape.m_padded, shape.k_padded), element, name=name)


def _gemm(shape: GemmShape, a: Any, b: Any) -> Any:
    from tvm import te

    lanes, depth = shape.lanes, shape.depth
    r = te.reduce_axis((0, shape.k_padded), name="r")
    return te.compute(
        (shape.m_padded, shape.n_padded),
        lambda i, j: te.sum(
            a[i, r].astype("int32") * b[j // lanes, r // depth, j % lanes, r % depth].astype("int32"),
            axis=r,
        ),
        name="gemm",
    )
