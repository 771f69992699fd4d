"""Einsum equations, shared by `einsum-to-matmul` and `matmul-to-einsum`: parse and validate an
equation against the operand ranks, expand its ellipses, and plan the lowering of a one- or
two-operand Einsum to ReduceSum / Transpose / Reshape / MatMul.

Labels are strings: a letter, or `...0`, `...1`, ... for the dims an ellipsis covers (ONNX shape
inference requires every ellipsis of one equation to cover the same number of dims). An
`EinsumError`'s message is the refusal reason the passes report.

A two-operand plan classifies every label: *batch* (both operands and the output), *contracted*
(both operands, not the output), *free* (one operand and the output) or *summed* (one operand, not
the output; a contracted label that is a static 1 in one operand and not in the other is summed
in both, which is exact under Einsum's size-1 broadcasting). Each operand is summed, transposed to
`[lead..., batch..., free..., contracted...]` (the right one to `[batch..., contracted..., free...]`)
and its groups merged into one MatMul axis each; `lead` are free labels left as MatMul broadcast
dims of one operand only. Among the equivalent plans (operand order, label orders, lead choice)
the one with the fewest Transpose / Reshape nodes wins.
"""

from __future__ import annotations

import itertools
import math
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

ELLIPSIS = "..."
LETTERS = frozenset(string.ascii_letters)

#: one axis of a MatMul operand or result: the labels merged into it (empty: an inserted 1).
Slot = tuple[str, ...]
Dims = Sequence[int | None]
ReshapeKind = Literal["identity", "unsqueeze", "squeeze", "reshape"]
#: a Reshape target entry that keeps the input dim at the same place.
COPY: Literal["copy"] = "copy"


class EinsumError(ValueError):
    """An equation this module cannot handle; the message is the refusal reason."""


@dataclass(frozen=True)
class Equation:
    """An explicit equation with ellipses expanded: labels per operand and of the output."""

    operands: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]


def parse(equation: str, ranks: Sequence[int | None]) -> Equation:
    """The equation for operands of `ranks` (None: unknown), or EinsumError with the reason."""
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    explicit = "->" in equation.replace(" ", "")
    terms = [_items(term, f"operand {i}") for i, term in enumerate(lhs.split(","))]
    if len(terms) != len(ranks):
        raise EinsumError(f"the equation has {len(terms)} operand terms but the node has {len(ranks)} inputs")
    widths = {i: _ellipsis_width(i, term, rank) for i, (term, rank) in enumerate(zip(terms, ranks))}
    covered = sorted((i, w) for i, w in widths.items() if w is not None)
    clash = [(i, w) for i, w in covered if w != covered[0][1]]
    if clash:
        (first, width), (other, other_width) = covered[0], clash[0]
        raise EinsumError(f"ellipsis covers {width} dims in operand {first} but {other_width} in operand {other}")
    width = covered[0][1] if covered else 0
    operands = tuple(_expand(term, width) for term in terms)
    for index, labels in enumerate(operands):
        repeated = _first_repeat(labels)
        if repeated is not None:
            raise EinsumError(f"index {repeated} repeats in operand {index}")
    output = _explicit_output(rhs, operands, width, bool(covered)) if explicit else _implicit_output(operands, width)
    return Equation(operands, output)


def _items(term: str, what: str) -> list[str]:
    """Letters and ELLIPSIS markers of one term."""
    items: list[str] = []
    rest = term
    while rest:
        if rest.startswith(ELLIPSIS):
            if ELLIPSIS in items:
                raise EinsumError(f"{what} has two ellipses")
            items.append(ELLIPSIS)
            rest = rest[len(ELLIPSIS):]
        elif rest[0] in LETTERS:
            items.append(rest[0])
            rest = rest[1:]
        else:
            raise EinsumError(f"invalid character {rest[0]!r} in the equation")
    return items


def _ellipsis_width(index: int, term: list[str], rank: int | None) -> int | None:
    """How many dims the term's ellipsis covers (None: no ellipsis); checks the rank."""
    letters = sum(1 for item in term if item != ELLIPSIS)
    if ELLIPSIS not in term:
        if rank is not None and rank != letters:
            raise EinsumError(f"operand {index} has rank {rank} but the equation gives it {letters} indices")
        return None
    if rank is None:
        raise EinsumError(f"rank of operand {index} is unknown (needed for the ellipsis)")
    if rank < letters:
        raise EinsumError(f"operand {index} has rank {rank} but the equation gives it {letters} indices")
    return rank - letters


def _expand(term: list[str], width: int) -> tuple[str, ...]:
    return tuple(label for item in term for label in (ellipsis_labels(width) if item == ELLIPSIS else (item,)))


def ellipsis_labels(width: int) -> tuple[str, ...]:
    return tuple(f"{ELLIPSIS}{k}" for k in range(width))


def _first_repeat(labels: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            return label
        seen.add(label)
    return None


def _explicit_output(
    rhs: str, operands: tuple[tuple[str, ...], ...], width: int, has_ellipsis: bool
) -> tuple[str, ...]:
    term = _items(rhs, "the output")
    if has_ellipsis and ELLIPSIS not in term:
        raise EinsumError("the operands have an ellipsis but the output does not")
    output = _expand(term, width)
    repeated = _first_repeat(output)
    if repeated is not None:
        raise EinsumError(f"index {repeated} repeats in the output")
    known = {label for labels in operands for label in labels}
    for label in output:
        if label not in known:
            raise EinsumError(f"output index {label} is in no operand")
    return output


def _implicit_output(operands: tuple[tuple[str, ...], ...], width: int) -> tuple[str, ...]:
    """Ellipsis dims, then the letters used once, in alphabetical order (lower case only)."""
    counts = Counter(label for labels in operands for label in labels if not label.startswith(ELLIPSIS))
    upper = sorted(label for label in counts if label.isupper())
    if upper:
        raise EinsumError(f"implicit output with upper-case index {upper[0]} (onnxruntime rejects it)")
    return ellipsis_labels(width) + tuple(sorted(label for label, count in counts.items() if count == 1))


# -- one operand -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnaryPlan:
    """ReduceSum(x, sum_axes) then Transpose(perm); both optional."""

    sum_axes: tuple[int, ...]
    perm: tuple[int, ...] | None


def plan_unary(equation: Equation) -> UnaryPlan:
    (labels,) = equation.operands
    kept = [label for label in labels if label in equation.output]
    perm = tuple(kept.index(label) for label in equation.output)
    return UnaryPlan(
        tuple(i for i, label in enumerate(labels) if label not in equation.output),
        None if perm == tuple(range(len(perm))) else perm,
    )


# -- two operands ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OperandPlan:
    """How one Einsum input becomes a MatMul operand: ReduceSum, Transpose, then re-slot."""

    index: int  # which Einsum input
    sum_axes: tuple[int, ...]  # axes of the input summed away first (keepdims=0)
    perm: tuple[int, ...] | None  # Transpose of the summed tensor (None: identity)
    order: tuple[str, ...]  # labels after the Transpose
    layout: tuple[Slot, ...]  # the MatMul operand's axes


@dataclass(frozen=True)
class BinaryPlan:
    """MatMul(left, right) -> re-slot `product` to `split` -> Transpose(out_perm) = Einsum output."""

    left: OperandPlan
    right: OperandPlan
    product: tuple[Slot, ...]
    split: tuple[str, ...]
    out_perm: tuple[int, ...] | None
    sizes: Mapping[str, int | None]  # static size of every label after broadcasting (None: dynamic)
    operands: tuple[tuple[str, ...], ...]  # the equation's operand labels

    def source(self, slot: Slot) -> tuple[int, tuple[int, ...]]:
        """An Einsum input holding every label of a merged slot, and their axes there (a merged
        slot is free labels of one operand or contracted labels of both)."""
        index = next(i for i, labels in enumerate(self.operands) if set(slot) <= set(labels))
        return index, tuple(self.operands[index].index(label) for label in slot)

    def cost(self) -> int:
        """Transpose and reshape-like nodes, a dynamic Reshape target counting extra."""
        transposes = sum(p is not None for p in (self.left.perm, self.right.perm, self.out_perm))
        steps = [
            (singles(self.left.order), self.left.layout),
            (singles(self.right.order), self.right.layout),
            (self.product, singles(self.split)),
        ]
        return transposes + sum(self.reshape_cost(before, after) for before, after in steps)

    def reshape_cost(self, before: tuple[Slot, ...], after: tuple[Slot, ...]) -> int:
        kind, _ = reshape_kind(before, after)
        if kind != "reshape":
            return int(kind != "identity")
        return 1 + 2 * sum(self.target_entry(before, after, j) is None for j in range(len(after)))

    def target_entry(self, before: tuple[Slot, ...], after: tuple[Slot, ...], j: int) -> int | str | None:
        """A Reshape target entry: "copy" the input dim at the same place (exact under batch
        broadcasting), else the static size, else None (computed from the operands' shapes)."""
        if j < len(before) and before[j] == after[j]:
            return COPY
        sizes = [self.sizes[label] for label in after[j]]
        if all(size is not None for size in sizes):
            return math.prod(s for s in sizes if s is not None)
        return None


def singles(labels: Iterable[str]) -> tuple[Slot, ...]:
    return tuple((label,) for label in labels)


def reshape_kind(before: tuple[Slot, ...], after: tuple[Slot, ...]) -> tuple[ReshapeKind, tuple[int, ...]]:
    """How to go from one slot layout to another: nothing, Unsqueeze / Squeeze (with axes) or Reshape."""
    if before == after:
        return "identity", ()
    if all(len(s) == 1 for s in before) and tuple(s for s in after if s) == before:
        return "unsqueeze", tuple(i for i, s in enumerate(after) if not s)
    if all(len(s) == 1 for s in after) and tuple(s for s in before if s) == after:
        return "squeeze", tuple(i for i, s in enumerate(before) if not s)
    return "reshape", ()


@dataclass(frozen=True)
class _Roles:
    """The labels of a two-operand equation by role (orders not yet chosen)."""

    batch: frozenset[str]
    contracted: frozenset[str]
    summed: tuple[frozenset[str], frozenset[str]]


@dataclass(frozen=True)
class ProductPlan:
    """Mul(left, right) with numpy broadcasting is the Einsum output (nothing is contracted):
    each operand is summed, transposed to the output's order and given 1s where it lacks a label."""

    left: OperandPlan
    right: OperandPlan

    def cost(self) -> int:
        return sum(
            (p.perm is not None) + (reshape_kind(singles(p.order), p.layout)[0] != "identity")
            for p in (self.left, self.right)
        )


def plan_binary(equation: Equation, shapes: Sequence[Dims]) -> BinaryPlan | ProductPlan:
    """The cheapest exact lowering; `shapes` are per-operand static sizes (None: dynamic)."""
    roles = _roles(equation, shapes)
    sizes = _size_table(equation, shapes)
    candidates = (
        _plan(equation, roles, sizes, left, choice)
        for left in (0, 1)
        for choice in _orders(equation, roles, left)
    )
    best = min(candidates, key=BinaryPlan.cost)
    if roles.contracted:
        return best
    product = ProductPlan(*(_broadcast_operand(equation, roles, index) for index in (0, 1)))
    return product if product.cost() <= best.cost() else best


def _broadcast_operand(equation: Equation, roles: _Roles, index: int) -> OperandPlan:
    """The operand in output order, with a unit slot for each output label it lacks (leading ones
    left to broadcasting)."""
    labels = set(equation.operands[index])
    order = tuple(label for label in equation.output if label in labels)
    first = next((i for i, label in enumerate(equation.output) if label in labels), len(equation.output))
    layout = tuple((label,) if label in labels else () for label in equation.output[first:])
    return _operand(equation, roles, index, order, layout)


def _roles(equation: Equation, shapes: Sequence[Dims]) -> _Roles:
    (a, b), out = equation.operands, equation.output
    shared = set(a) & set(b)
    broadcast: set[str] = set()
    for label in shared:
        x, y = shapes[0][a.index(label)], shapes[1][b.index(label)]
        if x is not None and y is not None and x != y and 1 not in (x, y):
            raise EinsumError(f"index {label} has sizes {x} and {y}")
        if label not in out and 1 in (x, y) and x != y:
            broadcast.add(label)  # sum_l A*B = (sum_l A) * (sum_l B) when one side has size 1
    contracted = frozenset(shared - set(out) - broadcast)
    summed = tuple(
        frozenset(label for label in labels if label not in out and label not in contracted) for labels in (a, b)
    )
    return _Roles(frozenset(shared & set(out)), contracted, (summed[0], summed[1]))


def _size_table(equation: Equation, shapes: Sequence[Dims]) -> dict[str, int | None]:
    """Per label its static size after broadcasting (None: dynamic)."""
    sizes: dict[str, int | None] = {}
    for label in dict.fromkeys(label for labels in equation.operands for label in labels):
        dims = [shapes[i][labels.index(label)] for i, labels in enumerate(equation.operands) if label in labels]
        sizes[label] = dims[0] if len(dims) == 1 else _broadcast_size(dims[0], dims[1])
    return sizes


def _broadcast_size(x: int | None, y: int | None) -> int | None:
    """The size of a label with size x in one operand and y in the other (None: dynamic)."""
    if x is None or y is None:
        static = x if y is None else y
        return None if static in (None, 1) else static
    return max(x, y)


@dataclass(frozen=True)
class _Choice:
    batch: tuple[str, ...]
    free: tuple[tuple[str, ...], tuple[str, ...]]  # (left, right)
    contracted: tuple[str, ...]
    lead: Literal["none", "left", "right"]


def _orders(equation: Equation, roles: _Roles, left: int) -> Iterable[_Choice]:
    """Candidate label orders: each group as the output or an operand orders it."""
    ops, out = equation.operands, equation.output

    def orders(members: Iterable[str], *sequences: Sequence[str]) -> list[tuple[str, ...]]:
        keep = set(members)
        return list(dict.fromkeys(tuple(label for label in seq if label in keep) for seq in sequences))

    free = [set(labels) & (set(out) - roles.batch) for labels in ops]
    lfree, rfree = free[left], free[1 - left]
    for batch, lf, rf, contracted, lead in itertools.product(
        orders(roles.batch, out, ops[left], ops[1 - left]),
        orders(lfree, out, ops[left]),
        orders(rfree, out, ops[1 - left]),
        orders(roles.contracted, ops[left], ops[1 - left]),
        ("none", "left", "right"),
    ):
        if (lead == "left" and len(lf) < 2) or (lead == "right" and len(rf) < 2):
            continue
        yield _Choice(batch, (lf, rf), contracted, lead)  # type: ignore[arg-type]


def _plan(equation: Equation, roles: _Roles, sizes: Mapping[str, int | None], left: int, choice: _Choice) -> BinaryPlan:
    """The MatMul plan for one choice of left operand, label orders and lead dims."""
    batch, contracted = choice.batch, choice.contracted
    lfree, rfree = choice.free
    lead_l = lfree[:-1] if choice.lead == "left" else ()
    lead_r = rfree[:-1] if choice.lead == "right" else ()
    m, n = lfree[len(lead_l):], rfree[len(lead_r):]
    m_slot: tuple[Slot, ...] = () if not batch and not lfree else (m,)  # absent: a 1-D MatMul operand
    n_slot: tuple[Slot, ...] = () if not batch and not rfree else (n,)
    left_plan = _operand(equation, roles, left, lead_l + batch + m + contracted,
                         singles(lead_l + batch) + m_slot + (contracted,))
    right_plan = _operand(equation, roles, 1 - left, lead_r + batch + contracted + n,
                          singles(lead_r + batch) + (contracted,) + n_slot)
    split = lead_l + lead_r + batch + m + n
    out_perm = tuple(split.index(label) for label in equation.output)
    return BinaryPlan(
        left_plan,
        right_plan,
        singles(lead_l + lead_r + batch) + m_slot + n_slot,
        split,
        None if out_perm == tuple(range(len(out_perm))) else out_perm,
        sizes,
        equation.operands,
    )


def _operand(
    equation: Equation, roles: _Roles, index: int, order: tuple[str, ...], layout: tuple[Slot, ...]
) -> OperandPlan:
    labels = equation.operands[index]
    summed = roles.summed[index]
    kept = [label for label in labels if label not in summed]
    perm = tuple(kept.index(label) for label in order)
    return OperandPlan(
        index,
        tuple(axis for axis, label in enumerate(labels) if label in summed),
        None if perm == tuple(range(len(perm))) else perm,
        order,
        layout,
    )
