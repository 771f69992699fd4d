"""int8 matmuls of a lowered model run on the x86 INT8 kernels, whichever x86-64 CPU builds them.

Every family is built here from a target whose LLVM CPU has it (`x86_target(mcpu)`): AVX512-VNNI
(znver4), AVX-VNNI (alderlake), AVX2 only (znver3), and baseline x86-64 (no family: Relax matmuls,
legalized to exact int32 loops). The assembly of each is checked on any machine; a build runs only
where this CPU has the family's feature (else the test is skipped, naming it). Outputs are compared bit
for bit with the exact reference (`passes.numerics.verify.run_model`: integer matmuls widened, never onnxruntime's
saturating u8 x s8 kernels) on int8/uint8 feeds over their whole range."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.lowering import (
    onnx_model,
    random_int8,
    run_reference,
    sample_feeds,
    sample_model,
    target,
    x86_target,
)

pytestmark = pytest.mark.slow

S8, U8 = TensorProto.INT8, TensorProto.UINT8


#: (LLVM CPU, the family its int8 matmuls get, kernel name prefix, the instruction its assembly must show)
X86_CPUS = [
    ("znver4", "x86-vnni", "vnni_gemm_", r"\tvpdpbusd\t[^\n]*%zmm"),
    ("alderlake", "x86-avxvnni", "avxvnni_gemm_", r"\{vex\}\tvpdpbusd\t[^\n]*%ymm"),
    ("znver3", "x86-avx2", "avx2_gemm_", r"\tvpmaddwd\t[^\n]*%ymm"),
    ("x86-64", None, None, None),
]
X86_IDS = [cpu for cpu, *_ in X86_CPUS]


def runs_here(family: str | None) -> bool:
    """Whether this CPU can execute code built for `family` (None: baseline x86-64, always)."""
    from passes.kernels import x86_int8

    return family is None or x86_int8.has_feature(x86_int8.isa_named(family))


def skip_unless_runs_here(family: str | None) -> None:
    if not runs_here(family):
        from passes.kernels import x86_int8

        pytest.skip(f"this CPU has no {x86_int8.isa_named(family).feature} to run {family} kernels on "
                    f"(built and checked, not executed)")


@cache
def quantized_sample() -> onnx.ModelProto:
    """The frozen tiny-llama with static W8A8 (9 MatMulInteger: uint8 activations, int8 weights)."""
    from passes.transforms.quantize_int8 import QuantizeInt8

    return QuantizeInt8(scheme="w8a8-static")(sample_model()).model


def _lower_and_build(made: onnx.ModelProto, description: Any = None):  # -> BuiltModel
    from passes.lowering import build, lower

    description = description or target("host")
    return build(lower(made, description), description)


def _assert_bit_exact(built, made: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    from passes.lowering import run_host

    got = run_host(built, feeds)
    for name, value in run_reference(made, feeds).items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)


def _x86_kernels(built) -> list[str]:
    return sorted(name for name in built.lowered.kernels if "_gemm_m" in name)


def _host_assembly(built) -> str:
    def walk(module) -> Iterator:
        yield module
        for imported in module.imports:
            yield from walk(imported)

    return "".join(module.inspect_source("asm") for module in walk(built.executable.mod) if module.kind == "llvm")


def matmul_integer_model(a_shape: tuple[int, ...], n: int, a_type: int, *, a_zero: int | None = None,
                         w_type: int = S8, constant_weight: bool = True, seed: int = 0) -> onnx.ModelProto:
    """y = MatMulInteger(a[a_shape], W[K, n] (an initializer or a graph input), a_zero?)."""
    rng = np.random.default_rng(seed)
    k = a_shape[-1]
    weight = numpy_helper.from_array(random_int8(rng, w_type, (k, n)), "w")
    inputs = [helper.make_tensor_value_info("a", a_type, list(a_shape))]
    inits = [weight] if constant_weight else []
    if not constant_weight:
        inputs.append(helper.make_tensor_value_info("w", w_type, [k, n]))
    names = ["a", "w"]
    if a_zero is not None:
        names.append("a_zero")
        inits.append(numpy_helper.from_array(np.array(a_zero).astype(np.uint8 if a_type == U8 else np.int8), "a_zero"))
    node = helper.make_node("MatMulInteger", names, ["y"], name="mmi")
    out = helper.make_tensor_value_info("y", TensorProto.INT32, [*a_shape[:-1], n])
    return onnx_model([node], inputs, [out], inits)


def _feeds(made: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {value.name: random_int8(rng, value.type.tensor_type.elem_type,
                                    [d.dim_value for d in value.type.tensor_type.shape.dim])
            for value in made.graph.input}


@pytest.mark.parametrize(("mcpu", "family", "prefix", "instruction"), X86_CPUS, ids=X86_IDS)
def test_quantized_sample_dispatch_on_every_x86_cpu(mcpu: str, family: str | None, prefix: str | None,
                                                     instruction: str | None) -> None:
    """Static W8A8 tiny-llama (1, 16): every int8 matmul goes to the CPU's family, the assembly shows its
    instruction and never the saturating `vpmaddubsw`; where this CPU runs it, int32 math is exact, so
    logits equal the exact reference's."""
    made = quantized_sample()
    assert sum(node.op_type == "MatMulInteger" for node in made.graph.node) == 9
    built = _lower_and_build(made, x86_target(mcpu))
    assembly = _host_assembly(built)
    assert "vpmaddubsw" not in assembly
    if family is None:
        assert _x86_kernels(built) == [] and dict(built.lowered.dispatched) == {}
        assert built.lowered.int8_matmuls == 9
    else:
        assert built.lowered.dispatched[family].matmuls == 9
        assert list(built.lowered.dispatched[family].kernels) == _x86_kernels(built)
        assert _x86_kernels(built) == [f"{prefix}m16_k176_n64", f"{prefix}m16_k64_n192", f"{prefix}m16_k64_n256",
                                       f"{prefix}m16_k64_n352", f"{prefix}m16_k64_n64"]
        assert all(built.lowered.kernels[name].attrs["tirx.is_scheduled"] for name in _x86_kernels(built))
        assert re.search(instruction, assembly)
    skip_unless_runs_here(family)
    for seed in range(2):
        _assert_bit_exact(built, made, sample_feeds(seed))


def test_only_x86_llvm_targets_get_x86_families() -> None:
    from passes.kernels import x86_int8
    from passes.lowering._dispatch_families import x86_isa

    assert x86_isa(target("sd8gen2:cpu").tvm_target()) is None  # aarch64 llvm
    assert x86_isa(target("sd8gen2").tvm_target()) is None  # opencl
    assert x86_isa(target("host").tvm_target()) == x86_int8.best_isa()
    assert [x86_isa(x86_target(cpu).tvm_target()) for cpu in X86_IDS] == [
        x86_int8.VNNI, x86_int8.AVX_VNNI, x86_int8.AVX2, None]


@pytest.mark.parametrize("mcpu", X86_IDS)
@pytest.mark.parametrize(("a_shape", "n", "a_type", "a_zero"), [
    ((1, 16, 64), 192, S8, None),  # the sample's shape, signed activations
    ((1, 1, 5), 3, S8, None),  # decode M = 1; K not a multiple of 4, N below one vector
    ((2, 3, 7, 33), 70, U8, 131),  # rank 4 flattened to M = 42; odd sizes; zero point
    ((9, 20), 17, U8, None),  # rank-2 activation, M not a multiple of the 4-row tile
])
def test_matmul_integer_dispatches_bit_exact(mcpu: str, a_shape: tuple[int, ...], n: int, a_type: int,
                                             a_zero: int | None) -> None:
    """int32 results over the whole int8 / uint8 range equal the exact reference's bit for bit."""
    _, family, prefix, _ = X86_CPUS[X86_IDS.index(mcpu)]
    skip_unless_runs_here(family)
    made = matmul_integer_model(a_shape, n, a_type, a_zero=a_zero)
    built = _lower_and_build(made, x86_target(mcpu))
    m, k = int(np.prod(a_shape[:-1])), a_shape[-1]
    assert _x86_kernels(built) == ([f"{prefix}m{m}_k{k}_n{n}"] if family else [])
    _assert_bit_exact(built, made, _feeds(made))


@pytest.mark.parametrize("mcpu", ["znver3", "x86-64"])
def test_saturating_products_are_exact(mcpu: str) -> None:
    """u8 255 x s8 -128 everywhere: each pair of products is -65280, past int16 (what `vpmaddubsw`
    would clamp to -32768); the build must give 255 * -128 * K exactly."""
    made = matmul_integer_model((1, 8, 512), 64, U8)
    weight = np.full((512, 64), -128, np.int8)
    made.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w"))
    feeds = {"a": np.full((1, 8, 512), 255, np.uint8)}
    from passes.lowering import run_host

    got = run_host(_lower_and_build(made, x86_target(mcpu)), feeds)["y"]
    np.testing.assert_array_equal(got, np.full((1, 8, 64), 255 * -128 * 512, np.int32))
    np.testing.assert_array_equal(run_reference(made, feeds)["y"], got)


@pytest.mark.parametrize(("w_type", "constant_weight"), [(U8, True), (S8, False)],
                         ids=["uint8-weight", "weight-is-an-input"])
def test_matmuls_the_kernel_cannot_take_stay_relax_matmuls(w_type: int, constant_weight: bool) -> None:
    made = matmul_integer_model((1, 8, 12), 20, S8, w_type=w_type, constant_weight=constant_weight)
    built = _lower_and_build(made)
    assert _x86_kernels(built) == [] and built.lowered.int8_matmuls == 1
    _assert_bit_exact(built, made, _feeds(made))


@dataclass(frozen=True)
class OnHost:
    """A kernel family whose kernels are its references (unscheduled compute definitions): the dispatch
    rewrite (flattening, uint8 shift, padding, weight packing, correction) with kernels that build and
    run on this CPU, so a dispatched model can be compared with the exact reference end to end."""

    inner: Any

    @property
    def name(self) -> str:
        return self.inner.name

    def kernel(self, rows: int, depth: int, cols: int) -> Any:
        plan = self.inner.kernel(rows, depth, cols)
        return dataclasses.replace(plan, scheduled=plan.reference)

    def operands(self, matmul: Any) -> Any:
        return self.inner.operands(matmul)


def lower_on_host_with(family: Any, made: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch):  # -> BuiltModel
    """Lower + build `made` for the host with `OnHost(family)` as the host's kernel family."""
    from passes.lowering import _dispatch

    monkeypatch.setattr(_dispatch, "choose_family", lambda target, tvm_target: OnHost(family))
    return _lower_and_build(made)


def assert_bit_exact_with_reference(built, made: onnx.ModelProto, seeds: range = range(1)) -> None:
    """Every output of the host build equals the exact reference's bit for bit, for int8/uint8 feeds drawn over
    their whole range (the sample's token ids from `sample_feeds`)."""
    for seed in seeds:
        feeds = sample_feeds(seed) if made.graph.input[0].name == "input_ids" else _feeds(made, seed)
        _assert_bit_exact(built, made, feeds)
