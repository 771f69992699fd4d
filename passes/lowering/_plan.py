"""The plan types of the INT8 dispatch, shared by the dispatcher (`_dispatch`) and the kernel families
(`_dispatch_families`): what one dispatchable matmul is, what a family must provide, and what a kernel
for one (M', K, N) is. Kept apart so that neither of the two imports the other's internals in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tvm import relax, tirx

from passes.kernels._gemm import SHIFT


@dataclass(frozen=True)
class Int8Matmul:
    """One dispatchable matmul: the activation flattened to [M', K] int8 (shifted when it was uint8),
    the constant weight [K, N] int8, and whether the activation was uint8."""

    activation: relax.Expr
    rows: int
    weight: np.ndarray
    unsigned: bool

    @property
    def depth(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cols(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class KernelPlan:
    """A kernel for one (M', K, N): its PrimFunc name, the scheduled PrimFunc, and the reference."""

    name: str
    scheduled: tirx.PrimFunc
    reference: tirx.PrimFunc


class KernelFamily(Protocol):
    """A family of INT8 kernels for one target (see `_dispatch_families`)."""

    name: str

    def kernel(self, rows: int, depth: int, cols: int) -> KernelPlan:
        """The kernel computing C_i32[rows, cols] = A_s8[rows, depth] @ W_s8[depth, cols]."""
        ...

    def operands(self, matmul: Int8Matmul) -> tuple[list[relax.Expr], np.ndarray | None]:
        """The kernel's inputs for `matmul`, and the int32 [N] to add to its result (None: nothing)."""
        ...


def uint8_correction(weight: np.ndarray) -> np.ndarray:
    """128 * sum_k W[k, n] as int32: what matmul(a_u8 - 128, W) lacks of matmul(a_u8, W)."""
    return (SHIFT * weight.astype(np.int32).sum(axis=0, dtype=np.int32)).astype(np.int32)
