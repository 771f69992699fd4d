"""The in-place KV-cache write: the kernel stores the new rows at their slots and nothing else (a slot
outside the cache writes nothing), and only a scatter into a cache parameter nothing else reads is
made in place."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from passes.lowering._kv_inplace import _write_kernel, write_caches_in_place
from passes.targets import load_target


@pytest.mark.parametrize("gpu", [False, True])
def test_the_kernel_writes_the_slots_and_only_them(gpu: bool) -> None:
    func = _write_kernel((1, 2, 8, 4), (1, 2, 2, 4), 2, "float32", "int64", gpu)
    if gpu:  # the GPU form binds threads; its source is checked, the CPU form runs
        assert "blockIdx.x" in func.script() and "threadIdx.x" in func.script()
        return
    library = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                          load_target("host").tvm_target())
    before = np.random.default_rng(0).standard_normal((1, 2, 8, 4)).astype(np.float32)
    cache = tvm.runtime.tensor(before)
    slots = np.broadcast_to(np.array([3, 99]).reshape(1, 1, 2, 1), (1, 2, 2, 4)).copy()  # 99: out of the cache
    new = np.full((1, 2, 2, 4), 7.0, np.float32)
    library["main"](cache, tvm.runtime.tensor(slots), tvm.runtime.tensor(new))
    expected = before.copy()
    expected[:, :, 3] = 7.0
    np.testing.assert_array_equal(cache.numpy(), expected)


def _module(read_twice: bool) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    cache = relax.Var("cache", relax.TensorType((1, 2, 8, 4), "float32"))
    slots = relax.Var("slots", relax.TensorType((1, 2, 1, 4), "int64"))
    new = relax.Var("new", relax.TensorType((1, 2, 1, 4), "float32"))
    with bb.function("main", [cache, slots, new]):
        with bb.dataflow():
            written = bb.emit(relax.op.scatter_elements(cache, slots, new, axis=2))
            out = bb.emit_output(relax.op.add(written, cache) if read_twice else written)
        bb.emit_func_output(out)
    return bb.get()


def test_only_a_parameter_nothing_else_reads_is_written_in_place() -> None:
    updated, count = write_caches_in_place(_module(read_twice=False), gpu=False)
    assert count == 1 and "call_tir_inplace" in updated.script()
    untouched, count = write_caches_in_place(_module(read_twice=True), gpu=False)
    assert count == 0 and "scatter_elements" in untouched.script()
