"""`matmul-to-einsum`: rewrite MatMul as the equivalent Einsum, for back ends that prefer Einsum.

    MatMul(a[..., m, k], b[..., k, n]) -> Einsum(a, b){"...ij,...jk->...ik"}

The equation is exact for every pair of known ranks:

- 1-D operands keep MatMul's vector semantics: `[k] x [b, k, n]` is `j,ajk->ak`, `[m, k] x [k]` is
  `ij,j->i`, `[k] x [k]` is `j,j->`.
- Batch dims align from the right, as MatMul broadcasts them. The longer operand's extra leading
  batch dims get letters of their own (`abij,bjk->abik` for ranks 4 and 3); the overlapping ones get
  shared letters when they are provably equal (same static size or same symbol) and otherwise one
  ellipsis (`...ij,...jk->...ik`), because an ellipsis broadcasts size-1 dims exactly as MatMul
  does (ONNX shape inference asks for equally wide ellipses, which the overlap always is).

Refused, with the reason: opset < 12 (Einsum does not exist), an operand of unknown rank, an element
type Einsum's schema lacks (bfloat16), ranks needing more than the 49 spare letters, and a batch dim
that is a static 1 in one operand and dynamic in the other: ONNX's Einsum shape inference would
record the result's dim as 1 (it does not broadcast there), and later passes fold static dims.
Two different symbols are allowed (the inference then names the dim after operand 0's symbol).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult
from passes.infra.rewrite import Match, Replacement, RewriteContext, RewriteRule, run_rules
from passes.transforms._einsum import ELLIPSIS

EINSUM_MIN_OPSET = 12
#: letters for batch dims; i, j, k name the matrix dims.
BATCH_LETTERS = "".join(c for c in string.ascii_lowercase if c not in "ijk") + string.ascii_uppercase


def _provably_equal(x: object, y: object) -> bool:
    """Equal for every binding of the symbols: the same static size or the same symbol."""
    if _is_static(x) and _is_static(y):
        return int(x) == int(y)  # type: ignore[call-overload]
    return isinstance(x, str) and x == y


def _is_static(dim: object) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


def _overlap(a: Sequence[object], b: Sequence[object]) -> list[tuple[object, object]]:
    """The batch dims both operands have, paired from the right as MatMul broadcasts them."""
    batch_a, batch_b = max(len(a) - 2, 0), max(len(b) - 2, 0)
    overlap = min(batch_a, batch_b)
    return list(zip(a[batch_a - overlap:batch_a], b[batch_b - overlap:batch_b]))


def broadcast_reason(a: Sequence[object], b: Sequence[object]) -> str | None:
    """Why the Einsum would be recorded with a wrong shape: where MatMul broadcasts a batch dim that
    is a static 1 in one operand and dynamic in the other, ONNX's Einsum shape inference says 1."""
    for x, y in _overlap(a, b):
        if (x == 1 and _is_static(x) and not _is_static(y)) or (y == 1 and _is_static(y) and not _is_static(x)):
            return f"batch dims {x} and {y!r} may broadcast at run time (ONNX would infer Einsum's dim as 1)"
    return None


def matmul_equation(a: Sequence[object], b: Sequence[object]) -> str:
    """The Einsum equation computing MatMul for operands of shapes `a` and `b` (dims: int, symbol
    or None). Ranks must be >= 1 and leave at most len(BATCH_LETTERS) batch dims."""
    batch_a, batch_b = max(len(a) - 2, 0), max(len(b) - 2, 0)
    overlap, extra = min(batch_a, batch_b), abs(batch_a - batch_b)
    lead = BATCH_LETTERS[:extra]
    shared = BATCH_LETTERS[extra:extra + overlap]
    if not all(_provably_equal(x, y) for x, y in _overlap(a, b)):
        shared = ELLIPSIS
    a_term = (lead if batch_a > batch_b else "") + shared + ("ij" if len(a) >= 2 else "j")
    b_term = (lead if batch_b > batch_a else "") + shared + ("jk" if len(b) >= 2 else "j")
    out = lead + shared + ("i" if len(a) >= 2 else "") + ("k" if len(b) >= 2 else "")
    return f"{a_term},{b_term}->{out}"


def _einsum_types(opset: int) -> frozenset[str]:
    (constraint,) = onnx.defs.get_schema("Einsum", opset).type_constraints
    return frozenset(constraint.allowed_type_strs)


class MatMulAsEinsum(RewriteRule):
    anchor_ops = ("MatMul",)
    math = "MatMul(a, b) -> Einsum(a, b){...ij,...jk->...ik}"

    def match(self, anchor: gs.Node, ctx: RewriteContext) -> Match | None:
        return Match(anchor, [anchor])

    def check(self, match: Match, ctx: RewriteContext) -> str | None:
        if ctx.opset < EINSUM_MIN_OPSET:
            return f"Einsum needs opset >= {EINSUM_MIN_OPSET} (the graph has opset {ctx.opset})"
        for index, tensor in enumerate(match.anchor.inputs):
            if tensor.shape is None:
                return f"rank of operand {index} is unknown"
            if len(tensor.shape) == 0:
                return f"operand {index} is a scalar"
            if len(tensor.shape) - 2 > len(BATCH_LETTERS):
                return f"operand {index} has rank {len(tensor.shape)}: more batch dims than einsum letters"
        reason = broadcast_reason(*(list(t.shape) for t in match.anchor.inputs))
        if reason is not None:
            return reason
        elem = ir.elem_type(match.anchor.inputs[0])
        if elem is None:
            return "the operands' element type is unknown"
        name = onnx.TensorProto.DataType.Name(elem).lower()
        if f"tensor({name})" not in _einsum_types(ctx.opset):
            return f"Einsum has no {name} (opset {ctx.opset})"
        return None

    def rewrite(self, match: Match, ctx: RewriteContext) -> Replacement:
        a, b = match.anchor.inputs
        out = ctx.variable("einsum", match.anchor.outputs[0].dtype)
        equation = matmul_equation(list(a.shape), list(b.shape))
        return Replacement([ctx.node("Einsum", [a, b], [out], base="einsum", equation=equation)], [out])


RULES = (MatMulAsEinsum(),)


@dataclass(frozen=True)
class MatMulToEinsum(Pass):
    """Rewrite MatMul as the equivalent Einsum (exact for every pair of known ranks)."""

    name = "matmul-to-einsum"

    def call(self, graph: gs.Graph) -> PassResult:
        return run_rules(graph, RULES, "matmuls_to_einsum")
