"""Default CPU schedules (`passes.lowering._cpu_rules`): every kernel class of an llvm build is scheduled
from the target description's `schedule.float_gemm` (`float_gemv` for decode), stays exact (float32: K-tiling reassociates sums,
rtol 1e-4 / atol 1e-4 x max |C|, seeded inputs), and the ARM build uses NEON vector FMA."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lowering import built_sample, target

tvm = pytest.importorskip("tvm")

pytestmark = pytest.mark.slow


def _matmul(batch: int, m: int, k: int, n: int, transposed: bool):  # -> PrimFunc
    from tvm import te

    a = te.placeholder((batch, m, k), name="A")
    b = te.placeholder((batch, n, k) if transposed else (batch, k, n), name="B")
    r = te.reduce_axis((0, k), name="r")
    read = (lambda s, j, q: b[s, j, q]) if transposed else (lambda s, j, q: b[s, q, j])
    c = te.compute((batch, m, n), lambda s, i, j: te.sum(a[s, i, r] * read(s, j, r), axis=r), name="C")
    d = te.compute((batch, m, n), lambda s, i, j: c[s, i, j] * 0.5 + 1.0, name="D")
    return te.create_prim_func([a, b, d])


def _scheduled(func, rule_target: str = "host"):  # -> (Schedule, tvm target)
    from passes.lowering._schedule import cpu_rules

    described = target(rule_target)
    tvm_target = described.tvm_target()
    matmul, loops = cpu_rules(described)
    with tvm_target:
        sch = matmul.apply(func, tvm_target, False)
    return sch, tvm_target, loops


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 4, 7, 16, 33]), st.sampled_from([8, 24, 130]),
       st.sampled_from([16, 48, 70, 96]), st.booleans(), st.integers(0, 2**16))
def test_property_matmul_schedule_matches_numpy(batch: int, m: int, k: int, n: int, transposed: bool,
                                                seed: int) -> None:
    sch, tvm_target, _ = _scheduled(_matmul(batch, m, k, n, transposed))
    assert sch is not None
    script = sch.mod.script()
    assert "T.parallel" in script and "T.vectorized" in script
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    b = rng.standard_normal((batch, n, k) if transposed else (batch, k, n)).astype(np.float32)
    module = tvm.compile(sch.mod, target=tvm_target)
    out = tvm.runtime.tensor(np.zeros((batch, m, n), np.float32))
    module(tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    expected = (a @ (b.transpose(0, 2, 1) if transposed else b)) * 0.5 + 1.0
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_tiles_come_from_the_target_description() -> None:
    sch, _, _ = _scheduled(_matmul(1, 16, 1024, 5472, False))
    loops = [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("C_update"))]
    host = target("host").schedule.float_gemm
    # 5472 has no 64-column divisor that is whole vectors; 48 is: 3 vectors of vector_width, tile_m rows
    assert loops[-3:] == [host.tile_m, 48 // host.vector_width, host.vector_width]
    assert host.tile_k in loops  # 1024 steps of tile_k


def test_a_decode_matmul_takes_the_gemv_tiles() -> None:
    # one row (M = 1): 512-column panels streamed once, from schedule.float_gemv
    sch, _, _ = _scheduled(_matmul(1, 1, 1024, 4096, False))
    loops = [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("C_update"))]
    gemv = target("host").schedule.float_gemv
    assert gemv is not None and gemv.tile_n != target("host").schedule.float_gemm.tile_n
    assert loops[-2:] == [gemv.tile_n // gemv.vector_width, gemv.vector_width]
    assert loops[0] == 4096 // gemv.tile_n and gemv.tile_k in loops


def test_a_reduction_that_is_not_a_matmul_is_left_to_the_loop_rule() -> None:
    from tvm import te

    x = te.placeholder((8, 64), name="X")
    r = te.reduce_axis((0, 64), name="r")
    total = te.compute((8,), lambda i: te.sum(x[i, r], axis=r), name="S")
    func = te.create_prim_func([x, total])
    sch, tvm_target, loops = _scheduled(func)
    assert sch is None
    scheduled = loops.apply(func, tvm_target, False)
    assert "T.parallel" in scheduled.mod.script()


def test_arm_cpu_build_uses_neon_fma_without_sve() -> None:
    built = built_sample("sd8gen2:cpu")

    def walk(module):
        yield module
        for imported in module.imports:
            yield from walk(imported)

    asm = "".join(m.inspect_source("asm") for m in walk(built.executable.mod) if m.kind == "llvm")
    assert re.search(r"\tfmla\tv\d+\.4s", asm), "no NEON vector FMA in the fp32 kernels"
    assert not re.search(r"\bz\d+\.[sbhd]\b", asm), "SVE registers in a Snapdragon build (SVE is off there)"
