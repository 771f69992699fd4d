"""int8 matmuls of a lowered model go to the AArch64 INT8 kernels (`passes.kernels.arm_int8`) for the
`:cpu` variants: smmla where the CPU has i8mm (sd8gen2:cpu), sdot where it has dotprod only (sd888:cpu).

Structure: every MatMulInteger of the static-W8A8 sample becomes a call of an `arm_smmla_gemm_*`
kernel (`LoweredModel.dispatched`) whose assembly holds `smmla` and no int8 multiply fallback (each
dispatched PrimFunc compiled on its own: the whole sample's aarch64 assembly takes ~50 s to generate);
a single-matmul model's whole assembly holds `sdot` for sd888:cpu.
Numerics (integers: no tolerance):
- each dispatched kernel of the built sample, compiled on its own for the target, runs under
  `qemu-aarch64` (the static C driver of tests/kernels/test_arm_int8.py) on the weights packed exactly
  as the dispatcher packs them, and equals numpy's int32 matmul; skipped without qemu-user and
  gcc-aarch64-linux-gnu. (The whole model cannot run here: it needs an aarch64 TVM runtime.)
- the dispatch rewrite around the kernels (uint8 shift, packing, +128 * colsum correction) is checked
  end to end on this CPU with the ARM family's operands and its reference kernels (`OnHost`): outputs
  equal onnxruntime's bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from tests.kernels.test_arm_int8 import _run_under_qemu, driver, needs_qemu  # noqa: F401 (driver: a fixture)
from tests.lowering import target
from tests.lowering.test_dispatch import (
    assert_bit_exact_with_reference,
    lower_on_host_with,
    matmul_integer_model,
    quantized_sample,
)

pytestmark = pytest.mark.slow

S8, U8 = TensorProto.INT8, TensorProto.UINT8
SMMLA_TARGET, SDOT_TARGET = "sd8gen2:cpu", "sd888:cpu"
INT8_FALLBACK = re.compile(r"\b(?:(?:smull2?|smlal2?|sxtl2?|sshll2?|saddw2?|mla)\s+v\d+|ldrsb\s)")
"""An int8 multiply without the instruction: NEON widening multiplies on v registers, or scalar sign-extending
byte loads (`ldrsb`, which a scalar int8 MAC needs). Unlike tests/kernels' FALLBACK it allows a bare scalar
`madd`: with the targets' 8 x 8 register block LLVM uses one for an address."""
SAMPLE_SHAPES = ((16, 176, 64), (16, 64, 192), (16, 64, 256), (16, 64, 352), (16, 64, 64))


@cache
def _built(name: str, made_key: str = "sample"):  # -> BuiltModel
    from passes.lowering import build, lower

    made = quantized_sample() if made_key == "sample" else _CASES[made_key]()
    return build(lower(made, target(name)), target(name))


def _assembly(built) -> str:
    def walk(module) -> Iterator:
        yield module
        for imported in module.imports:
            yield from walk(imported)

    return "".join(module.inspect_source("asm") for module in walk(built.executable.mod) if module.kind == "llvm")


@cache
def _compiled(name: str, made_key: str, kernel: str) -> Any:
    """One dispatched PrimFunc of the built model, compiled on its own for the target (the whole
    model's aarch64 assembly takes ~50 s to generate for the sample)."""
    import tvm

    lowered = _built(name, made_key).lowered
    func = lowered.kernels[kernel].with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=lowered.tvm_target)


def _family(name: str) -> Any:
    from passes.lowering._dispatch_families import choose_family

    return choose_family(target(name), target(name).tvm_target())


def test_every_int8_matmul_of_the_sample_goes_to_an_smmla_kernel() -> None:
    from passes.lowering._dispatch import Dispatched

    lowered = _built(SMMLA_TARGET).lowered
    kernels = tuple(sorted(f"arm_smmla_gemm_m{m}_k{k}_n{n}" for m, k, n in SAMPLE_SHAPES))
    assert lowered.int8_matmuls == sum(node.op_type == "MatMulInteger" for node in quantized_sample().graph.node) == 9
    assert dict(lowered.dispatched) == {"arm-smmla": Dispatched(9, kernels)}
    assert all(lowered.kernels[kernel].attrs["tirx.is_scheduled"] for kernel in kernels)
    assert not any("tirx.is_scheduled" in (lowered.reference_kernels[k].attrs or {}) for k in kernels)
    for kernel in kernels:
        asm = _compiled(SMMLA_TARGET, "sample", kernel).mod.inspect_source("asm")
        assert re.search(r"\bsmmla\s+v\d+", asm) and not re.search(r"\bsdot\s+v\d+", asm)
        assert not INT8_FALLBACK.search(asm), INT8_FALLBACK.search(asm)


def test_a_dotprod_only_cpu_gets_sdot_kernels() -> None:
    from passes.lowering._dispatch import Dispatched

    built = _built(SDOT_TARGET, "u8-zero-point")
    assert dict(built.lowered.dispatched) == {"arm-sdot": Dispatched(1, ("arm_sdot_gemm_m16_k64_n48",))}
    asm = _assembly(built)  # the whole model's host code: one matmul, cheap to generate
    assert re.search(r"\bsdot\s+v\d+", asm) and not re.search(r"\bsmmla\s+v\d+", asm)


@dataclass(frozen=True)
class _DispatchedKernel:
    """What `_run_under_qemu` needs: the kernel's compiled module and the dispatcher's weight packing."""

    module: Any
    family: Any
    rows: int

    def pack(self, weight: np.ndarray) -> np.ndarray:
        from tvm import relax

        from passes.lowering._dispatch import Int8Matmul

        activation = relax.Var("a", relax.TensorType((self.rows, weight.shape[0]), "int8"))
        (_, packed), correction = self.family.operands(Int8Matmul(activation, self.rows, weight, unsigned=False))
        assert correction is None
        return packed.value.numpy()


@needs_qemu
@pytest.mark.parametrize(("name", "made_key", "shapes"), [
    (SMMLA_TARGET, "sample", SAMPLE_SHAPES),
    (SDOT_TARGET, "u8-zero-point", ((16, 64, 48),)),
], ids=["smmla-sample", "sdot"])
def test_dispatched_kernels_are_bit_exact_under_qemu(name: str, made_key: str, shapes: tuple,
                                                     driver: Path, tmp_path: Path) -> None:  # noqa: F811
    """The built model's own scheduled PrimFuncs, int8 operands over the whole range."""
    family = _family(name)
    for m, k, n in shapes:
        module = _compiled(name, made_key, f"arm_{family.instruction.name}_gemm_m{m}_k{k}_n{n}")
        rng = np.random.default_rng(m * 7919 + k * 31 + n)
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        work = tmp_path / f"m{m}_k{k}_n{n}"
        work.mkdir()
        got = _run_under_qemu(_DispatchedKernel(module, family, m), a, b, driver, work)
        np.testing.assert_array_equal(got, a.astype(np.int32) @ b.astype(np.int32))


_CASES = {
    "u8-zero-point": lambda: matmul_integer_model((1, 16, 64), 48, U8, a_zero=131),
    "gemv-odd-u8": lambda: matmul_integer_model((1, 1, 37), 20, U8),  # M' = 1, K % 8 != 0
    "rank4-s8": lambda: matmul_integer_model((2, 3, 5, 24), 33, S8, seed=2),  # M' = 30, signed
}


@pytest.mark.parametrize("name", [SMMLA_TARGET, SDOT_TARGET])
@pytest.mark.parametrize("case", sorted(_CASES))
def test_the_dispatch_rewrite_equals_onnxruntime_on_the_host(name: str, case: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    made = _CASES[case]()
    built = lower_on_host_with(_family(name), made, monkeypatch)
    assert built.lowered.dispatched[_family(name).name].matmuls == 1
    assert_bit_exact_with_reference(built, made, range(2))


def test_tiles_come_from_the_target_rounded_to_the_instruction() -> None:
    from passes.kernels import arm_int8

    described = target(SMMLA_TARGET)  # gemm 8 x 8, gemv 1 x 16
    assert arm_int8.tiles_from_target(described, 16, arm_int8.SMMLA) == arm_int8.ArmTiles(8, 8)
    assert arm_int8.tiles_from_target(described, 1, arm_int8.SMMLA) == arm_int8.ArmTiles(2, 16)
    assert arm_int8.tiles_from_target(described, 1, arm_int8.SDOT) == arm_int8.ArmTiles(1, 16)
