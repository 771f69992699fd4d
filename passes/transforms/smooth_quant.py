"""`smooth-quant`: move activation outliers into the weights (SmoothQuant, Xiao et al. 2023), adding no op.

For an activation X [..., K] whose every consumer is a MatMul/Gemm with a constant weight W [K, N]:

    s_k = max|X[:, k]|^alpha / max_consumers max_n |W[k, n]|^(1 - alpha)        (on the calibration set)
    X' = X / s   folded into X's producer,   W' = diag(s) W   in every consumer

so X' W' = X W and the per-tensor or per-token int8 grid of X' no longer spends its range on a few
channels. X's producer absorbs 1/s, so the graph gains no node:

    Mul(y, gamma)                      gamma' = gamma / s                  (a norm's scale, decomposed)
    Add(Mul(y, gamma), beta)           gamma' = gamma / s, beta' = beta / s  (LayerNorm, decomposed)
    LayerNormalization / RMSNormalization (axis -1)   scale' = scale / s (bias' = bias / s)
    Mul(a, b), b = MatMul(z, W2) or one last-axis Split output of it      W2[:, cols(b)] /= s
                                       (a gated MLP: down_proj's input is silu(gate) * up)

Channels where max|X| or max|W| is 0 keep s = 1; s is clipped to [1e-5, 1e5]. Run before `quantize-int8`,
after the fusions (fuse-qkv makes the Q/K/V and gate/up weights one consumer each). Calibration as in
`quantize-int8`: an .npz of inputs, text cut into token windows with `tokenizer`, else generated inputs.
After one run the channels are balanced (max|X'| = max|W'|^... and s recomputes to 1), so a second
run finds nothing to move and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, StatValue
from passes.infra.rewrite import RewriteContext

#: a group whose scales all lie within this factor of 1 is left alone (what makes a second run a no-op).
BALANCED = 1e-3
SCALE_LIMITS = (1e-5, 1e5)
_NORMS = {"LayerNormalization": 3, "RMSNormalization": 2}  # op -> inputs that scale with the output


@dataclass
class _Group:
    """One smoothable activation: its consumers (matmul node, weight [K, N] as stored, transposed?) and
    how its producer absorbs 1/s."""

    x: gs.Tensor
    consumers: list[tuple[gs.Node, np.ndarray, bool]]
    fold: list[tuple[gs.Node, int, slice | None]]  # (node, input index, column range) to divide by s

    @property
    def weight_peak(self) -> np.ndarray:
        """max |W[k, :]| over every consumer, per input channel k."""
        return np.max([np.abs(w.T if t else w).max(axis=1) for _, w, t in self.consumers], axis=0)


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Migrate activation outliers into the weights of the matmuls that read them (SmoothQuant)."""

    name = "smooth-quant"
    exact = False  # equal in exact arithmetic; float32 rounding of the moved scales differs (its tests bound it)
    alpha: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "help": "migration strength: 0 moves nothing, 1 moves all of max|X|"})
    calibration: str = field(default="", metadata={
        "help": ".npz of inputs by name, or text with tokenizer (default: generated random inputs)"})
    tokenizer: str = field(default="", metadata={"help": "with calibration=TEXT: tokenizer.json or its folder"})
    samples: int = field(default=8, metadata={"min": 1, "help": "calibration windows cut from text"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.tokenizer and not self.calibration:
            raise ValueError("tokenizer needs calibration=TEXT (the text to cut into windows)")
        if self.calibration:
            from passes.numerics.calibration import check_calibration_file

            check_calibration_file(self.calibration, tokenizer=self.tokenizer)

    def call(self, graph: gs.Graph) -> PassResult:
        from passes.numerics import calibration

        groups = find_groups(graph)
        stats: dict[str, StatValue] = {"alpha": self.alpha, "groups": len(groups), "activations_smoothed": 0}
        if not groups or self.alpha == 0.0:
            return PassResult(graph, False, stats)
        model, values = ir.hollow_export(graph)  # the weights stay the graph's arrays
        if self.calibration:
            feeds = calibration.load_calibration(self.calibration, model, tokenizer=self.tokenizer or None,
                                                 samples=self.samples)
            stats["calibration"] = "text" if self.tokenizer else "file"
        else:
            feeds, stats["calibration"] = calibration.generated_feeds(model), "generated"
        collected = calibration.collect_tensors(model, [g.x.name for g in groups], feeds, weights=values)
        del values
        ctx = RewriteContext(graph)
        largest = 1.0
        for group in groups:
            peak = np.max([np.abs(v.reshape(-1, v.shape[-1])).max(axis=0) for v in collected[group.x.name]], axis=0)
            scale = smoothing_scale(peak.astype(np.float64), group.weight_peak.astype(np.float64), self.alpha)
            if np.all(np.abs(np.log(scale)) < BALANCED):
                continue
            _apply(ctx, group, scale.astype(np.float32))
            stats["activations_smoothed"] = int(stats["activations_smoothed"]) + 1
            largest = max(largest, float(np.max(np.maximum(scale, 1.0 / scale))))
        stats["largest_scale"] = largest
        modified = bool(stats["activations_smoothed"])
        if modified:
            graph.cleanup()
        return PassResult(graph, modified, stats)


def smoothing_scale(activation_peak: np.ndarray, weight_peak: np.ndarray, alpha: float) -> np.ndarray:
    """s = max|X|^alpha / max|W|^(1 - alpha) per channel; 1 where either is 0 or not finite."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = np.power(activation_peak, alpha) / np.power(weight_peak, 1.0 - alpha)
    usable = (activation_peak > 0) & (weight_peak > 0) & np.isfinite(scale)
    return np.clip(np.where(usable, scale, 1.0), *SCALE_LIMITS)


def find_groups(graph: gs.Graph) -> list[_Group]:
    """Every activation the pass can smooth, in graph order."""
    ctx = RewriteContext(graph)
    consumers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            consumers.setdefault(tensor.name, []).append(node)
    outputs = {t.name for t in graph.outputs}
    groups = []
    seen: set[str] = set()
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or not node.inputs or node.inputs[0].name in seen:
            continue
        x = node.inputs[0]
        seen.add(x.name)
        if isinstance(x, gs.Constant) or x.name in outputs or not x.inputs:
            continue
        readers = [_weight(ctx, reader, x) for reader in consumers.get(x.name, [])]
        if not readers or any(r is None for r in readers):
            continue
        channels = {(w.T if t else w).shape[0] for _, w, t in readers}  # type: ignore[misc]
        if len(channels) != 1:
            continue
        fold = _fold_targets(ctx, x.inputs[0], channels.pop(), consumers, outputs)
        if fold:
            groups.append(_Group(x, readers, fold))  # type: ignore[arg-type]
    return groups


def _weight(ctx: RewriteContext, node: gs.Node, x: gs.Tensor) -> tuple[gs.Node, np.ndarray, bool] | None:
    """(node, stored weight, transposed) when `node` is x @ W with a constant 2-D float32 W, else None."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[0] is not x:
        return None
    if node.inputs[1] is x or ctx.producer(node.inputs[1], "DequantizeLinear") is not None:
        return None
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return None
    weight = ctx.constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    return node, weight, node.op == "Gemm" and bool(node.attrs.get("transB", 0))


def _per_channel(value: np.ndarray | None, channels: int) -> bool:
    """A constant that broadcasts along the last axis only: [C] or [1, ..., 1, C]."""
    return (value is not None and value.dtype == np.float32 and value.size == channels
            and value.ndim >= 1 and value.shape[-1] == channels)


def _fold_targets(ctx: RewriteContext, producer: gs.Node, channels: int, consumers: dict[str, list[gs.Node]],
                  outputs: set[str]) -> list[tuple[gs.Node, int, slice | None]]:
    """Where X's producer can absorb 1/s (see the module docstring), or [] when it cannot."""
    def only_reader(tensor: gs.Tensor, node: gs.Node) -> bool:
        return tensor.name not in outputs and [n.name for n in consumers.get(tensor.name, [])] == [node.name]

    if producer.op in _NORMS and int(producer.attrs.get("axis", -1)) == -1:
        positions = [i for i in range(1, min(_NORMS[producer.op], len(producer.inputs))) if producer.inputs[i].name]
        if positions and all(_per_channel(ctx.constant(producer.inputs[i]), channels) for i in positions):
            return [(producer, i, None) for i in positions]
        return []
    if producer.op == "Add" and len(producer.inputs) == 2:
        for side in (0, 1):
            beta, inner = producer.inputs[side], producer.inputs[1 - side]
            mul = inner.inputs[0] if inner.inputs else None
            if (_per_channel(ctx.constant(beta), channels) and mul is not None and mul.op == "Mul"
                    and only_reader(inner, producer)):
                gamma = _fold_targets(ctx, mul, channels, consumers, outputs)
                if gamma and gamma[0][2] is None and gamma[0][0] is mul:
                    return [*gamma, (producer, side, None)]
        return []
    if producer.op != "Mul" or len(producer.inputs) != 2:
        return []
    for side in (0, 1):
        if _per_channel(ctx.constant(producer.inputs[side]), channels) and ctx.constant(producer.inputs[1 - side]) is None:
            return [(producer, side, None)]
    for side in (0, 1):
        target = _linear_source(ctx, producer.inputs[side], producer, channels, only_reader)
        if target:
            return [target]
    return []


def _linear_source(ctx: RewriteContext, tensor: gs.Tensor, reader: gs.Node, channels: int,
                   only_reader) -> tuple[gs.Node, int, slice | None] | None:  # type: ignore[no-untyped-def]
    """The MatMul (and its weight's column range) that alone produces `tensor`, read only by `reader`."""
    if not tensor.inputs or not only_reader(tensor, reader):
        return None
    node = tensor.inputs[0]
    columns = slice(0, channels)
    if node.op == "Split":
        if int(node.attrs.get("axis", 0)) != -1 and not _last_axis(node):
            return None
        sizes = _split_sizes(ctx, node)
        index = [o.name for o in node.outputs].index(tensor.name)
        if sizes is None or sizes[index] != channels:
            return None
        start = sum(sizes[:index])
        columns = slice(start, start + channels)
        source = node.inputs[0]
        if not source.inputs or not only_reader(source, node):
            return None
        node = source.inputs[0]
    if node.op != "MatMul" or len(node.inputs) != 2 or ctx.producer(node.inputs[1], "DequantizeLinear") is not None:
        return None
    weight = ctx.constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or columns.stop > weight.shape[1]:
        return None
    return node, 1, columns


def _last_axis(split: gs.Node) -> bool:
    shape = split.inputs[0].shape
    axis = int(split.attrs.get("axis", 0))
    return shape is not None and axis == len(shape) - 1


def _split_sizes(ctx: RewriteContext, split: gs.Node) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1].name:
        sizes = ctx.constant(split.inputs[1])
        return None if sizes is None else [int(v) for v in sizes.reshape(-1)]
    if "split" in split.attrs:
        return [int(v) for v in split.attrs["split"]]
    return None


def _apply(ctx: RewriteContext, group: _Group, scale: np.ndarray) -> None:
    """X' = X / s in the producer, W' = diag(s) W in every consumer; new constants, never shared ones edited."""
    for node, index, columns in group.fold:
        value = ctx.constant(node.inputs[index])
        assert value is not None
        if columns is None:
            updated = (value / scale.reshape((1,) * (value.ndim - 1) + (-1,))).astype(np.float32)
        else:
            updated = value.copy()
            updated[:, columns] = (value[:, columns] / scale[None, :]).astype(np.float32)
        node.inputs[index] = ctx.const(f"{node.inputs[index].name}/smoothed", updated)
    for node, weight, transposed in group.consumers:
        updated = (weight * (scale[None, :] if transposed else scale[:, None])).astype(np.float32)
        node.inputs[1] = ctx.const(f"{node.inputs[1].name}/smoothed", updated)
