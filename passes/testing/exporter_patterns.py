"""Hypothesis strategies that build decomposed LayerNorm, RMSNorm and GELU the way exporters spell them.

    @given(layer_norm_cases())
    def test_fuse(case): result = FuseLayerNorm(bump_opset=True)(case.model) ... case.instances ...

Each case is a runnable, checker-valid model holding `instances` patterns, every one provably fusable,
drawn across the spellings that TorchScript (opset 13-17: axes attribute, `Constant` nodes) and dynamo
(opset 18+: axes input, initializers, `Cast(float32)` around an fp16 norm, Reciprocal) emit: squares
as `Pow(d, 2)` (float or int64 exponent) or `Mul(d, d)`; `Div(d, std)`, `Mul(d, Reciprocal(std))` or
`Mul(d, Div(1, std))`; one Sub reused or two; either operand order of every Add/Mul; axes positive or
negative, in any order, the last k of a rank-r input; random epsilons; scale/bias present or not, as
constants of the normalised shape (maybe with leading 1s) or graph inputs; GELU's three factors in
every association, Erf or tanh form. Instances are chained or fan out from the input. Leading dims
may be symbolic; their sizes are recorded under `passes.numerics.verify.TEST_DIMS_KEY`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.numerics.verify import TEST_DIMS_KEY

__all__ = ["PatternCase", "gelu_cases", "layer_norm_cases", "rms_norm_cases"]

_SYMBOLS = ("batch", "seq", "n")
_IR_VERSION = 8


@dataclass(frozen=True)
class PatternCase:
    """A generated model, how many fusable patterns it holds, and the choices made (for reports)."""

    model: onnx.ModelProto
    instances: int
    opset: int
    dtype: int
    variants: tuple[str, ...]


class _Emitter:
    """Nodes and initializers under unique names; constants as `Constant` nodes or initializers."""

    def __init__(self, opset: int, dtype: int, constant_nodes: bool) -> None:
        self.opset, self.dtype, self.constant_nodes = opset, dtype, constant_nodes
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.dims: dict[str, list[int]] = {}
        self.variants: list[str] = []
        self._count = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh(f"/{op_type}"), **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        if self.constant_nodes:
            return self.op("Constant", [], value=numpy_helper.from_array(value))
        name = self.fresh("val")
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def scalar(self, value: float, dtype: object = None, *, shaped: bool = False) -> str:
        array = np.asarray(value, dtype=dtype or self.np_dtype)
        return self.const(array.reshape([1]) if shaped else array)

    def add_input(self, shape: Sequence[int | str], concrete: Sequence[int], dtype: int) -> str:
        name = "x" if not self.inputs else self.fresh("param")
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        self.dims[name] = list(concrete)
        return name

    def model(self, outputs: Sequence[str], shape: Sequence[int | str], out_dtype: int) -> onnx.ModelProto:
        values = [helper.make_tensor_value_info(o, out_dtype, list(shape)) for o in outputs]
        graph = helper.make_graph(self.nodes, "exporter_patterns", self.inputs, values, self.initializers)
        made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        made.ir_version = _IR_VERSION
        helper.set_model_props(made, {TEST_DIMS_KEY: json.dumps(self.dims)})
        onnx.checker.check_model(made, full_check=True)
        return made


def _pair(draw: st.DrawFn, a: str, b: str) -> list[str]:
    """Operands of a commutative op in either order."""
    return [b, a] if draw(st.booleans()) else [a, b]


def _reduce_mean(draw: st.DrawFn, e: _Emitter, x: str, axes: list[int], rank: int) -> str:
    """ReduceMean over `axes` (spelled positive or negative, any order) as attribute or input."""
    spelled = [a - rank if draw(st.booleans()) else a for a in draw(st.permutations(axes))]
    attrs = {"keepdims": 1} if draw(st.booleans()) else {}
    if e.opset >= 18:
        return e.op("ReduceMean", [x, e.const(np.asarray(spelled, dtype=np.int64))], **attrs)
    return e.op("ReduceMean", [x], axes=spelled, **attrs)


def _square(draw: st.DrawFn, e: _Emitter, d: str) -> str:
    kind = draw(st.sampled_from(("pow", "pow-int", "mul")))
    e.variants.append(f"square={kind}")
    if kind == "mul":
        return e.op("Mul", [d, d])
    exponent = e.scalar(2, np.int64) if kind == "pow-int" else e.scalar(2.0, np.float32)
    return e.op("Pow", [d, exponent])


def _standardize(draw: st.DrawFn, e: _Emitter, numerator: str, variance: str) -> str:
    """`numerator / sqrt(variance + eps)` in one of the three spellings (computed in float32)."""
    eps = float(draw(st.sampled_from((1e-12, 1e-6, 1e-5)) | st.floats(1e-8, 1e-2)))
    std = e.op("Sqrt", [e.op("Add", _pair(draw, variance, e.scalar(eps, np.float32, shaped=draw(st.booleans()))))])
    kind = draw(st.sampled_from(("div", "reciprocal", "div-one")))
    e.variants.append(f"division={kind}")
    if kind == "div":
        return e.op("Div", [numerator, std])
    inverse = e.op("Reciprocal", [std]) if kind == "reciprocal" else e.op("Div", [e.scalar(1.0, np.float32), std])
    return e.op("Mul", _pair(draw, numerator, inverse))


def _parameter(draw: st.DrawFn, e: _Emitter, norm: list[int], rank: int, mean: float) -> str:
    """A scale/bias: a constant of the normalised shape (maybe with leading 1s) or a graph input."""
    if draw(st.integers(0, 4)) == 0:
        e.variants.append("param=input")
        return e.add_input(norm, norm, e.dtype)
    ones = draw(st.integers(0, rank - len(norm)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    value = (mean + 0.1 * rng.standard_normal([1] * ones + norm)).astype(e.np_dtype)
    return e.const(value)


def _affine(draw: st.DrawFn, e: _Emitter, y: str, norm: list[int], rank: int, with_bias: bool) -> str:
    """Cast back (when the norm ran in float32 for an fp16 input), then scale and bias."""
    if draw(st.booleans()):
        y = e.op("Mul", _pair(draw, y, _parameter(draw, e, norm, rank, 1.0)))
    if with_bias and draw(st.booleans()):
        y = e.op("Add", _pair(draw, y, _parameter(draw, e, norm, rank, 0.0)))
    return y


def _cast_in(draw: st.DrawFn, e: _Emitter, x: str) -> tuple[str, bool]:
    """fp16 inputs always go through `Cast(float32)`; float32 ones sometimes do (identity casts)."""
    if e.dtype == TensorProto.FLOAT16 or draw(st.booleans()):
        e.variants.append("casts")
        return e.op("Cast", [x], to=TensorProto.FLOAT), True
    return x, False


def _layer_norm(draw: st.DrawFn, e: _Emitter, x: str, axes: list[int], rank: int, norm: list[int]) -> str:
    x32, cast = _cast_in(draw, e, x)
    mean = _reduce_mean(draw, e, x32, axes, rank)
    d = e.op("Sub", [x32, mean])
    two_subs = draw(st.booleans())
    e.variants.append(f"two_subs={two_subs}")
    d2 = e.op("Sub", [x32, mean]) if two_subs else d
    variance = _reduce_mean(draw, e, _square(draw, e, d2), axes, rank)
    y = _standardize(draw, e, d, variance)
    y = e.op("Cast", [y], to=e.dtype) if cast else y
    return _affine(draw, e, y, norm, rank, with_bias=True)


def _rms_norm(draw: st.DrawFn, e: _Emitter, x: str, axes: list[int], rank: int, norm: list[int]) -> str:
    x32, cast = _cast_in(draw, e, x)
    variance = _reduce_mean(draw, e, _square(draw, e, x32), axes, rank)
    y = _standardize(draw, e, x32, variance)
    y = e.op("Cast", [y], to=e.dtype) if cast else y
    return _affine(draw, e, y, norm, rank, with_bias=False)


_Builder = Callable[[st.DrawFn, _Emitter, str, list[int], int, list[int]], str]


@st.composite
def _norm_cases(draw: st.DrawFn, build: _Builder, opsets: Sequence[int], max_instances: int) -> PatternCase:
    opset = draw(st.sampled_from(list(opsets)))
    dtype = draw(st.sampled_from((TensorProto.FLOAT, TensorProto.FLOAT16)))
    e = _Emitter(opset, dtype, constant_nodes=opset < 18 and draw(st.booleans()))
    rank = draw(st.integers(1, 4))
    k = draw(st.integers(1, rank))
    concrete = [draw(st.integers(1, 3)) for _ in range(rank - k)] + [draw(st.integers(2, 6)) for _ in range(k)]
    shape: list[int | str] = [
        _SYMBOLS[i] if draw(st.booleans()) else size for i, size in enumerate(concrete[: rank - k])
    ] + concrete[rank - k:]
    x = e.add_input(shape, concrete, dtype)
    produced = [x]
    instances = draw(st.integers(1, max_instances))
    for _ in range(instances):
        source = produced[-1] if draw(st.booleans()) else x
        produced.append(build(draw, e, source, list(range(rank - k, rank)), rank, concrete[rank - k:]))
    consumed = {i for node in e.nodes for i in node.input}
    outputs = [t for t in produced[1:] if t not in consumed]
    return PatternCase(e.model(outputs, shape, dtype), instances, opset, dtype, tuple(e.variants))


def layer_norm_cases(
    opsets: Sequence[int] = tuple(range(13, 24)), max_instances: int = 3
) -> st.SearchStrategy[PatternCase]:
    """Models with 1..max_instances decomposed LayerNorms, each fusable into LayerNormalization."""
    return _norm_cases(_layer_norm, opsets, max_instances)


def rms_norm_cases(
    opsets: Sequence[int] = tuple(range(13, 24)), max_instances: int = 3
) -> st.SearchStrategy[PatternCase]:
    """Models with 1..max_instances decomposed RMSNorms, each fusable into RMSNormalization."""
    return _norm_cases(_rms_norm, opsets, max_instances)


# -- GELU ----------------------------------------------------------------------------------------
def _times_x_half(draw: st.DrawFn, e: _Emitter, x: str, one_plus: str) -> str:
    """`x * 0.5 * one_plus` in any association and operand order."""
    factors = {"x": x, "0.5": e.scalar(0.5), "p": one_plus}
    first, second = draw(st.sampled_from((("x", "0.5"), ("x", "p"), ("0.5", "p"))))
    (last,) = set(factors) - {first, second}
    e.variants.append(f"product=({first}*{second})*{last}")
    inner = e.op("Mul", _pair(draw, factors[first], factors[second]))
    return e.op("Mul", _pair(draw, inner, factors[last]))


def _erf_part(draw: st.DrawFn, e: _Emitter, x: str) -> str:
    if draw(st.booleans()):
        scaled = e.op("Div", [x, e.scalar(math.sqrt(2.0))])
    else:
        scaled = e.op("Mul", _pair(draw, x, e.scalar(1.0 / math.sqrt(2.0))))
    return e.op("Erf", [scaled])


def _tanh_part(draw: st.DrawFn, e: _Emitter, x: str) -> str:
    kind = draw(st.sampled_from(("pow", "x*(x*x)", "(x*x)*x")))
    e.variants.append(f"cube={kind}")
    if kind == "pow":
        cube = e.op("Pow", [x, e.scalar(3.0, draw(st.sampled_from((np.float32, np.int64, e.np_dtype))))])
    else:
        square = e.op("Mul", [x, x])
        cube = e.op("Mul", [x, square] if kind == "x*(x*x)" else [square, x])
    term = e.op("Mul", _pair(draw, cube, e.scalar(0.044715)))
    polynomial = e.op("Add", _pair(draw, x, term))
    return e.op("Tanh", [e.op("Mul", _pair(draw, polynomial, e.scalar(math.sqrt(2.0 / math.pi))))])


def _gelu(draw: st.DrawFn, e: _Emitter, x: str) -> str:
    form = draw(st.sampled_from(("erf", "tanh")))
    e.variants.append(form)
    inner = _erf_part(draw, e, x) if form == "erf" else _tanh_part(draw, e, x)
    one_plus = e.op("Add", _pair(draw, inner, e.scalar(1.0)))
    return _times_x_half(draw, e, x, one_plus)


@st.composite
def gelu_cases(draw: st.DrawFn, opsets: Sequence[int] = tuple(range(13, 24)), max_instances: int = 3) -> PatternCase:
    """Models with 1..max_instances decomposed GELUs (Erf or tanh form), each fusable into Gelu."""
    opset = draw(st.sampled_from(list(opsets)))
    dtype = draw(st.sampled_from((TensorProto.FLOAT, TensorProto.FLOAT16)))
    e = _Emitter(opset, dtype, constant_nodes=opset < 18 and draw(st.booleans()))
    concrete = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(0, 4)))]
    shape: list[int | str] = [_SYMBOLS[i] if i < len(_SYMBOLS) and draw(st.booleans()) else s
                              for i, s in enumerate(concrete)]
    x = e.add_input(shape, concrete, dtype)
    produced = [x]
    instances = draw(st.integers(1, max_instances))
    for _ in range(instances):
        produced.append(_gelu(draw, e, produced[-1] if draw(st.booleans()) else x))
    consumed = {i for node in e.nodes for i in node.input}
    outputs = [t for t in produced[1:] if t not in consumed]
    return PatternCase(e.model(outputs, shape, dtype), instances, opset, dtype, tuple(e.variants))
