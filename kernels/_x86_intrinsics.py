"""The tensor intrinsics of the x86 INT8 kernels (`x86_int8`): one dot-product instruction each.

    vpdpbusd zmm   C[16] += sum_{k<4} u8(A[k]) * s8(B[16, k])   AVX512-VNNI
    vpdpbusd ymm   C[8]  += sum_{k<4} u8(A[k]) * s8(B[8, k])    AVX-VNNI (VEX-encoded, same LLVM intrinsic)
    vpmaddwd ymm   C[8]  += sum_{k<2} i16(A[k]) * i16(B[8, k])  AVX2 (B sign-extended from int8 in registers)

TVM's shipped `dot_16x4_vnni` passes the operands as `<16 x i32>`, which LLVM 22's `vpdpbusd.512`
(`<16 x i32>, <64 x i8>, <64 x i8>`) rejects; its `dot_16x4_avx512` and AVX2 intrinsics go through
`vpmaddubsw`, which saturates int16 pair sums (255 * -128 * 2 < -32768). These hand LLVM the vectors it
declares: A's `depth` values are read as one 32-bit word, broadcast to every lane and reinterpreted as
bytes (or int16 pairs), B's `lanes x depth` block is one vector load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm.tirx import PrimFunc

    from .x86_int8 import X86Isa


def register_intrinsic(isa: X86Isa) -> str:
    """Register `isa`'s dot-product intrinsic with TVM (once) and return its name."""
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(isa.intrin_name, allow_missing=True) is None:
        desc, impl = _vnni_functions(isa) if isa.shifted else _pmaddwd_functions(isa)
        TensorIntrin.register(isa.intrin_name, desc, impl)
    return isa.intrin_name


def _vnni_functions(isa: X86Isa) -> tuple[PrimFunc, PrimFunc]:
    """u8 x s8 -> i32 over `depth` = 4 bytes per lane: `vpdpbusd` on zmm (16 lanes) or ymm (8)."""
    from tvm.script import tirx as T

    lanes, depth, llvm = isa.lanes, isa.depth, isa.llvm_intrinsic
    width = lanes * depth

    desc = _description(lanes, depth, "uint8")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((depth,), "uint8", offset_factor=1),
        b: T.Buffer((lanes, depth), "int8", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:depth], b[0:lanes, 0:depth])
            T.writes(c[0:lanes])
            a_word = T.reinterpret(a.vload([0], f"uint8x{depth}"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_word, lanes), dtype=f"uint8x{width}")
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm),
                c.vload([0], dtype=f"int32x{lanes}"),
                a_bytes,
                b.vload([0, 0], dtype=f"int8x{width}"),
                dtype=f"int32x{lanes}",
            )

    return desc, impl


def _pmaddwd_functions(isa: X86Isa) -> tuple[PrimFunc, PrimFunc]:
    """i16 x s8 -> i32 over `depth` = 2 per lane: B's int8 block sign-extended to int16 (`vpmovsxbw`),
    multiplied with A's broadcast int16 pair and summed in pairs by `vpmaddwd`, then added (`vpaddd`)."""
    from tvm.script import tirx as T

    lanes, depth, llvm = isa.lanes, isa.depth, isa.llvm_intrinsic
    width = lanes * depth

    desc = _description(lanes, depth, "int16")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((depth,), "int16", offset_factor=1),
        b: T.Buffer((lanes, depth), "int8", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:depth], b[0:lanes, 0:depth])
            T.writes(c[0:lanes])
            a_word = T.reinterpret(a.vload([0], f"int16x{depth}"), dtype="int32")
            a_pairs = T.reinterpret(T.broadcast(a_word, lanes), dtype=f"int16x{width}")
            b_wide = T.Cast(f"int16x{width}", b.vload([0, 0], dtype=f"int8x{width}"))
            c[T.ramp(T.int32(0), 1, lanes)] = c.vload([0], dtype=f"int32x{lanes}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), a_pairs, b_wide, dtype=f"int32x{lanes}",
            )

    return desc, impl


def _description(lanes: int, depth: int, a_dtype: str) -> PrimFunc:
    """What every intrinsic computes: C[lanes] += sum_{k < depth} A[k] * B[lanes, k] in int32."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((depth,), a_dtype, offset_factor=1),
        b: T.Buffer((lanes, depth), "int8", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:depth], b[0:lanes, 0:depth])
            T.writes(c[0:lanes])
            for i, k in T.grid(lanes, depth):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    return desc
