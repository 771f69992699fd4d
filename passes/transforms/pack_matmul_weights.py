"""`pack-matmul-weights`: lay the constant weight of a one-row matmul out as contiguous column panels.

    MatMul(x[1, .., 1, K], W[K, N])  ->  Reshape(MatMul(x, P[N/t, K, t]), [1, .., 1, N])
                                         P[p, k, j] = W[k, p*t + j]

A matmul with a single row (decoding one token) reads every weight once, so it runs at memory bandwidth
if the reads stream. With W row-major, the `t` columns a thread owns lie in K short pieces one row (N
floats, often several pages) apart: the prefetchers do not follow such strides, and a 1024 x 32000 LM
head read that way ran at 1.6x onnxruntime's time on 2 Zen 4 threads. Packed, each panel is one
contiguous K x t block, the batched matmul gives each thread whole panels, and the same head runs at
0.73x. The rewrite moves bytes only: each output is the same dot product over K.

Applied when every dim of x but the last is statically 1, W is a 2-D floating-point constant, and N is
a multiple of `panel` larger than it. CPU builds run it at lowering, after quantization (so int8
matmuls keep their own layouts), with `panel` from the target's `schedule.float_gemv.tile_n`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.infra._pass import Pass, PassResult, Refusal
from passes.infra.rewrite import RewriteContext


@dataclass(frozen=True)
class PackMatmulWeights(Pass):
    """Pack the constant weight of one-row (decode) matmuls into contiguous column panels."""

    name = "pack-matmul-weights"
    panel: int = field(default=128, metadata={"min": 1, "help": "columns per panel (t)"})
    any_rows: bool = field(default=False, metadata={"help": "pack matmuls of several rows too (a generator's "
                                                            "prefill shares its weights with decode)"})

    def call(self, graph: gs.Graph) -> PassResult:
        ctx = RewriteContext(graph)
        refusals: list[Refusal] = []
        packed = 0
        for node in list(graph.nodes):
            if node.op != "MatMul" or not ir.is_default_domain(node) or len(node.inputs) != 2:
                continue
            reason = self._unpackable(node)
            if reason is None:
                self._pack(graph, node, ctx)
                packed += 1
            elif reason:
                refusals.append(Refusal(node.name or node.op, reason))
        return PassResult(graph, bool(packed), {"matmuls_packed": packed}, refusals)

    def _unpackable(self, node: gs.Node) -> str | None:
        """None when the node can be packed; "" when it is not a one-row matmul with a constant weight
        (nothing to say), else why not."""
        x, weight = node.inputs
        rows = x.shape
        if type(weight) is not gs.Constant or rows is None or len(rows) < 2:
            return ""
        if not self.any_rows and any(not isinstance(d, (int, np.integer)) or d != 1 for d in rows[:-1]):
            return ""  # more than one row, or rows not known to be one
        dims = weight.shape
        if dims is None or len(dims) != 2 or not np.issubdtype(ir.as_np_dtype(weight.dtype), np.floating):
            return ""
        columns = int(dims[1])
        if columns <= self.panel or columns % self.panel:
            return f"{columns} columns are not a multiple of the {self.panel}-column panel larger than one"
        return None

    def _pack(self, graph: gs.Graph, node: gs.Node, ctx: RewriteContext) -> None:
        x, weight = node.inputs
        if any(not isinstance(d, (int, np.integer)) or d != 1 for d in x.shape[:-1]):
            self._pack_rows(graph, node, ctx)
            return
        out = node.outputs[0]
        columns, panels, layout = self._panels(weight)
        rank = len(x.shape)
        batch = [panels] if rank <= 3 else [1] * (rank - 3) + [panels]  # x's leading 1s broadcast against P
        product = gs.Variable(ctx.fresh(f"{out.name}/panels"), dtype=out.dtype, shape=[*batch, 1, self.panel])
        target_shape = np.array([1] * (rank - 1) + [columns], dtype=np.int64)
        ir.set_input(node, 1, ir.new_constant(ctx.fresh(f"{weight.name}/panels{self.panel}"), layout))
        ir.set_output(node, 0, product)
        reshape = gs.Node("Reshape", name=ctx.fresh(f"{node.name or 'MatMul'}/unpanel"),
                          inputs=[product, ir.new_constant(ctx.fresh(f"{out.name}/shape"), target_shape)],
                          outputs=[out])
        position = next(i for i, n in enumerate(graph.nodes) if n is node)  # by identity: Node.__eq__ compares
        graph.nodes.insert(position + 1, reshape)

    def _panels(self, weight: gs.Constant) -> tuple[int, int, np.ndarray]:
        """(N, N / t, P[N / t, K, t]) with P[p, k, j] = W[k, p*t + j]."""
        depth, columns = (int(d) for d in weight.shape)
        panels = columns // self.panel
        values = np.asarray(weight.values)
        return columns, panels, np.ascontiguousarray(values.reshape(depth, panels, self.panel).transpose(1, 0, 2))

    def _pack_rows(self, graph: gs.Graph, node: gs.Node, ctx: RewriteContext) -> None:
        """x[.., S, K] @ W -> Reshape(Transpose(Unsqueeze(x, -3) @ P, swap -3 -2), [.., S, N])."""
        x, weight = node.inputs
        out = node.outputs[0]
        columns, panels, layout = self._panels(weight)
        depth = int(weight.shape[0])
        rank = len(x.shape)
        lead, rows = list(x.shape[:-2]), x.shape[-2]
        wide = gs.Variable(ctx.fresh(f"{x.name}/rows"), dtype=x.dtype, shape=[*lead, 1, rows, depth])
        product = gs.Variable(ctx.fresh(f"{out.name}/panels"), dtype=out.dtype, shape=[*lead, panels, rows, self.panel])
        swapped = gs.Variable(ctx.fresh(f"{out.name}/rows"), dtype=out.dtype, shape=[*lead, rows, panels, self.panel])
        base = node.name or "MatMul"
        unsqueeze = gs.Node("Unsqueeze", name=ctx.fresh(f"{base}/rows"),
                            inputs=[x, ir.new_constant(ctx.fresh(f"{x.name}/axis"), np.array([rank - 2], np.int64))],
                            outputs=[wide])
        ir.set_input(node, 0, wide)
        ir.set_input(node, 1, ir.new_constant(ctx.fresh(f"{weight.name}/panels{self.panel}"), layout))
        ir.set_output(node, 0, product)
        perm = [*range(rank - 2), rank - 1, rank - 2, rank]
        transpose = gs.Node("Transpose", name=ctx.fresh(f"{base}/unpanel"), attrs={"perm": perm},
                            inputs=[product], outputs=[swapped])
        target_shape = np.array([0] * (rank - 1) + [columns], dtype=np.int64)  # 0: keep that dim
        reshape = gs.Node("Reshape", name=ctx.fresh(f"{base}/join"),
                          inputs=[swapped, ir.new_constant(ctx.fresh(f"{out.name}/shape"), target_shape)],
                          outputs=[out])
        position = next(i for i, n in enumerate(graph.nodes) if n is node)
        graph.nodes[position:position + 1] = [unsqueeze, node, transpose, reshape]
