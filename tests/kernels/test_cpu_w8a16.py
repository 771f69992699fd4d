"""The CPU W8A16 kernel: numerics against a float64 reference, the packing, dispatch on llvm targets.

Tolerance: float32 sums of K products of a standard-normal x and int8 weights, scaled after the sum:
rtol=1e-5, atol=1e-5 x max |y| (observed ~1e-6 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from passes.kernels import cpu_w8a16
from passes.lowering._build import host_threads
from passes.targets import load_target

pytestmark = pytest.mark.slow


def _run(m: int, k: int, n: int, seed: int = 0, rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    host_threads()
    panel = cpu_w8a16.panel_for(n)
    assert panel is not None
    func = cpu_w8a16.w8a16_matmul(m, k, n, panel, rows).with_attr("global_symbol", "main")
    library = tvm.compile(tvm.IRModule({"main": func}), load_target("host").tvm_target())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    library["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(cpu_w8a16.pack_weights(w, panel)),
                    tvm.runtime.tensor(scale), y)
    return y.numpy(), cpu_w8a16.reference(x, w, scale)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 576, 1536), (1, 64, 48), (7, 100, 96), (32, 576, 192),
                                           (12, 100, 96), (128, 256, 128)])
def test_matches_the_dequantized_matmul(m: int, k: int, n: int) -> None:
    # one row at a time, and with the row tile the host's float register tile (4 x 64) gives
    tile = cpu_w8a16.row_tile(m, cpu_w8a16.panel_for(n), 4, 64)
    for rows in sorted({1, tile}):
        got, expected = _run(m, k, n, rows=rows)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()),
                                   err_msg=f"row tile {rows}")


def test_row_tiles_divide_the_rows_and_fill_the_register_tile() -> None:
    assert [cpu_w8a16.row_tile(m, 64, 4, 64) for m in (1, 7, 128)] == [1, 1, 4]
    assert [cpu_w8a16.row_tile(m, 32, 4, 64) for m in (12, 128, 3)] == [6, 8, 3]
    with pytest.raises(ValueError, match="does not divide"):
        cpu_w8a16.w8a16_matmul(6, 64, 64, 64, rows=4)


def test_a_wrong_weight_is_caught() -> None:
    """The check can fail: one flipped weight moves its column by that weight's scale x its input."""
    got, expected = _run(1, 64, 64)
    assert np.array_equal(got.shape, expected.shape)
    shifted = expected.copy()
    shifted[0, 3] += 0.5
    assert not np.allclose(got, shifted, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_packing_and_panels() -> None:
    w = np.arange(4 * 128, dtype=np.int64).reshape(4, 128).astype(np.int8)
    packed = cpu_w8a16.pack_weights(w, 64)
    assert packed.shape == (2, 4, 64) and packed.flags.c_contiguous
    np.testing.assert_array_equal(packed[1, 2, 5], w[2, 64 + 5])
    assert [cpu_w8a16.panel_for(n) for n in (1536, 96, 48, 40)] == [64, 32, 16, None]


@pytest.mark.parametrize("target", ["host", "sd8gen2:cpu"])
def test_w8a16_models_dispatch_to_it_on_cpu_targets(target: str) -> None:
    from passes.lowering import lower
    from passes.samples import build_sample
    from passes.transforms.quantize_int8 import QuantizeInt8
    from passes.api import optimize

    frozen = optimize(build_sample("tiny-llama"), "canonicalize", input_shapes={"input_ids": (1, 4)})
    quantized = QuantizeInt8(scheme="w8a16")(frozen).model
    lowered = lower(quantized, load_target(target))
    assert lowered.dispatched["cpu-w8a16"].matmuls >= 7
    assert all(name.startswith("cpu_w8a16_") for name in lowered.dispatched["cpu-w8a16"].kernels)
