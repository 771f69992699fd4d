"""Schedules follow the target description: one work-group limit for every rule, matmul tiles from
`schedule.gemm`, and a clear error when a kernel would be left without thread bindings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from passes.lowering import LoweringError
from tests.lowering import lowered_sample, target

pytestmark = pytest.mark.slow


def _prim_func(build_relax):  # -> tirx.PrimFunc: the one PrimFunc LegalizeOps makes of a single op
    from tvm import relax, tirx

    module = relax.transform.LegalizeOps()(build_relax(relax))
    (func,) = [f for f in module.functions.values() if isinstance(f, tirx.PrimFunc)]
    return func


def _gemv_int8(relax):
    builder = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((1, 64), "int8"))
    w = relax.Var("w", relax.TensorType((64, 48), "int8"))
    with builder.function("main", [a, w]):
        builder.emit_func_output(builder.emit(relax.op.matmul(a, w, out_dtype="int32")))
    return builder.get()


def _softmax(relax):
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 16, 16), "float32"))
    with builder.function("main", [x]):
        builder.emit_func_output(builder.emit(relax.op.nn.softmax(x, axis=-1)))
    return builder.get()


def _mali_like(limit: int):  # -> tvm.target.Target
    import tvm

    return tvm.target.Target({"kind": "opencl", "device": "mali", "max_num_threads": limit,
                              "max_threads_per_block": limit}, host={"kind": "llvm", "mtriple": "aarch64-linux-android"})


def test_work_group_limit_is_written_into_the_tvm_target() -> None:
    from passes.lowering._schedule import max_threads, with_work_group_limit

    mali = target("tensor-g3").tvm_target()
    assert (int(mali.attrs["max_num_threads"]), int(mali.attrs["max_threads_per_block"])) == (64, 256)
    limited = with_work_group_limit(mali, 64)
    assert (int(limited.attrs["max_num_threads"]), int(limited.attrs["max_threads_per_block"])) == (64, 64)
    assert str(limited.host) == str(mali.host) and limited.keys == mali.keys
    assert max_threads(with_work_group_limit(target("sd8gen2").tvm_target(), 128)) == 128
    host = target("host").tvm_target()
    assert with_work_group_limit(host, 64).same_as(host)


@pytest.mark.parametrize(("name", "limit"), [("tensor-g3", 64), ("dimensity9200", 64), ("sd8gen2", 256), ("a16", 256)])
def test_every_kernel_of_the_sample_stays_within_the_work_group_limit(name: str, limit: int) -> None:
    from passes.lowering._rules import threads_per_group

    lowered = lowered_sample(name)
    threads = {func_name: threads_per_group(func) for func_name, func in lowered.kernels.items()}
    assert max(threads.values()) <= limit, threads
    if limit == 64:  # the reductions that dlight gives 256 threads on OpenCL now get 64
        assert threads["softmax"] == 64


@pytest.mark.parametrize("name", ["sd8gen2", "tensor-g3", "a16"])
def test_matmul_work_groups_follow_schedule_gemm(name: str) -> None:
    from passes.lowering._rules import threads_per_group

    gemm = target(name).schedule.gemm
    lowered = lowered_sample(name)
    matmuls = [func for func_name, func in lowered.kernels.items() if func_name.startswith(("matmul", "fused_matmul"))]
    assert matmuls
    assert {threads_per_group(func) for func in matmuls} == {gemm.work_group_x * gemm.work_group_y}


def test_gemm_tiles_map_onto_dlight_axes() -> None:
    from tvm.s_tir import dlight as dl

    from passes.lowering._rules import ConfiguredMatmul, MatmulTiles, matmul_tiles

    tiles = matmul_tiles(target("sd8gen2"))  # tile 32 x 64 over 8 (M) x 16 (N) threads, K step 32, 4 lanes
    assert tiles == MatmulTiles(threads_m=8, threads_n=16, per_thread_m=4, per_thread_n=4, step_k=32, vector=4)
    adreno = ConfiguredMatmul(tiles, False, 256).get_configs(target("sd8gen2").tvm_target())
    assert (adreno.inner_x, adreno.block_size_y, adreno.block_size_x, adreno.micro_size_k) == (True, 8, 16, 32)
    assert (adreno.micro_size_y, adreno.micro_size_x, adreno.vector_size, adreno.use_shared) == (4, 4, 4, False)
    metal = ConfiguredMatmul(matmul_tiles(target("a16")), True, 256).get_configs(target("a16").tvm_target())
    # without inner_x dlight's x axis is M; 32 x 32 over 4 (M) x 32 (N) threads leaves 1 output per thread
    # along N, so the vector width drops to gcd(4, 8, 1) = 1
    assert (metal.inner_x, metal.block_size_x, metal.micro_size_x, metal.block_size_y, metal.micro_size_y) == \
        (False, 4, 8, 32, 1)
    assert metal.vector_size == 1 and metal.use_shared
    capped = ConfiguredMatmul(tiles, None, 64).get_configs(target("sd8gen2").tvm_target())
    assert capped.block_size_x * capped.block_size_y == 64
    assert matmul_tiles(target("host")) is None and isinstance(dl.gpu.Matmul.Config(), dl.gpu.Matmul.Config)


def test_gemm_tiles_that_do_not_divide_are_refused() -> None:
    from passes.lowering._rules import matmul_tiles

    gemm = SimpleNamespace(tile_m=32, tile_n=60, tile_k=16, vector_width=4, work_group_x=16, work_group_y=8)
    with pytest.raises(LoweringError, match=r"target 'mine': schedule.gemm.tile_n \(60\) is not a multiple of "
                                            r"schedule.gemm.work_group_x \(16\)"):
        matmul_tiles(SimpleNamespace(name="mine", schedule=SimpleNamespace(gemm=gemm)))


def test_rules_over_the_limit_give_way_to_the_next_rule() -> None:
    from tvm.s_tir import dlight as dl

    from passes.lowering._rules import WithinWorkGroup, threads_per_group

    func, mali = _prim_func(_gemv_int8), _mali_like(64)
    # dlight's GEMV takes the Adreno path for any Android host and launches 128 threads
    assert threads_per_group(dl.gpu.GEMV().apply(func, mali, False).mod["main"]) == 128
    assert WithinWorkGroup(dl.gpu.GEMV(), 64).apply(func, mali, False) is None
    assert WithinWorkGroup(dl.gpu.GEMV(), 128).apply(func, mali, False) is not None


def test_general_reduction_is_capped_to_the_limit() -> None:
    from tvm.s_tir import dlight as dl

    from passes.lowering._rules import CappedGeneralReduction, threads_per_group

    func, mali = _prim_func(_softmax), _mali_like(64)
    assert threads_per_group(dl.gpu.GeneralReduction().apply(func, mali, False).mod["main"]) == 256
    assert threads_per_group(CappedGeneralReduction(64).apply(func, mali, False).mod["main"]) == 64
    assert CappedGeneralReduction(32).apply(func, mali, False) is None
    assert threads_per_group(CappedGeneralReduction(256).apply(func, mali, False).mod["main"]) == 256


def test_kernels_no_rule_schedules_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from passes.lowering import _schedule, lower
    from tests.lowering import sample_model

    monkeypatch.setattr(_schedule, "gpu_rules", lambda target, tvm_target: [])
    with pytest.raises(LoweringError, match=r"no dlight rule could schedule .*softmax.* for target 'sd8gen2'; "
                                            r"these kernels would have no thread bindings"):
        lower(sample_model(), target("sd8gen2"))


def test_cpu_targets_schedule_every_kernel() -> None:
    """No kernel of a CPU build is left as TVM's naive loops: the dispatched INT8 ones and the rest alike."""
    for name in ("sd8gen2:cpu", "host"):
        lowered = lowered_sample(name)
        assert lowered.device == "cpu"
        unscheduled = [k for k, func in lowered.kernels.items() if not (func.attrs or {}).get("tirx.is_scheduled")]
        assert unscheduled == [], name