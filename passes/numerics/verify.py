"""Numeric comparison of two models on the same seeded inputs.

onnxruntime is the oracle (with its own graph optimisations off, so its fusions cannot hide or add a
difference); ops it lacks fall back to `onnx.reference`. Integer matmuls are first rewritten into the
exact reference's form (`passes.numerics.exact`): onnxruntime's own u8 x s8 kernels saturate on x86 CPUs
without VNNI, so they are never what judges a quantized model. Used by `passes verify`, by the pass
manager's numeric instrument, by the accuracy report and calibration, by `passes run`'s host check,
and by `passes.testing.assert_equivalent`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from passes.core.errors import VerificationError
from passes.numerics.exact import (IntegerOpError, decompose_qlinear_matmul, exact_integer_model,
                                   needs_reference_evaluator)
from passes.numerics.hollow import (decomposes, exposing, filled_model, hollow_model, placeholder_model,
                                    shared_arrays, split_weights, with_outputs)

__all__ = ["DEFAULT_ATOL", "DEFAULT_DYNAMIC_DIM", "DEFAULT_RTOL", "TEST_DIMS_KEY", "Comparison", "ModelRunner",
           "OutputComparison", "check_feed_budget", "compare_models", "compare_outputs", "default_max_feed_bytes",
           "filled_model", "hollow_model", "input_dims", "max_feed_bytes", "random_feeds", "run_model",
           "split_weights", "with_outputs"]

logger = logging.getLogger(__name__)

#: symbolic dims not bound by `input_shapes` get this size in random feeds.
DEFAULT_DYNAMIC_DIM = 2
#: metadata key (JSON {input: [dims]}) that generated test graphs use to record the sizes they assumed.
TEST_DIMS_KEY = "passes.test_dims"
#: default tolerances for float32 comparisons: a rewrite may reassociate a reduction, no more.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


@dataclass
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    ok: bool
    problem: str = ""


@dataclass
class Comparison:
    """Per-output errors of `candidate` against `reference` at the stated tolerance."""

    rtol: float
    atol: float
    seed: int
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def input_dims(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    dynamic_dim: int = DEFAULT_DYNAMIC_DIM,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input: given shapes, recorded test dims, else static dims and
    `dynamic_dim` for each symbol."""
    given = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    recorded = _recorded_dims(model)
    initializers = {t.name for t in model.graph.initializer}
    symbols: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if value.name in given or value.name in recorded:
            shape = given[value.name] if value.name in given else tuple(recorded[value.name])
            if value.type.tensor_type.HasField("shape") and len(shape) != len(dims):
                raise VerificationError(
                    f"input '{value.name}' has rank {len(dims)}, but shape {'x'.join(map(str, shape))} was given"
                )
            for dim, size in zip(dims, shape):
                if dim.HasField("dim_param"):
                    symbols.setdefault(dim.dim_param, size)
            shapes[value.name] = shape
    for value in model.graph.input:
        if value.name in initializers or value.name in shapes:
            continue
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else symbols.get(d.dim_param, dynamic_dim)
            for d in value.type.tensor_type.shape.dim
        )
    return shapes


def _recorded_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    for prop in model.metadata_props:
        if prop.key == TEST_DIMS_KEY:
            return json.loads(prop.value)
    return {}


def default_max_feed_bytes() -> int:
    """An eighth of this machine's memory: the generated inputs of one run, before the activations
    they cause (which are larger still)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (ValueError, OSError, AttributeError):
        return 2**31


#: the budget `random_feeds` keeps to; `max_feed_bytes(n)` sets it for a block (the CLI's --max-feed-bytes)
_MAX_FEED_BYTES: contextvars.ContextVar[int | None] = contextvars.ContextVar("max_feed_bytes", default=None)


@contextlib.contextmanager
def max_feed_bytes(limit: int | None) -> Iterator[None]:
    """Within the block, generated inputs larger than `limit` bytes in all are refused up front
    (None: `default_max_feed_bytes()`)."""
    token = _MAX_FEED_BYTES.set(limit)
    try:
        yield
    finally:
        _MAX_FEED_BYTES.reset(token)


def check_feed_budget(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """The bytes inputs of `shapes` take; raise `VerificationError` past the budget, before allocating."""
    limit = _MAX_FEED_BYTES.get()
    limit = default_max_feed_bytes() if limit is None else limit
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    total = 0
    for name, shape in shapes.items():
        if any(int(d) < 0 for d in shape):
            raise VerificationError(f"input '{name}' has a negative dimension in {list(shape)}")
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(types.get(name, onnx.TensorProto.FLOAT))).itemsize
        except (KeyError, TypeError, ValueError):
            raise VerificationError(f"input '{name}' has element type {types.get(name)}, "
                                    "which random inputs cannot be made for") from None
        total += math.prod(int(d) for d in shape) * max(itemsize, 8)  # generated in float64/int64 first
    if total > limit:
        raise VerificationError(f"random inputs of shapes {_shapes_text(shapes)} would take {_gib(total)}, "
                                f"over the {_gib(limit)} budget (--max-feed-bytes; smaller --shape values)")
    return total


def _gib(count: int) -> str:
    if count < 2**20:
        return f"{count:,} bytes"
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in shapes.items())


def random_feeds(
    model: onnx.ModelProto, seed: int = 0, *, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input. Integer inputs that index a constant table
    (token ids into an embedding Gather) stay within that table's size. Inputs larger than the feed
    budget (`max_feed_bytes`) are refused before anything is allocated."""
    rng = np.random.default_rng(seed)
    shapes = input_dims(model, input_shapes)
    check_feed_budget(model, shapes)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        elem_type = value.type.tensor_type.elem_type
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        shape = shapes[value.name]
        if dtype == np.bool_:
            feeds[value.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            high = _index_bound(model, value.name)
            feeds[value.name] = rng.integers(0, high, size=shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _index_bound(model: onnx.ModelProto, name: str) -> int:
    """The smallest table size among Gathers indexed by `name`, else 2 (masks, flags)."""
    tables = {t.name: t.dims for t in model.graph.initializer}
    bounds = []
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            dims = tables.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims:
                bounds.append(int(dims[axis]))
    return max(1, min(bounds)) if bounds else 2


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of `model` on `feeds`: onnxruntime without its graph optimisations, else onnx.reference.

    Integer matmuls are evaluated exactly on every CPU (`passes.numerics.exact`); a model with ConvInteger or
    QLinearConv runs under onnx.reference. A model over protobuf's 2 GB limit is handed to onnxruntime
    as a file with external data. To run one model on many feeds, build a `ModelRunner` once."""
    return ModelRunner(model)(feeds)


class ModelRunner:
    """`run_model` for many feeds: the exact form and the session are built once.

        runner = ModelRunner(model); outputs = [runner(feed) for feed in feeds]

    onnxruntime gets the model without its weights' bytes: every initializer past `INLINE_BYTES` is
    handed over as a numpy array it uses where it lies (`SessionOptions.add_initializer`), so there is
    no serialized copy of the model and no copy inside the session (bar the packed layout onnxruntime
    makes of float matmul weights, as it always does). `weights` hands in arrays the caller already holds,
    by initializer name; the model's own initializers of those names may then be hollow (dims and type,
    no bytes: `hollow_model`). `outputs` exposes intermediate tensors as extra outputs.
    """

    def __init__(self, model: onnx.ModelProto, *, outputs: Sequence[str] = (),
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        self._session: Any = None
        self._reference: onnx.ModelProto | None = None
        self._shared: list[Any] = []  # the OrtValues the session reads: alive as long as it is
        given = dict(weights or {})
        if needs_reference_evaluator(model):
            logger.info("the model holds ConvInteger or QLinearConv; using onnx.reference (exact int32)")
            self._reference = exposing(filled_model(model, given), outputs)
            self.names = [o.name for o in self._reference.graph.output]
            return
        try:
            decomposed, _ = decompose_qlinear_matmul(filled_model(model, given) if decomposes(model) else model)
            arrays = shared_arrays(decomposed, given)
            light = exact_integer_model(exposing(hollow_model(decomposed, set(arrays)), outputs, decomposed))
        except IntegerOpError as err:
            raise VerificationError(str(err)) from err
        self.names = [o.name for o in light.graph.output]
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # the default order runs every node whose inputs are ready first: each Cast of an int8 weight to
        # float64 (`exact_integer_model`) at the start, all of them alive at once (8 bytes a weight)
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.log_severity_level = 3
        for name, array in arrays.items():
            self._shared.append(ort.OrtValue.ortvalue_from_numpy(array))
            options.add_initializer(name, self._shared[-1])
        with tempfile.TemporaryDirectory(prefix="passes-verify-") as folder:
            source = placeholder_model(light, arrays, Path(folder))
            try:
                self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            except Exception as err:  # ORT lacks the op, or the opset: onnx.reference implements the spec
                logger.info("onnxruntime cannot load the model (%s); using onnx.reference", str(err).splitlines()[0])
                self._reference = filled_model(light, arrays)
                self._shared = []

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._reference is not None:
            return _run_reference(self._reference, feeds, self.names)
        assert self._session is not None
        try:
            return dict(zip(self.names, self._session.run(self.names, dict(feeds))))
        except Exception as err:
            raise VerificationError(f"onnxruntime failed to run the model: {str(err).splitlines()[0]}") from err


def _run_reference(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    try:
        results = ReferenceEvaluator(model).run(None, dict(feeds))
    except Exception as err:
        raise VerificationError(f"neither onnxruntime nor onnx.reference can run the model: {err}") from err
    return dict(zip(names, (np.asarray(r) for r in results)))


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
    scale_atol: bool = False,
) -> Comparison:
    """Compare outputs by position-independent name; shape and dtype must match exactly. With
    `scale_atol`, a float output's `atol` is multiplied by max(1, max |reference|): rounding differences
    of a deep model grow with the magnitude of what it computes (logits of 10-20 carry ~1e-4 of fp32
    rounding after 30 layers)."""
    comparison = Comparison(rtol=rtol, atol=atol, seed=seed)
    for name, ref in reference.items():
        ref = np.asarray(ref)
        if name not in candidate:
            comparison.outputs.append(
                OutputComparison(name, ref.shape, str(ref.dtype), float("inf"), float("inf"), False, "missing")
            )
            continue
        got = np.asarray(candidate[name])
        scaled = atol
        if scale_atol and ref.dtype.kind == "f" and ref.size and np.isfinite(ref).any():
            scaled = atol * max(1.0, float(np.max(np.abs(ref[np.isfinite(ref)]))))
        comparison.outputs.append(_compare_one(name, ref, got, rtol, scaled))
    return comparison


def _compare_one(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> OutputComparison:
    if ref.shape != got.shape or ref.dtype != got.dtype:
        problem = f"expected {ref.dtype}{list(ref.shape)}, got {got.dtype}{list(got.shape)}"
        return OutputComparison(name, ref.shape, str(ref.dtype), float("inf"), float("inf"), False, problem)
    if ref.size == 0:
        return OutputComparison(name, ref.shape, str(ref.dtype), 0.0, 0.0, True)
    if ref.dtype.kind in "biu":
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        ok = bool(np.array_equal(ref, got))
    else:
        r64, g64 = ref.astype(np.float64), got.astype(np.float64)
        same_nan = np.isnan(r64) == np.isnan(g64)
        both = ~np.isnan(r64) & ~np.isnan(g64)
        with np.errstate(invalid="ignore"):
            diff = np.where(both & (r64 != g64), np.abs(r64 - g64), 0.0)
        ok = bool(same_nan.all() and np.allclose(g64[both], r64[both], rtol=rtol, atol=atol))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff > 0, diff / np.maximum(np.abs(ref.astype(np.float64)), np.finfo(np.float64).tiny), 0.0)
    return OutputComparison(name, ref.shape, str(ref.dtype), float(np.max(diff)), float(np.nanmax(rel)), ok)


def compare_models(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> Comparison:
    """Run both models on the same seeded inputs and compare every output of `reference`."""
    ref_inputs = {i.name for i in reference.graph.input} - {t.name for t in reference.graph.initializer}
    cand_inputs = {i.name for i in candidate.graph.input} - {t.name for t in candidate.graph.initializer}
    if ref_inputs != cand_inputs:
        raise VerificationError(
            f"the models take different inputs: {sorted(ref_inputs)} vs {sorted(cand_inputs)}"
        )
    if feeds is None:  # a frozen candidate tells the dims of a dynamic reference; given shapes win
        input_shapes = {**_static_input_shapes(candidate), **(input_shapes or {})}
    feeds = dict(feeds) if feeds is not None else random_feeds(reference, seed, input_shapes=input_shapes)
    return compare_outputs(run_model(reference, feeds), run_model(candidate, feeds), rtol=rtol, atol=atol, seed=seed)


def _static_input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Inputs whose every dim is a fixed size."""
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in initializers and value.type.tensor_type.HasField("shape"):
            if all(d.HasField("dim_value") for d in dims):
                shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes
