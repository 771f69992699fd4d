"""int8 matmuls of a lowered model run on the x86 AVX512-VNNI kernel for host targets whose CPU has it:
the quantized sample and single MatMulInteger models are bit-exact with onnxruntime, the built module
holds the kernels (`vnni_gemm_*` PrimFuncs, `vpdpbusd` in the host assembly), and without VNNI (or for
another architecture) the old path stays."""

from __future__ import annotations

import dataclasses
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
    run_onnxruntime,
    sample_feeds,
    sample_model,
    target,
)

pytestmark = pytest.mark.slow

S8, U8 = TensorProto.INT8, TensorProto.UINT8


def _host_has_vnni() -> bool:
    from passes.kernels.x86_vnni import has_vnni

    return has_vnni(target("host").tvm_target())


needs_vnni = pytest.mark.skipif(not _host_has_vnni(), reason="this CPU has no AVX512-VNNI to run the kernel on")


@cache
def quantized_sample() -> onnx.ModelProto:
    """The frozen tiny-llama with static W8A8 (9 MatMulInteger: uint8 activations, int8 weights)."""
    from passes.transforms.quantize_int8 import QuantizeInt8

    return QuantizeInt8(scheme="w8a8-static")(sample_model()).model


def _lower_and_build(made: onnx.ModelProto):  # -> BuiltModel
    from passes.lowering import build, lower

    return build(lower(made, target("host")), target("host"))


def _assert_bit_exact(built, made: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    from passes.lowering import run_host

    got = run_host(built, feeds)
    for name, value in run_onnxruntime(made, feeds).items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)


def _vnni_kernels(built) -> list[str]:
    return sorted(name for name in built.lowered.kernels if name.startswith("vnni_gemm_"))


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


@needs_vnni
def test_quantized_sample_runs_vnni_kernels_bit_exact_with_onnxruntime() -> None:
    """Static W8A8 tiny-llama (1, 16): every int8 matmul dispatched, int32 math exact, so logits equal ORT's."""
    from passes.lowering._dispatch import dispatch_to
    from passes.lowering._dispatch_families import VnniFamily
    from passes.lowering._relax import import_onnx

    made = quantized_sample()
    assert sum(node.op_type == "MatMulInteger" for node in made.graph.node) == 9
    imported = import_onnx(made)
    assert imported.int8_matmuls == dispatch_to(imported.module, VnniFamily()).matmuls == 9
    built = _lower_and_build(made)
    assert built.lowered.dispatched["x86-vnni"].matmuls == 9
    assert list(built.lowered.dispatched["x86-vnni"].kernels) == _vnni_kernels(built)
    assert _vnni_kernels(built) == ["vnni_gemm_m16_k176_n64", "vnni_gemm_m16_k64_n192", "vnni_gemm_m16_k64_n256",
                                    "vnni_gemm_m16_k64_n352", "vnni_gemm_m16_k64_n64"]
    assert all(built.lowered.kernels[name].attrs["tirx.is_scheduled"] for name in _vnni_kernels(built))
    assert "vpdpbusd" in _host_assembly(built)
    for seed in range(2):
        _assert_bit_exact(built, made, sample_feeds(seed))


def test_without_vnni_the_int8_matmuls_stay_relax_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    from passes.kernels import x86_vnni

    monkeypatch.setattr(x86_vnni, "has_vnni", lambda target=None: False)
    built = _lower_and_build(quantized_sample())
    assert _vnni_kernels(built) == [] and dict(built.lowered.dispatched) == {}
    assert built.lowered.int8_matmuls == 9
    _assert_bit_exact(built, quantized_sample(), sample_feeds(0))


def test_only_x86_llvm_targets_with_vnni_dispatch() -> None:
    from passes.lowering._dispatch_families import target_has_vnni

    assert not target_has_vnni(target("sd8gen2:cpu").tvm_target())  # aarch64 llvm
    assert not target_has_vnni(target("sd8gen2").tvm_target())  # opencl
    assert target_has_vnni(target("host").tvm_target()) == _host_has_vnni()


@needs_vnni
@pytest.mark.parametrize(("a_shape", "n", "a_type", "a_zero"), [
    ((1, 16, 64), 192, S8, None),  # the sample's shape, signed activations
    ((1, 1, 5), 3, S8, None),  # decode M = 1; K not a multiple of 4, N below one 16-lane vector
    ((2, 3, 7, 33), 70, U8, 131),  # rank 4 flattened to M = 42; odd sizes; zero point
    ((9, 20), 17, U8, None),  # rank-2 activation, M not a multiple of the 4-row tile
])
def test_matmul_integer_dispatches_bit_exact(a_shape: tuple[int, ...], n: int, a_type: int,
                                             a_zero: int | None) -> None:
    """int32 results over the whole int8 / uint8 range equal onnxruntime's bit for bit."""
    made = matmul_integer_model(a_shape, n, a_type, a_zero=a_zero)
    built = _lower_and_build(made)
    m, k = int(np.prod(a_shape[:-1])), a_shape[-1]
    assert _vnni_kernels(built) == [f"vnni_gemm_m{m}_k{k}_n{n}"]
    _assert_bit_exact(built, made, _feeds(made))


@needs_vnni
@pytest.mark.parametrize(("w_type", "constant_weight"), [(U8, True), (S8, False)],
                         ids=["uint8-weight", "weight-is-an-input"])
def test_matmuls_the_kernel_cannot_take_stay_relax_matmuls(w_type: int, constant_weight: bool) -> None:
    made = matmul_integer_model((1, 8, 12), 20, S8, w_type=w_type, constant_weight=constant_weight)
    built = _lower_and_build(made)
    assert _vnni_kernels(built) == [] and built.lowered.int8_matmuls == 1
    _assert_bit_exact(built, made, _feeds(made))



@dataclass(frozen=True)
class OnHost:
    """A kernel family whose kernels are its references (unscheduled compute definitions): the dispatch
    rewrite (flattening, uint8 shift, padding, weight packing, correction) with kernels that build and
    run on this CPU, so a dispatched model can be compared with onnxruntime end to end."""

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
    from passes.lowering import _dispatch_families

    monkeypatch.setattr(_dispatch_families, "choose_family", lambda target, tvm_target: OnHost(family))
    return _lower_and_build(made)


def assert_bit_exact_with_onnxruntime(built, made: onnx.ModelProto, seeds: range = range(1)) -> None:
    """Every output of the host build equals onnxruntime's bit for bit, for int8/uint8 feeds drawn over
    their whole range (the sample's token ids from `sample_feeds`)."""
    for seed in seeds:
        feeds = sample_feeds(seed) if made.graph.input[0].name == "input_ids" else _feeds(made, seed)
        _assert_bit_exact(built, made, feeds)
