"""`fuse-qkv`: concatenate sibling projections of one input into a single MatMul and a Split.

    MatMul(x, W_i) for i = 1..n -> Split(MatMul(x, [W_1 | ... | W_n]), axis=-1, sizes=[N_1, ..., N_n])
    Add(MatMul(x, W_i), b_i) for every i -> Split(Add(MatMul(x, [W_1 | ... | W_n]), [b_1 | ... | b_n]), axis=-1)

The siblings are MatMuls, or Gemms with alpha = 1, transA = 0 and beta = 1 when C is given (transB = 1:
the constant weight is transposed), that read the same input tensor through constant 2-D weights
[K, N_i] with one K. That covers Q/K/V, the gate/up pair of a SwiGLU MLP, and grouped-KV shapes
(N differs per branch). A sibling's bias is a constant Add right after it (either operand order,
broadcast along the last axis only, read by nothing else) or a Gemm's constant C; when *every*
sibling has one they fold into one Add with the concatenated bias before the Split, otherwise the
Adds stay after the Split (and a Gemm's C is re-applied there by an Add).

The anchor is the shared input, not a single output, so this pass does not use `run_rules`: one
scan groups MatMul/Gemm consumers by input tensor, each sibling is checked (with a refusal reason
when it cannot join), and the fused nodes are placed where the first sibling was. Every input they
read (the shared input, constants) exists there, and the Split writes the siblings' own output
tensors, so consumers and graph outputs keep their names: a sibling whose output is a graph output
fuses like any other (only its bias Add cannot be folded, since the MatMul result must stay visible).

Ordering: run this pass before `fuse-matmul-add`, which turns each projection's MatMul + Add into a
Gemm (or Reshape -> Gemm -> Reshape) and so hides the siblings from this pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, Refusal
from passes.infra.rewrite import RewriteContext

#: Split accepts a negative axis from opset 11; its sizes moved from an attribute to an input at 13.
MIN_OPSET = 11
SPLIT_SIZES_INPUT_OPSET = 13

#: the name refusals and stats use for the rewrite (the math lines are in the module docstring).
RULE = "ConcatSiblingMatMuls"


@dataclass(frozen=True)
class _Sibling:
    """One projection of the shared input, checked and normalised to MatMul(x, weight) (+ bias)."""

    node: gs.Node  # the MatMul or Gemm
    weight: np.ndarray  # [K, N], a Gemm's transB already undone
    bias: np.ndarray | None  # [N]: the constant added right after (Add or Gemm C), when it can fold
    bias_add: gs.Node | None  # the Add that applies `bias` (None when it is the Gemm's C)
    gemm_c: gs.Tensor | None  # a Gemm's C, re-applied after the Split unless every bias folds

    @property
    def k(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n(self) -> int:
        return int(self.weight.shape[1])


def _label(node: gs.Node) -> str:
    return node.name or node.op


def _check_sibling(node: gs.Node, ctx: RewriteContext) -> _Sibling | str:
    """The sibling, or why it cannot join."""
    gemm_c = None
    if node.op == "Gemm":
        attrs = node.attrs
        if int(attrs.get("transA", 0)):
            return "Gemm transA=1"
        if float(attrs.get("alpha", 1.0)) != 1.0:
            return f"Gemm alpha={float(attrs['alpha']):g} != 1"
        gemm_c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if gemm_c is not None and float(attrs.get("beta", 1.0)) != 1.0:
            return f"Gemm beta={float(attrs['beta']):g} != 1"
    weight = ctx.constant(node.inputs[1])
    if weight is None:
        return "weight is not a constant"
    if weight.ndim != 2:
        return f"weight is {weight.ndim}-D, not 2-D"
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        weight = weight.T
    n = int(weight.shape[1])
    if gemm_c is not None:
        bias, bias_add = _bias_vector(ctx.constant(gemm_c), n, out_rank=2), None
    else:
        bias, bias_add = _bias_after(node, n, ctx)
    return _Sibling(node, weight, bias, bias_add, gemm_c)


def _out_rank(node: gs.Node) -> int | None:
    if node.op == "Gemm":
        return 2
    shape = node.inputs[0].shape
    return None if shape is None else max(len(shape), 1)


def _bias_after(node: gs.Node, n: int, ctx: RewriteContext) -> tuple[np.ndarray | None, gs.Node | None]:
    """The constant [N] bias of an Add that alone reads `node`'s output, and that Add."""
    out = node.outputs[0]
    if ctx.is_graph_output(out) or len(out.outputs) != 1:
        return None, None
    add = out.outputs[0]
    if add.op != "Add" or not ir.is_default_domain(add) or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out:
        return None, None
    bias = _bias_vector(ctx.constant(other), n, _out_rank(node))
    return (bias, add) if bias is not None else (None, None)


def _bias_vector(value: np.ndarray | None, n: int, out_rank: int | None) -> np.ndarray | None:
    """`value` as [N] when adding it only broadcasts along the last axis and keeps the output's rank."""
    if value is None or value.ndim > (out_rank if out_rank is not None else 1):
        return None
    if any(d != 1 for d in value.shape[:-1]) or value.size not in (1, n):
        return None
    return np.ascontiguousarray(np.broadcast_to(value.reshape(-1), (n,)))


def _candidates(graph: gs.Graph) -> dict[int, list[gs.Node]]:
    """MatMul/Gemm nodes grouped by their first input, in node order; inputs read by one are dropped."""
    groups: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and ir.is_default_domain(node) and len(node.inputs) >= 2:
            groups.setdefault(id(node.inputs[0]), []).append(node)
    return {key: nodes for key, nodes in groups.items() if len(nodes) >= 2}


def _plan_groups(
    graph: gs.Graph, ctx: RewriteContext, min_siblings: int
) -> tuple[list[list[_Sibling]], list[Refusal]]:
    """The sibling groups to fuse, and why the other candidates are left alone."""
    groups: list[list[_Sibling]] = []
    refusals: list[Refusal] = []
    for nodes in _candidates(graph).values():
        by_k: dict[tuple[int, str], list[_Sibling]] = {}
        for node in nodes:
            checked = _check_sibling(node, ctx)
            if isinstance(checked, str):
                refusals.append(Refusal(_label(node), checked))
            else:
                by_k.setdefault((checked.k, checked.weight.dtype.str), []).append(checked)
        for siblings in by_k.values():
            reason = None
            if len(by_k) > 1 and len(siblings) < min_siblings:
                reason = "weights have different K"
            elif len(by_k) == 1 and 1 < len(siblings) < min_siblings:
                reason = f"{len(siblings)} siblings < min_siblings={min_siblings}"
            elif ctx.opset < MIN_OPSET and len(siblings) >= min_siblings:
                reason = f"opset {ctx.opset} < {MIN_OPSET} (Split with axis=-1)"
            if reason is not None:
                refusals.extend(Refusal(_label(s.node), reason) for s in siblings)
            elif len(siblings) >= min_siblings:
                groups.append(siblings)
    return groups, refusals


def _fuse(siblings: list[_Sibling], ctx: RewriteContext) -> tuple[list[gs.Node], dict[int, gs.Node]]:
    """Rewrite one group: the nodes that take the first sibling's place, and per Gemm whose C is
    re-applied, the Add that takes that Gemm's place. Detaches the replaced nodes."""
    first = siblings[0].node
    x, dtype = first.inputs[0], first.outputs[0].dtype
    fold_bias = all(s.bias is not None for s in siblings)
    weight = np.concatenate([s.weight for s in siblings], axis=1)
    product = ctx.variable("qkv", dtype)
    nodes = [ctx.node("MatMul", [x, ctx.const("qkv_weight", weight)], [product], base="qkv_matmul")]
    if fold_bias:
        biased = ctx.variable("qkv_biased", dtype)
        bias = ctx.const("qkv_bias", np.concatenate([s.bias for s in siblings]))  # type: ignore[misc]
        nodes.append(ctx.node("Add", [product, bias], [biased], base="qkv_bias_add"))
        product = biased
    targets: list[gs.Tensor] = []
    readds: dict[int, gs.Node] = {}
    for sibling in siblings:
        own = sibling.node.outputs[0]
        if fold_bias and sibling.bias_add is not None:
            own = sibling.bias_add.outputs[0]
            ir.detach_node(sibling.bias_add)
        ir.detach_node(sibling.node)
        if sibling.gemm_c is not None and not fold_bias:
            part = ctx.variable("qkv_part", dtype)
            readds[id(sibling.node)] = ctx.node("Add", [part, sibling.gemm_c], [own], base="gemm_bias_add")
            own = part
        targets.append(own)
    sizes = [s.n for s in siblings]
    if ctx.opset >= SPLIT_SIZES_INPUT_OPSET:
        split = ctx.node("Split", [product, ctx.const("qkv_sizes", np.array(sizes, np.int64))], targets,
                         base="qkv_split", axis=-1)
    else:
        split = ctx.node("Split", [product], targets, base="qkv_split", axis=-1, split=sizes)
    return [*nodes, split], readds


@dataclass(frozen=True)
class FuseQkv(Pass):
    """Concatenate sibling MatMuls/Gemms (Q/K/V, gate/up) that read one input into one MatMul + Split."""

    name = "fuse-qkv"

    min_siblings: int = field(
        default=2, metadata={"min": 2, "help": "fuse only groups of at least this many sibling projections (>= 2)"}
    )

    def __post_init__(self) -> None:
        if self.min_siblings < 2:
            raise ValueError(f"min_siblings must be >= 2, got {self.min_siblings}")

    def call(self, graph: gs.Graph) -> PassResult:
        ctx = RewriteContext(graph)
        groups, refusals = _plan_groups(graph, ctx, self.min_siblings)
        refusals = [Refusal(r.node, f"{RULE}: {r.reason}") for r in refusals]
        stats: dict[str, int | float | str | bool] = {
            "groups_fused": len(groups),
            RULE: len(groups),
            "projections_fused": sum(len(g) for g in groups),
            "biases_folded": sum(len(g) for g in groups if all(s.bias is not None for s in g)),
        }
        if not groups:
            return PassResult(graph, False, stats, refusals)
        in_place_of: dict[int, list[gs.Node]] = {}
        removed: set[int] = set()
        for siblings in groups:
            removed.update(id(s.node) for s in siblings)
            if all(s.bias is not None for s in siblings):
                removed.update(id(s.bias_add) for s in siblings if s.bias_add is not None)
            fused, readds = _fuse(siblings, ctx)
            in_place_of[id(siblings[0].node)] = fused
            for key, node in readds.items():  # the first sibling's re-applied C goes after the Split
                in_place_of.setdefault(key, []).append(node)
        graph.nodes = [new for node in graph.nodes
                       for new in (in_place_of.get(id(node), ()) if id(node) in removed else (node,))]
        return PassResult(graph, True, stats, refusals)
