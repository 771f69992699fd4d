"""`fuse-matmul-add`: fold a bias Add into the MatMul before it.

    Add(MatMul(a, W), b) -> Gemm(a, W, b)                                     (a, W 2-D)
    Add(MatMul(a, W), b) -> Reshape(Gemm(Reshape(a, [-1, K]), W, b), a.shape[:-1] + [N])   (rank(a) > 2)
    Add(b, MatMul(a, W)) -> Add(MatMul(a, W), b), the MatMul scheduled right before the Add
                                                                              (rank(a) > 2, keep-matmul)

`Add(mm, b)` and `Add(b, mm)` both match. Broadcasting never changes: for 2-D operands `b` must
broadcast one way to the MatMul's [M, N] output, which is what Gemm's C allows ([], [1], [N], [1, N],
[M, 1], [M, N]); for rank(a) > 2 it may vary along the last axis only ([N], [1, ..., 1, N], [1], []),
so a [seq, N] bias is refused. A 1-D operand (vector semantics) and a batched (rank > 2) weight are
refused. `high_rank` picks what rank(a) > 2 becomes: "reshape-gemm" flattens the leading axes and
restores them after the Gemm (static dims when known, else `Shape(a)[:-1] ++ [N]` so dynamic batch and
sequence sizes keep working); "keep-matmul" leaves the MatMul and only puts its bias Add directly
after it, MatMul output first, for back ends that pattern-match the pair.

Ordering: run `fuse-qkv` before this pass. fuse-qkv concatenates sibling MatMuls that read one
input (with their bias Adds); once a projection became a Gemm, or a Reshape -> Gemm -> Reshape whose
Reshape is private to it, there are no siblings left to find.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, apply_rules, run_rules

HighRank = Literal["reshape-gemm", "keep-matmul"]

#: Gemm-11 made C optional and is the oldest Gemm this pass emits.
MIN_GEMM_OPSET = 11
#: Shape{start, end} exists from opset 15; before it the leading dims are sliced off with Slice.
SHAPE_SLICE_OPSET = 15
#: Reshape's `allowzero` exists from opset 14 (a 0 in the target shape otherwise means "copy").
ALLOWZERO_OPSET = 14
GEMM_DTYPES = (np.float16, np.float32, np.float64)

Dims = list[Any]


def _dims(tensor: gs.Tensor) -> Dims | None:
    shape = tensor.shape
    return None if shape is None else [int(d) if isinstance(d, (int, np.integer)) else d for d in shape]


def _same(x: Any, y: Any) -> bool:
    """Equal for every binding of the symbols: equal ints or the same symbol name."""
    return x is not None and y is not None and x == y


def _fmt(dims: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _match_pair(anchor: gs.Node, ctx: RewriteContext) -> Match | None:
    """Add(MatMul(a, W), b) or Add(b, MatMul(a, W)); a MatMul read only by this Add is preferred."""
    found = []
    for index in (0, 1):
        matmul = ctx.producer(anchor.inputs[index], "MatMul")
        bias = anchor.inputs[1 - index]
        if matmul is not None and bias is not anchor.inputs[index]:
            found.append((len(anchor.inputs[index].outputs) != 1, index, matmul, bias))
    if not found:
        return None
    _, index, matmul, bias = min(found, key=lambda item: item[:2])
    a, w = matmul.inputs
    values = {"a": a, "w": w, "bias": bias, "mm_index": index, "matmul": matmul,
              "a_dims": _dims(a), "w_dims": _dims(w), "bias_dims": _dims(bias)}
    return Match(anchor, [matmul, anchor], values)


def _operand_reason(match: Match) -> str | None:
    a_dims, w_dims = match["a_dims"], match["w_dims"]
    if a_dims is None or w_dims is None:
        return "MatMul operand rank is unknown"
    if len(a_dims) < 2 or len(w_dims) < 2:
        return "MatMul has a 1-D operand (vector semantics)"
    if len(w_dims) > 2:
        return f"weight is {len(w_dims)}-D (batched weights)"
    return None


def _out_dims(match: Match) -> Dims:
    return match["a_dims"][:-1] + [match["w_dims"][1]]


def _gemm_bias_reason(bias_dims: Dims | None, out_dims: Dims) -> str | None:
    """Why `bias` would not broadcast one way to the [M, N] output (what Gemm's C allows)."""
    if bias_dims is None:
        return "bias shape is unknown"
    if len(bias_dims) > 2:
        return f"bias rank {len(bias_dims)} > 2 would grow the output's rank"
    for b, o in zip(reversed(bias_dims), reversed(out_dims)):
        if b != 1 and not _same(b, o):
            return f"bias {_fmt(bias_dims)} does not broadcast one way to the output {_fmt(out_dims)}"
    return None


def _last_axis_bias_reason(bias_dims: Dims | None, out_dims: Dims) -> str | None:
    """Why `bias` does not broadcast over the last axis only, without growing the output."""
    if bias_dims is None:
        return "bias shape is unknown"
    if len(bias_dims) > len(out_dims):
        return f"bias rank {len(bias_dims)} > output rank {len(out_dims)} would grow the output"
    if any(d != 1 for d in bias_dims[:-1]):
        return f"bias {_fmt(bias_dims)} spans more than the last axis"
    if bias_dims and bias_dims[-1] != 1 and not _same(bias_dims[-1], out_dims[-1]):
        return f"bias {_fmt(bias_dims)} does not match the output's last dim {out_dims[-1]}"
    return None


def _gemm_reason(match: Match, ctx: RewriteContext) -> str | None:
    if ctx.opset < MIN_GEMM_OPSET:
        return f"opset {ctx.opset} < {MIN_GEMM_OPSET}"
    dtype = match.anchor.outputs[0].dtype or match["a"].dtype
    if dtype is None:
        return "dtype is unknown"
    if np.dtype(dtype) not in [np.dtype(t) for t in GEMM_DTYPES]:
        return f"dtype {np.dtype(dtype)} is not a float type (Gemm is fused for floats only)"
    return None


class MatMulAddToGemm(RewriteRule):
    anchor_ops = ("Add",)
    math = "Add(MatMul(a, W), b) -> Gemm(a, W, b) for 2-D a, W and b broadcasting one way to [M, N]"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        match = _match_pair(anchor, ctx)
        if match is None or (match["a_dims"] is not None and len(match["a_dims"]) > 2):
            return None
        return match

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        return (_operand_reason(match) or _gemm_bias_reason(match["bias_dims"], _out_dims(match))
                or _gemm_reason(match, ctx))

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        out = ctx.variable("gemm", match.anchor.outputs[0].dtype)
        gemm = ctx.node("Gemm", [match["a"], match["w"], match["bias"]], [out], base="gemm")
        return Replacement([gemm], [out])


class ReshapeMatMulAddToGemm(RewriteRule):
    anchor_ops = ("Add",)
    math = "Add(MatMul(a, W), b) -> Reshape(Gemm(Reshape(a, [-1, K]), W, b), a.shape[:-1] + [N]) for rank(a) > 2"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        match = _match_pair(anchor, ctx)
        if match is None or match["a_dims"] is None or len(match["a_dims"]) <= 2:
            return None
        return match

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        reason = (_operand_reason(match) or _last_axis_bias_reason(match["bias_dims"], _out_dims(match))
                  or _gemm_reason(match, ctx))
        if reason is not None:
            return reason
        a_dims, w_dims = match["a_dims"], match["w_dims"]
        k = next((d for d in (w_dims[0], a_dims[-1]) if isinstance(d, int)), None)
        if k is None or k == 0:
            return "K is dynamic" if k is None else "K is 0 (Reshape to [-1, 0] is ambiguous)"
        if not isinstance(w_dims[1], int):
            return "N is dynamic"
        if 0 in a_dims[:-1] and ctx.opset < ALLOWZERO_OPSET:
            return f"a zero-sized leading dim needs Reshape's allowzero (opset >= {ALLOWZERO_OPSET})"
        return None

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        a, dtype = match["a"], match.anchor.outputs[0].dtype
        a_dims, w_dims = match["a_dims"], match["w_dims"]
        k = next(d for d in (w_dims[0], a_dims[-1]) if isinstance(d, int))
        n = w_dims[1]
        flat = ctx.variable("flat", dtype, [None, k])
        nodes = [ctx.node("Reshape", [a, ctx.const("flat_shape", np.array([-1, k], np.int64))], [flat],
                          base="flatten_rows")]
        bias = match["bias"]
        if len(match["bias_dims"]) > 2:
            bias, bias_nodes = _flatten_bias(bias, ctx)
            nodes += bias_nodes
        gemm_out = ctx.variable("gemm", dtype, [None, n])
        nodes.append(ctx.node("Gemm", [flat, match["w"], bias], [gemm_out], base="gemm"))
        shape, shape_nodes = _output_shape(a, a_dims[:-1], n, ctx)
        nodes += shape_nodes
        out = ctx.variable("unflat", dtype, _out_dims(match))
        dynamic = bool(shape_nodes) or 0 in a_dims[:-1]
        attrs = {"allowzero": 1} if dynamic and ctx.opset >= ALLOWZERO_OPSET else {}
        nodes.append(ctx.node("Reshape", [gemm_out, shape], [out], base="unflatten_rows", **attrs))
        return Replacement(nodes, [out])


def _flatten_bias(bias: gs.Tensor, ctx: RewriteContext) -> tuple[gs.Tensor, list[gs.Node]]:
    """A [1, ..., 1, N] bias as [N] (Gemm's C is at most 2-D)."""
    value = ctx.constant(bias)
    if value is not None:
        return ctx.const("gemm_bias", value.reshape(-1)), []
    flat = ctx.variable("gemm_bias", bias.dtype)
    shape = ctx.const("bias_shape", np.array([-1], np.int64))
    return flat, [ctx.node("Reshape", [bias, shape], [flat], base="flatten_bias")]


def _output_shape(a: gs.Tensor, leading: Dims, n: int, ctx: RewriteContext) -> tuple[gs.Tensor, list[gs.Node]]:
    """`a.shape[:-1] + [N]`: a constant when the leading dims are static, else read off `a` at run time."""
    if all(isinstance(d, int) for d in leading):
        return ctx.const("unflat_shape", np.array([*leading, n], np.int64)), []
    lead = ctx.variable("leading_dims", np.int64, [len(leading)])
    if ctx.opset >= SHAPE_SLICE_OPSET:
        nodes = [ctx.node("Shape", [a], [lead], base="leading_dims", start=0, end=-1)]
    else:
        full = ctx.variable("input_shape", np.int64, [len(leading) + 1])
        bounds = [ctx.const(base, np.array([v], np.int64)) for base, v in (("starts", 0), ("ends", -1), ("axes", 0))]
        nodes = [ctx.node("Shape", [a], [full], base="input_shape"),
                 ctx.node("Slice", [full, *bounds], [lead], base="leading_dims")]
    shape = ctx.variable("unflat_shape", np.int64, [len(leading) + 1])
    last = ctx.const("last_dim", np.array([n], np.int64))
    nodes.append(ctx.node("Concat", [lead, last], [shape], base="unflat_shape", axis=0))
    return shape, nodes


@dataclass(frozen=True)
class BiasAddAfterMatMul(RewriteRule):
    """Canonical form for back ends: the MatMul output is the Add's first input, nothing in between.

    `positions` (node id -> index in the node list) is taken once before the single sweep that runs
    this rule, so a pair already in canonical form is not matched again.
    """

    positions: Mapping[int, int] = field(default_factory=dict)
    anchor_ops = ("Add",)
    math = "Add(b, MatMul(a, W)) -> Add(MatMul(a, W), b), the MatMul right before the Add, for rank(a) > 2"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        match = _match_pair(anchor, ctx)
        if match is None or match["a_dims"] is None or len(match["a_dims"]) <= 2:
            return None
        position = self.positions.get(id(match["matmul"]))
        if match["mm_index"] == 0 and position is not None and position + 1 == self.positions.get(id(anchor)):
            return None  # already canonical
        return match

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        return _operand_reason(match) or _last_axis_bias_reason(match["bias_dims"], _out_dims(match))

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        product = ctx.variable("matmul", match.anchor.outputs[0].dtype, _out_dims(match))
        out = ctx.variable("bias_add", match.anchor.outputs[0].dtype)
        matmul = ctx.node("MatMul", [match["a"], match["w"]], [product], base="matmul")
        return Replacement([matmul, ctx.node("Add", [product, match["bias"]], [out], base="bias_add")], [out])


@dataclass(frozen=True)
class FuseMatMulAdd(Pass):
    """Fuse MatMul + bias Add into Gemm (rank > 2: Reshape around the Gemm, or a canonical MatMul + Add)."""

    name = "fuse-matmul-add"

    high_rank: HighRank = field(
        default="reshape-gemm",
        metadata={"help": "rank(a) > 2: reshape-gemm (flatten to 2-D, Gemm, restore) or keep-matmul "
                  "(MatMul + Add(mm, bias) next to each other)"},
    )

    def call(self, graph: gs.Graph) -> PassResult:
        if self.high_rank == "reshape-gemm":
            return run_rules(graph, (MatMulAddToGemm(), ReshapeMatMulAddToGemm()), "matmul_adds_fused")
        # One sweep is the fixpoint: no rule here makes a MatMul feeding an Add that it did not
        # already see, and `positions` describes the node list as the sweep found it.
        positions = {id(node): index for index, node in enumerate(graph.nodes)}
        sweep = apply_rules(graph, (MatMulAddToGemm(), BiasAddAfterMatMul(positions)))
        stats: dict[str, int | float | str | bool] = {"matmul_adds_fused": sweep.total, **sweep.applied}
        return PassResult(graph, sweep.total > 0, stats, sweep.refusals)
