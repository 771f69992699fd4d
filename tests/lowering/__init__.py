"""Lowering tests: shared, cached builds (a TVM build takes about a second, so each target's sample
build is made once per test process and reused), ONNX graph builders and onnxruntime runs."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: the frozen sample's input shape
SAMPLE_SHAPE = (1, 16)
#: float32 tolerance of the host build against onnxruntime: same math, different summation order
HOST_RTOL = 1e-4
HOST_ATOL = 1e-4
#: ONNX 8-bit element types and their numpy dtypes
INT8_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}


@cache
def sample_model() -> onnx.ModelProto:
    """The bundled tiny-llama (2 layers, TorchScript idiom), optimized and frozen at (1, 16)."""
    import passes
    from passes.samples import build_sample

    return passes.optimize(build_sample("tiny-llama"), input_shapes={"input_ids": SAMPLE_SHAPE})


@cache
def target(name: str):  # -> passes.targets.TargetDescription
    from passes.targets import load_target

    return load_target(name)


@cache
def lowered_sample(target_name: str):  # -> LoweredModel
    from passes.lowering import lower

    return lower(sample_model(), target(target_name))


@cache
def built_sample(target_name: str):  # -> BuiltModel
    from passes.lowering import build

    return build(lowered_sample(target_name), target(target_name))


def sample_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 256, SAMPLE_SHAPE).astype(np.int64)}


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The exact reference (`passes.numerics.verify.run_model`): onnxruntime with integer matmuls widened, so
    nothing saturates on a CPU without VNNI."""
    from passes.numerics.verify import run_model

    return run_model(model, feeds)


def qlinear_matmul_spec(a: np.ndarray, a_scale: float, a_zero: int, b: np.ndarray, b_scale: np.ndarray | float,
                        b_zero: np.ndarray | int, y_scale: float, y_zero: int, y_dtype: type) -> np.ndarray:
    """QLinearMatMul as the ONNX spec and MLAS define it, in numpy: the int64 accumulator (exact),
    requantized by the float32 multiplier `a_scale * b_scale / y_scale`, rounded half to even, saturated."""
    accumulator = (a.astype(np.int64) - np.int64(a_zero)) @ (b.astype(np.int64) - np.asarray(b_zero, np.int64))
    multiplier = (np.float32(a_scale) * np.asarray(b_scale, np.float32)) / np.float32(y_scale)
    scaled = np.rint(accumulator.astype(np.float32) * multiplier) + np.float32(y_zero)
    info = np.iinfo(y_dtype)
    return np.clip(scaled, info.min, info.max).astype(y_dtype)


def qlinear_spec_of(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """`qlinear_matmul_spec` of a `qlinear_matmul_model` on `feeds` (its scales from feeds or initializers)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer} | feeds
    node = model.graph.node[0]
    a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = (values[name] for name in node.input)
    return qlinear_matmul_spec(a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero, y_zero.dtype.type)


@cache
def x86_target(mcpu: str):  # -> passes.targets.TargetDescription
    """The host target description with LLVM CPU `mcpu` instead of this machine's: x86 code for a CPU
    with fewer (or other) features than this one, e.g. `znver3` (AVX2, no AVX-512) on a Zen 4."""
    import tempfile
    from pathlib import Path

    from passes.targets import load_target

    source = (Path(__file__).resolve().parents[2] / "targets" / "host.toml").read_text()
    assert 'mcpu = "detect"' in source
    global _TARGET_FOLDER
    if _TARGET_FOLDER is None:  # kept for the process (descriptions name their source file), removed at exit
        _TARGET_FOLDER = tempfile.TemporaryDirectory(prefix="passes-x86-target-")
    path = Path(_TARGET_FOLDER.name) / f"x86-{mcpu}.toml"
    path.write_text(source.replace('mcpu = "detect"', f'mtriple = "x86_64-unknown-linux-gnu", mcpu = "{mcpu}"'))
    return load_target(path)


_TARGET_FOLDER = None


def onnx_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = (),
               *, opset: int = 17, check: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    made.ir_version = 8
    if check:
        onnx.checker.check_model(made, full_check=True)
    return made


def random_int8(rng: np.random.Generator, elem_type: int, shape: Sequence[int]) -> np.ndarray:
    """Uniform over the whole range of an 8-bit ONNX type."""
    info = np.iinfo(INT8_TYPES[elem_type])
    return rng.integers(info.min, info.max, tuple(shape), endpoint=True).astype(INT8_TYPES[elem_type])


def qlinear_matmul_model(m: int, k: int, n: int, a_type: int, b_type: int, y_type: int, *, per_column: bool,
                         scales: tuple[float, float, float], zeros: tuple[int, int, int], seed: int = 0,
                         dynamic_scales: bool = False) -> onnx.ModelProto:
    """y = QLinearMatMul(a[1, m, k], a_scale, a_zero, W[k, n], b_scale, b_zero, y_scale, y_zero); per-column
    b scales/zero points are random around `scales[1]`; with `dynamic_scales` the scales are graph inputs."""
    rng = np.random.default_rng(seed)
    b_scale = np.float32(scales[1]) * (rng.uniform(0.5, 2.0, n).astype(np.float32) if per_column else np.float32(1))
    b_zero = random_int8(rng, b_type, (n,)) if per_column else np.array(zeros[1]).astype(INT8_TYPES[b_type])
    inits = [numpy_helper.from_array(random_int8(rng, b_type, (k, n)), "w"),
             numpy_helper.from_array(np.array(zeros[0]).astype(INT8_TYPES[a_type]), "a_zero"),
             numpy_helper.from_array(b_zero, "b_zero"),
             numpy_helper.from_array(np.array(zeros[2]).astype(INT8_TYPES[y_type]), "y_zero")]
    scale_values = {"a_scale": np.array(scales[0], np.float32), "b_scale": np.asarray(b_scale, np.float32),
                    "y_scale": np.array(scales[2], np.float32)}
    inputs = [helper.make_tensor_value_info("a", a_type, [1, m, k])]
    if dynamic_scales:
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape))
                   for name, value in scale_values.items()]
    else:
        inits += [numpy_helper.from_array(value, name) for name, value in scale_values.items()]
    node = helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zero", "w", "b_scale", "b_zero", "y_scale", "y_zero"],
                            ["y"], name="qmm")
    return onnx_model([node], inputs, [helper.make_tensor_value_info("y", y_type, [1, m, n])], inits)
