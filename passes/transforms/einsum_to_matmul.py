"""`einsum-to-matmul`: lower one- and two-operand Einsum to MatMul / Mul / Transpose / Reshape /
ReduceSum, for back ends without Einsum.

    Einsum(x){ij->ji} -> Transpose(x);  Einsum(x){ij->i} -> ReduceSum(x, [1])
    Einsum(a, b) -> Transpose(MatMul(Reshape(Transpose(ReduceSum(a))), Reshape(Transpose(ReduceSum(b)))))

The two-operand plan (`_einsum.plan_binary`) classifies indices into batch / contracted / free /
summed, sums the one-sided ones away, brings each operand to `[batch..., free..., contracted...]`
(`[batch..., contracted..., free...]` on the right), merges each group into one MatMul axis and
undoes the merge after the MatMul. Every step that would be an identity is skipped, free indices may
stay as MatMul broadcast dims (`bsd,hd->bsh` is one Transpose and a MatMul), and an equation with
nothing contracted becomes a broadcasting Mul. Batch dims are never merged, so MatMul's batch
broadcasting reproduces Einsum's size-1 broadcasting.

Dynamic dims keep working (design choice: targets are built, static shapes are not required). A
Reshape target copies a dim in place (`0`) where it can, takes static sizes as constants, and
computes the rest at run time with Shape -> Gather (-> ReduceProd) -> Concat from the Einsum inputs;
it never uses `-1`. From opset 14 such a computed target is used with `allowzero=1` (copied dims
gathered from Shape too), so zero-sized dims reshape correctly; below 14 a computed size that is 0
at run time reads as "copy": Reshape then fails (or, when another dim is empty too, yields an empty
tensor of the wrong shape) -- the one dynamic case not handled. A contracted index
that is a static 1 in one operand is summed in both (exact under Einsum's broadcasting); one that is
dynamic in both and 1 in only one at run time makes MatMul fail loudly rather than compute wrongly.
ONNX's Einsum shape inference takes a broadcast output dim from operand 0; the rewrite records the
broadcast size instead, as MatMul's inference does.

Refused, with the reason: three or more operands, an index repeated within one operand (a
diagonal), an ellipsis on an operand of unknown rank, equations onnxruntime itself rejects (an
ellipsis missing from the output, upper-case indices in implicit mode, ellipses of different
widths), and element types outside float16/float32/float64/int32/int64 (what onnxruntime's MatMul,
Mul and ReduceSum all implement).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules
from passes.transforms._einsum import (
    COPY,
    BinaryPlan,
    Dims,
    EinsumError,
    Equation,
    OperandPlan,
    ProductPlan,
    Slot,
    parse,
    plan_binary,
    plan_unary,
    reshape_kind,
    singles,
)

#: element types onnxruntime's MatMul, Mul and ReduceSum all implement (it has no bfloat16 MatMul).
LOWERED_DTYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int32, np.int64))
#: from this opset ReduceSum, Squeeze and Unsqueeze take `axes` as an input, before as an attribute.
AXES_AS_INPUT_OPSET = 13
#: from this opset Reshape has `allowzero`: a 0 in the target is a size, not "copy the input dim".
ALLOWZERO_OPSET = 14


def _static_dims(tensor: gs.Tensor) -> Dims | None:
    """Per axis the static size or None; None for an unknown rank."""
    if tensor.shape is None:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in tensor.shape)


def _dtype_reason(anchor: gs.Node) -> str | None:
    for tensor in anchor.inputs:
        if tensor.dtype is None:
            return "the operands' element type is unknown"
        # graphsurgeon keeps types numpy lacks (bfloat16, float8) as the ONNX enum value
        if isinstance(tensor.dtype, (int, np.integer)) or np.dtype(tensor.dtype) not in LOWERED_DTYPES:
            name = tensor.dtype if isinstance(tensor.dtype, (int, np.integer)) else np.dtype(tensor.dtype)
            return f"dtype {name} is not lowered (only float16/32/64 and int32/64)"
    return None


def _equation(anchor: gs.Node) -> Equation | str:
    """The parsed equation, or the reason it cannot be lowered."""
    text = anchor.attrs.get("equation")
    if not isinstance(text, str):
        return "no equation attribute"
    shapes = [_static_dims(t) for t in anchor.inputs]
    try:
        return parse(text, [None if s is None else len(s) for s in shapes])
    except EinsumError as err:
        return str(err)


class _Emitter:
    """Builds the replacement nodes of one Einsum, in order."""

    def __init__(self, ctx: RewriteContext, anchor: gs.Node) -> None:
        self.ctx = ctx
        self.inputs = list(anchor.inputs)
        self.dtype = anchor.outputs[0].dtype or self.inputs[0].dtype
        self.nodes: list[gs.Node] = []
        self._shapes: dict[int, gs.Tensor] = {}  # id(tensor) -> Shape(tensor)
        self._sizes: dict[Slot, gs.Tensor] = {}

    def op(self, op: str, inputs: Sequence[gs.Tensor], *, dtype: object = None, **attrs: object) -> gs.Variable:
        base = f"einsum_{op.lower()}"
        out = self.ctx.variable(base, dtype if dtype is not None else self.dtype)
        self.nodes.append(self.ctx.node(op, inputs, [out], base=base, **attrs))
        return out

    def int64s(self, values: Sequence[int]) -> gs.Constant:
        return self.ctx.const("einsum_shape", np.asarray(values, dtype=np.int64))

    def with_axes(self, op: str, x: gs.Tensor, axes: Sequence[int], **attrs: object) -> gs.Variable:
        """ReduceSum / Squeeze / Unsqueeze with `axes` spelled for the graph's opset."""
        if self.ctx.opset >= AXES_AS_INPUT_OPSET:
            return self.op(op, [x, self.int64s(axes)], **attrs)
        return self.op(op, [x], axes=list(axes), **attrs)

    def prepare(self, plan: OperandPlan) -> gs.Tensor:
        """ReduceSum, Transpose and re-slot one Einsum input into its MatMul / Mul operand."""
        x: gs.Tensor = self.inputs[plan.index]
        if plan.sum_axes:
            x = self.with_axes("ReduceSum", x, plan.sum_axes, keepdims=0)
        if plan.perm is not None:
            x = self.op("Transpose", [x], perm=list(plan.perm))
        return x

    def reslot(self, x: gs.Tensor, before: tuple[Slot, ...], after: tuple[Slot, ...], plan: BinaryPlan) -> gs.Tensor:
        """Merge or split axes: nothing, Unsqueeze, Squeeze, or Reshape to a built target."""
        kind, axes = reshape_kind(before, after)
        if kind == "identity":
            return x
        if kind in ("unsqueeze", "squeeze"):
            return self.with_axes(kind.capitalize(), x, axes)
        entries = [plan.target_entry(before, after, j) for j in range(len(after))]
        if all(e == COPY or (isinstance(e, int) and e > 0) for e in entries):
            return self.op("Reshape", [x, self.int64s([0 if e == COPY else int(e) for e in entries])])
        if self.ctx.opset < ALLOWZERO_OPSET:  # a size that is 0 at run time reads as "copy" here
            return self.op("Reshape", [x, self.target(x, after, entries, plan, copy_as_zero=True)])
        target = self.target(x, after, entries, plan, copy_as_zero=False)
        return self.op("Reshape", [x, target], allowzero=1)

    def target(
        self,
        x: gs.Tensor,
        after: tuple[Slot, ...],
        entries: list[int | str | None],
        plan: BinaryPlan,
        *,
        copy_as_zero: bool,
    ) -> gs.Tensor:
        """Concat of runs: static sizes (and 0 for copy) as constants, copied dims gathered from
        Shape(x), merged dynamic dims computed from the Einsum inputs' shapes."""

        def kind(item: tuple[int, int | str | None]) -> str:
            entry = item[1]
            if entry is None:
                return f"dynamic{item[0]}"  # never grouped
            return "copy" if entry == COPY and not copy_as_zero else "static"

        pieces: list[gs.Tensor] = []
        for key, group in itertools.groupby(enumerate(entries), key=kind):
            items = list(group)
            if key == "static":
                pieces.append(self.int64s([0 if e == COPY else int(e) for _, e in items]))  # type: ignore[arg-type]
            elif key == "copy":
                pieces.append(self.gather(self.shape(x), [j for j, _ in items]))
            else:
                pieces.append(self.dynamic_size(after[items[0][0]], plan))
        return pieces[0] if len(pieces) == 1 else self.op("Concat", pieces, dtype=np.int64, axis=0)

    def shape(self, x: gs.Tensor) -> gs.Tensor:
        if id(x) not in self._shapes:
            self._shapes[id(x)] = self.op("Shape", [x], dtype=np.int64)
        return self._shapes[id(x)]

    def gather(self, shape: gs.Tensor, axes: Sequence[int]) -> gs.Tensor:
        return self.op("Gather", [shape, self.int64s(axes)], dtype=np.int64, axis=0)

    def dynamic_size(self, slot: Slot, plan: BinaryPlan) -> gs.Tensor:
        """[prod of the slot's dims] read from the Einsum inputs' shapes at run time."""
        if slot in self._sizes:
            return self._sizes[slot]
        index, axes = plan.source(slot)
        dims = self.gather(self.shape(self.inputs[index]), axes)
        size = dims if len(axes) == 1 else self.op("ReduceProd", [dims], dtype=np.int64, keepdims=1)
        self._sizes[slot] = size
        return size


class LowerUnaryEinsum(RewriteRule):
    anchor_ops = ("Einsum",)
    math = "Einsum(x){ij->ji} -> Transpose(x); Einsum(x){ij->i} -> ReduceSum(x, [1])"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        if len(anchor.inputs) != 1:
            return None
        return Match(anchor, [anchor], {"equation": _equation(anchor)})

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        equation = match["equation"]
        if isinstance(equation, str):
            return equation
        return _dtype_reason(match.anchor) if plan_unary(equation).sum_axes else None

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        plan = plan_unary(match["equation"])
        emitter = _Emitter(ctx, match.anchor)
        y = emitter.prepare(OperandPlan(0, plan.sum_axes, plan.perm, (), ()))
        return Replacement(emitter.nodes, [y])


class LowerBinaryEinsum(RewriteRule):
    anchor_ops = ("Einsum",)
    math = "Einsum(a, b) -> Transpose(Reshape(MatMul(Reshape(Transpose(ReduceSum(a))), ...)))"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        if len(anchor.inputs) < 2:
            return None
        if len(anchor.inputs) > 2:
            return Match(anchor, [anchor], {"plan": f"{len(anchor.inputs)} operands: only 1-2 are lowered"})
        equation = _equation(anchor)
        if isinstance(equation, str):
            return Match(anchor, [anchor], {"plan": equation})
        shapes = [
            _static_dims(tensor) or (None,) * len(labels) for tensor, labels in zip(anchor.inputs, equation.operands)
        ]
        try:
            plan: BinaryPlan | ProductPlan | str = plan_binary(equation, shapes)
        except EinsumError as err:
            plan = str(err)
        return Match(anchor, [anchor], {"plan": plan, "equation": equation})

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        plan = match["plan"]
        return plan if isinstance(plan, str) else _dtype_reason(match.anchor)

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        plan, emitter = match["plan"], _Emitter(ctx, match.anchor)
        _correct_broadcast_dims(match.anchor, match["equation"])
        if isinstance(plan, ProductPlan):
            return Replacement(emitter.nodes, [_lower_product(emitter, plan)])
        return Replacement(emitter.nodes, [_lower_matmul(emitter, plan)])


def _lower_matmul(emitter: _Emitter, plan: BinaryPlan) -> gs.Tensor:
    """Transpose(Reshape(MatMul(left, right))) with every identity step left out."""
    operands = [emitter.reslot(emitter.prepare(side), singles(side.order), side.layout, plan)
                for side in (plan.left, plan.right)]
    y = emitter.reslot(emitter.op("MatMul", operands), plan.product, singles(plan.split), plan)
    return y if plan.out_perm is None else emitter.op("Transpose", [y], perm=list(plan.out_perm))


def _lower_product(emitter: _Emitter, plan: ProductPlan) -> gs.Tensor:
    """Mul of the operands, each in output order with 1s where it lacks an index."""
    operands = []
    for side in (plan.left, plan.right):
        x = emitter.prepare(side)
        kind, axes = reshape_kind(singles(side.order), side.layout)
        operands.append(x if kind == "identity" else emitter.with_axes("Unsqueeze", x, axes))
    return emitter.op("Mul", operands)


def _correct_broadcast_dims(anchor: gs.Node, equation: Equation) -> None:
    """ONNX shape inference gives an Einsum output dim that broadcasts (1 in one operand) operand
    0's size; MatMul / Mul infer the broadcast size, so the output's recorded dim must agree."""
    out = anchor.outputs[0]
    if out.shape is None or len(out.shape) != len(equation.output):
        return
    dims = list(out.shape)
    for position, label in enumerate(equation.output):
        seen = [
            tensor.shape[labels.index(label)]
            for tensor, labels in zip(anchor.inputs, equation.operands)
            if label in labels and tensor.shape is not None
        ]
        if len(seen) == 2 and 1 in seen and seen[0] != seen[1]:
            dims[position] = seen[1] if seen[0] == 1 else seen[0]
    if dims != list(out.shape):
        out.shape = dims


RULES = (LowerUnaryEinsum(), LowerBinaryEinsum())


@dataclass(frozen=True)
class EinsumToMatMul(Pass):
    """Lower one- and two-operand Einsum to MatMul / Mul / Transpose / Reshape / ReduceSum."""

    name = "einsum-to-matmul"

    def call(self, graph: gs.Graph) -> PassResult:
        result = run_rules(graph, RULES, "einsums_lowered")
        if result.modified:
            ir.refresh_shapes(graph)
        return result
