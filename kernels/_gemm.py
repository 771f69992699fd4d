"""W8A8 GEMM compute definition shared by the INT8 kernels: C_i32[M, N] = sum_k A_s8[M, K] * B_s8[K, N].

Weights arrive pre-packed as `[Np/16, Kp/4, 16, 4]` (16 output columns x 4 reduction steps = 64 bytes,
the operand of one 512-bit int8 dot product). The compute is written for dot products that are
unsigned x signed (x86 VNNI `vpdpbusd`): activations are shifted to u8 by +128 and the shift is undone
by a per-column correction computed when the weights are packed:

    sum_k A[m,k] B[k,n] = sum_k (A[m,k] + 128) B[k,n] - 128 * sum_k B[k,n]

Padding: K is padded to a multiple of 4 and N to a multiple of the column tile with zero weights, M to a
multiple of the row tile with zero activations; the padded rows and columns are never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm.tirx import PrimFunc

LANES = 16
"""Output columns of one dot-product instruction (int32 lanes of a 512-bit register)."""
DEPTH = 4
"""Reduction steps of one dot-product instruction (int8 pairs summed per int32 lane)."""
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

    def __post_init__(self) -> None:
        if min(self.m, self.k, self.n, self.row_tile) < 1:
            raise ValueError(f"int8 gemm: sizes must be positive, got {self}")
        if self.col_tile % LANES:
            raise ValueError(
                f"int8 gemm: column tile {self.col_tile} is not a multiple of {LANES}"
            )

    @property
    def m_padded(self) -> int:
        return round_up(self.m, self.row_tile)

    @property
    def k_padded(self) -> int:
        return round_up(self.k, DEPTH)

    @property
    def n_padded(self) -> int:
        return round_up(self.n, self.col_tile)

    @property
    def packed_weight_shape(self) -> tuple[int, int, int, int]:
        return (self.n_padded // LANES, self.k_padded // DEPTH, LANES, DEPTH)


def shifted_gemm(shape: GemmShape) -> PrimFunc:
    """The PrimFunc `main(A_s8[M,K], B_packed, correction_i32[Np], C_i32[M,N])`.

    Stages (block names the schedules use): `shift` (A + 128 as u8, zero padded to [Mp, Kp]),
    `gemm` (u8 x s8 -> i32 over the padded sizes), `output` (gemm - correction, cropped to [M, N]).
    """
    from tvm import te, tirx

    m, k, n = shape.m, shape.k, shape.n
    a = te.placeholder((m, k), "int8", name="A")
    b = te.placeholder(shape.packed_weight_shape, "int8", name="B")
    correction = te.placeholder((shape.n_padded,), "int32", name="correction")

    def shift(i: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
        inside = tirx.all(i < m, j < k)
        shifted = (
            a[tirx.min(i, m - 1), tirx.min(j, k - 1)].astype("int32") + SHIFT
        ).astype("uint8")
        return tirx.Select(inside, shifted, tirx.const(0, "uint8"))

    a_u8 = te.compute((shape.m_padded, shape.k_padded), shift, name="shift")
    r = te.reduce_axis((0, shape.k_padded), name="r")
    gemm = te.compute(
        (shape.m_padded, shape.n_padded),
        lambda i, j: te.sum(
            a_u8[i, r].astype("int32")
            * b[j // LANES, r // DEPTH, j % LANES, r % DEPTH].astype("int32"),
            axis=r,
        ),
        name="gemm",
    )
    out = te.compute((m, n), lambda i, j: gemm[i, j] - correction[j], name="output")
    return te.create_prim_func([a, b, correction, out])
