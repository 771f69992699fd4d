"""Precision planning for `to-fp16`: which node runs in float16, which stays in float32, and why.

The plan is made in one topological sweep, before anything changes. Every node gets a `Mode`:

* `HALF`: its float32 tensors (those whose schema type allows float16) become float16;
* `SINGLE`: it stays in float32, reading float32 (a *float32 island*); a seed carries a reason;
* `PASS`: it reads whatever it is given and is not touched (Shape, Size, Cast to another type).

Every float32 tensor gets a `Precision`: `HALF`, `SINGLE` (made by an island) or `IO` (a float32 graph
input kept at the boundary). Constants have no precision: each consumer gets the version it wants.
Islands grow forward through cheap elementwise and data-movement ops whose non-constant float inputs
all come from islands, so a variance stays float32 from `Pow` through `Sqrt` and a decomposed softmax
from `Exp` through `Div`: one Cast in, one Cast out.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.core import ir

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
#: what a ±FLT_MAX mask sentinel becomes: half of float16's range, so `score + sentinel` stays finite
#: for any score above -32752 and a fully masked row gives a uniform Softmax, not -inf - -inf = NaN
FP16_SENTINEL = FP16_MAX / 2
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal) / 2  # below this, a value rounds to 0
FLT_MAX = float(np.finfo(np.float32).max)
INT_EXACT_LIMIT = 2048  # float16 holds every integer up to 2^11, float32 up to 2^24

SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
ACCUMULATING_REDUCTIONS = frozenset({
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "CumSum",
})
#: ops that never change values: they read a tensor's type, not its contents, or run on either
AGNOSTIC_OPS = frozenset({"Shape", "Size"})
#: exact in either precision: they follow their inputs into an island
MOVEMENT_OPS = frozenset({
    "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather",
    "GatherElements", "Concat", "Split", "Expand", "Tile",
})
#: cheap elementwise ops that join an island when every non-constant float input comes from one
ABSORBABLE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Pow", "Max",
    "Min", "Clip", "Where", "Cos", "Sin", "Floor", "Ceil", "Round", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Sum", "Mean",
})
#: ops whose output type an attribute sets (other than Cast/Constant/ConstantOfShape, handled here)
TYPED_BY_ATTRIBUTE = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial",
    "Bernoulli",
})
#: fused normalisations: float16 data with float32 statistics (stash_type=1)
STASHING_NORMS = frozenset({"LayerNormalization", "RMSNormalization"})


class Mode(enum.Enum):
    HALF = "half"
    SINGLE = "single"
    PASS = "pass"


class Precision(enum.Enum):
    HALF = "half"
    SINGLE = "single"
    IO = "io"


@dataclass
class Plan:
    """What the sweep decided: per node (by id) its mode, the reason for seeded islands, and per
    float32 variable its precision after the conversion."""

    modes: dict[int, Mode] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    precision: dict[int, Precision] = field(default_factory=dict)
    #: per node, the input/output indices whose float32 tensor converts when the node runs in HALF
    half_inputs: dict[int, list[int]] = field(default_factory=dict)
    half_outputs: dict[int, list[int]] = field(default_factory=dict)
    #: per node, the precision each input is wanted in (None: not a float32 input, or taken as it is)
    wants: dict[int, list[Precision | None]] = field(default_factory=dict)


def dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    if isinstance(tensor, gs.Constant):
        return np.dtype(tensor.values.dtype) if not isinstance(tensor.dtype, int) else ir.as_np_dtype(tensor.dtype)
    return ir.as_np_dtype(tensor.dtype) if tensor.dtype is not None else None


def is_f32(tensor: gs.Tensor) -> bool:
    return bool(tensor.name) and dtype_of(tensor) == F32


def constant_of(tensor: gs.Tensor) -> np.ndarray | None:
    return ir.constant_value(tensor) if is_f32(tensor) else None


def to_half(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Float32 values as float16, the float32 min/max sentinels clamped to float16's finite range;
    returns the values and how many sentinels were clamped."""
    clamped, count = clamp_sentinels(values)
    return clamped.astype(F16), count


def clamp_sentinels(values: np.ndarray) -> tuple[np.ndarray, int]:
    """`c == ±FLT_MAX -> ±32752`: a mask sentinel, whose sums overflow float16 to ±inf and whose
    product with 0 is NaN; `exp(-32752 - m)` is 0 just as `exp(-FLT_MAX - m)`."""
    sentinel = np.abs(values) == FLT_MAX
    count = int(sentinel.sum())
    if not count:
        return values, 0
    return np.where(sentinel, np.sign(values) * FP16_SENTINEL, values).astype(F32), count


def unsafe_constant(values: np.ndarray) -> str | None:
    """Why a float32 constant cannot become float16 without changing what it means, else None."""
    finite = values[np.isfinite(values) & (np.abs(values) != FLT_MAX)]
    if finite.size and float(np.abs(finite).max()) > FP16_MAX:
        return f"holds {float(np.abs(finite).max()):.3g}, beyond float16's range (65504)"
    if values.size == 1 and 0 < abs(float(values.reshape(-1)[0])) < FP16_TINY:
        return f"is {float(values.reshape(-1)[0]):.3g}, which float16 rounds to 0"
    return None


def _formal(schema: onnx.defs.OpSchema, index: int, outputs: bool) -> str | None:
    formals = schema.outputs if outputs else schema.inputs
    if not formals:
        return None
    if index >= len(formals):
        last = formals[-1]
        return last.type_str if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None
    return formals[index].type_str


def half_slots(node: gs.Node, opset: int) -> tuple[list[int], list[int], bool]:
    """Indices of the node's float32 inputs and outputs whose schema type allows float16, and
    whether some float32 tensor's type does not (that one stays float32)."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return [], [], True
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    slots: tuple[list[int], list[int]] = ([], [])
    stuck = False
    for outputs, tensors in ((False, node.inputs), (True, node.outputs)):
        for index, tensor in enumerate(tensors):
            if not is_f32(tensor):
                continue
            type_str = _formal(schema, index, outputs)
            types = allowed.get(type_str, {type_str}) if type_str else set()
            if "tensor(float16)" in types:
                slots[outputs].append(index)
            else:
                stuck = True
    return slots[0], slots[1], stuck


def _pow_reason(node: gs.Node) -> str | None:
    exponent = ir.constant_value(node.inputs[1])
    if exponent is None or exponent.size != 1:
        return "Pow with a non-constant exponent may overflow float16"
    p = float(exponent.reshape(-1)[0])
    if 0.0 <= p <= 1.0:
        return None
    if p > 1.0:
        return f"Pow(x, {p:g}) overflows float16 for |x| > {FP16_MAX ** (1 / p):.4g}"
    return f"Pow(x, {p:g}) overflows float16 for |x| < {FP16_MAX ** (1 / p):.3g}"


def _cast_mode(node: gs.Node) -> tuple[Mode | None, str | None]:
    """Casts: to float32 from float16 is a boundary (left alone); from an integer it stays float32
    (exact integers end at 2048 in float16); from float32 it follows its input; from float32 to an
    integer it reads float32 (rounding first would change the integer)."""
    source = dtype_of(node.inputs[0])
    target = ir.as_np_dtype(int(node.attrs["to"]))
    if target == F32:
        if source == F16:
            return Mode.PASS, None
        if source is not None and (np.issubdtype(source, np.integer) or source == np.bool_):
            return Mode.SINGLE, (f"integer -> float Cast stays float32: float16 holds integers exactly "
                                 f"only up to {INT_EXACT_LIMIT}")
        if source == F32:
            return None, None  # an identity Cast: follows its input like a movement op
        return Mode.HALF, None
    if source == F32 and not np.issubdtype(target, np.floating):
        return Mode.SINGLE, "float -> integer Cast reads float32: rounding to float16 first would change the result"
    return Mode.PASS, None


def seed_reason(node: gs.Node, block: re.Pattern[str] | None) -> str | None:
    """Why the node must stay in float32 whatever its inputs are, else None."""
    if not ir.is_default_domain(node):
        return f"custom-domain op {node.domain}.{node.op} stays float32"
    if block is not None and block.fullmatch(node.op):
        return f"{node.op} is in block '{block.pattern}'"
    if node.op in SOFTMAX_OPS:
        return f"{node.op} stays float32: its exp-sum accumulates and loses precision in float16"
    if node.op in ACCUMULATING_REDUCTIONS:
        return f"{node.op} stays float32: its accumulation overflows or loses precision in float16"
    if node.op == "Exp":
        return "Exp stays float32: exp(x) overflows float16 for x > 11.09"
    if node.op == "Pow":
        return _pow_reason(node)
    if node.op in TYPED_BY_ATTRIBUTE or (node.op == "Constant" and "value" not in node.attrs):
        return f"{node.op}'s output type is set by an attribute: left float32"
    for tensor in node.inputs:
        values = constant_of(tensor)
        if values is not None and (why := unsafe_constant(values)) is not None:
            return f"reads constant '{tensor.name}' that {why}"
    return None


def _node_mode(node: gs.Node, plan: Plan, block: re.Pattern[str] | None, opset: int) -> tuple[Mode, str | None]:
    """The node's mode and, for a seeded island, the reason."""
    if not any(is_f32(t) for t in (*node.inputs, *node.outputs)):
        return Mode.PASS, None
    if node.op in AGNOSTIC_OPS or (node.op == "Constant" and "value" in node.attrs and ir.is_default_domain(node)):
        return Mode.PASS, None
    if node.op == "Cast" and ir.is_default_domain(node):
        mode, reason = _cast_mode(node)
        if mode is Mode.HALF:
            plan.half_inputs[id(node)], plan.half_outputs[id(node)] = [], [0]
        if mode is not None:
            return mode, reason
    reason = seed_reason(node, block)
    if reason is not None:
        return Mode.SINGLE, reason
    inputs, outputs, _ = half_slots(node, opset)
    plan.half_inputs[id(node)], plan.half_outputs[id(node)] = inputs, outputs
    if not inputs and not outputs:
        return Mode.SINGLE, f"{node.op} has no float16 type in opset {opset}"
    sources = [t for t in node.inputs if is_f32(t) and constant_of(t) is None]
    from_islands = bool(sources) and all(plan.precision.get(id(t)) is Precision.SINGLE for t in sources)
    if from_islands and (node.op in ABSORBABLE_OPS or node.op in MOVEMENT_OPS or node.op == "Cast"):
        return Mode.SINGLE, None
    return Mode.HALF, None


def plan_graph(graph: gs.Graph, block: re.Pattern[str] | None, keep_io_types: bool) -> Plan:
    """Decide every node's mode and every float32 variable's precision, in topological order."""
    plan = Plan()
    opset = ir.opset_version(graph)
    for tensor in graph.inputs:
        if is_f32(tensor):
            plan.precision[id(tensor)] = Precision.IO if keep_io_types else Precision.HALF
    for node in graph.nodes:
        mode, reason = _node_mode(node, plan, block, opset)
        plan.modes[id(node)] = mode
        plan.wants[id(node)] = [_wanted(node, i, plan) for i in range(len(node.inputs))]
        if reason is not None:
            plan.reasons[id(node)] = reason
        half = set(plan.half_outputs.get(id(node), ())) if mode is Mode.HALF else set()
        for index, tensor in enumerate(node.outputs):
            if is_f32(tensor) and constant_of(tensor) is None:
                plan.precision[id(tensor)] = Precision.HALF if index in half else Precision.SINGLE
    return plan


def _wanted(node: gs.Node, index: int, plan: Plan) -> Precision | None:
    """The precision the node wants its float32 input `index` in (None: as it is)."""
    mode = plan.modes[id(node)]
    if mode is Mode.PASS or not is_f32(node.inputs[index]):
        return None
    if mode is Mode.HALF and index in plan.half_inputs[id(node)]:
        return Precision.HALF
    return Precision.SINGLE
