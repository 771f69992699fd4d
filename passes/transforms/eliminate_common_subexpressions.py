"""`eliminate-common-subexpressions`: merge nodes that compute the same thing, and equal constants.

    op(a, b){attrs} twice -> computed once, the second's consumers use the first
    two initializers with equal dtype, shape and bytes -> one

Nodes are visited in topological order, so whole duplicated chains collapse in one run. A node is a
candidate when it is deterministic (no Random*, no Dropout), has no subgraph and its domain is known.
When the duplicate produces a graph output, the first node takes over that output name; when both
produce graph outputs they stay (one value cannot have two names without an Identity).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from passes.core import ir
from passes.core._gs_compat import raw_layout, raw_view
from passes.infra._pass import Pass, PassResult

#: constants up to this size are keyed by their bytes (larger ones by a hash of a sample, then compared)
EXACT_KEY_BYTES = 64
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)


@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    """Merge duplicate nodes (same op, inputs, attributes) and duplicate constants."""

    name = "eliminate-common-subexpressions"
    blind_to_dead_code = True
    max_constant_bytes: int = field(
        default=64 * 2**20, metadata={"min": 0, "help": "constants larger than this are not compared byte by byte"}
    )

    def call(self, graph: gs.Graph) -> PassResult:
        outputs = ir.graph_output_ids(graph)
        constants_merged = self._merge_constants(graph, outputs)
        seen: dict[tuple[object, ...], gs.Node] = {}
        removed: list[gs.Node] = []
        for node in graph.nodes:
            key = _node_key(node)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            if not _merge_into(graph, first, node, outputs):
                continue
            removed.append(node)
        ir.remove_nodes(graph, removed)
        stats = {"nodes_removed": len(removed), "constants_merged": constants_merged}
        return PassResult(graph, bool(removed or constants_merged), stats)

    def _merge_constants(self, graph: gs.Graph, outputs: set[int]) -> int:
        """Point every use of a constant at the first constant with the same dtype, shape and bytes."""
        buckets: dict[tuple[object, ...], list[gs.Constant]] = {}
        keepers: dict[int, gs.Constant] = {}  # constant -> the one its uses move to (itself when first)
        samples = _SampleKeys(graph)
        merged = 0
        for node in graph.nodes:
            for index, tensor in enumerate(node.inputs):
                if type(tensor) is not gs.Constant:
                    continue
                keeper = keepers.get(id(tensor))
                if keeper is None:
                    keeper = keepers[id(tensor)] = self._keeper(tensor, buckets, outputs, samples)
                if keeper is not tensor:
                    ir.set_input(node, index, keeper)
                    merged += 1
        samples.save()
        return merged

    def _keeper(self, tensor: gs.Constant, buckets: dict[tuple[object, ...], list[gs.Constant]],
                outputs: set[int], samples: _SampleKeys) -> gs.Constant:
        """The first constant seen with `tensor`'s dtype, shape and bytes (`tensor` itself when it is the
        first, a graph output, or too large to compare). Weights not loaded yet stay unloaded: their
        values are read for the comparison and dropped (a model's weights loaded all at once would sit
        in memory beside the model they came from, doubling a 4 GB model)."""
        if id(tensor) in outputs:
            return tensor
        key = _raw_key(tensor)  # most constants: a few bytes read off an unloaded TensorProto
        if (len(key[2]) if key is not None else ir.constant_nbytes(tensor)) > self.max_constant_bytes:  # read unloaded
            return tensor
        values = None
        if key is None:
            key = samples.known(tensor)
        if key is None:
            values = _peek(tensor)
            if values.nbytes <= EXACT_KEY_BYTES and values.dtype.kind != "O":
                key = (values.dtype.str, values.shape, np.ascontiguousarray(values).tobytes())
            else:
                key = samples.remember(tensor, _sample_key(values))
        bucket = buckets.setdefault(key, [])
        if not bucket:
            bucket.append(tensor)
            return tensor
        if key[0] != _SAMPLED:
            # a small constant (shape vectors, scalars: most of an export's) is keyed by its bytes themselves:
            # equal keys are equal constants, so the first of a bucket is the keeper, no comparison
            return bucket[0]
        values = _peek(tensor) if values is None else values
        keeper = next((c for c in bucket if _same_bytes(_peek(c), values)), None)
        if keeper is None:
            bucket.append(tensor)
            return tensor
        return keeper


_SAMPLED = "sampled"
#: per graph: id -> (constant, its unloaded values, sample key), from the last run
_SAMPLE_KEYS = "_passes_ecs_sample_keys"


class _SampleKeys:
    """The sample keys of unloaded weights, kept on the graph from one run to the next: keying a weight
    reads it, a copy of its bytes (all 600 MB of a 135M model's, every run). A key holds while the constant
    keeps the same unloaded values (a TensorProto of the input model, which nothing writes)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.last: dict[int, tuple[gs.Constant, LazyValues, tuple[object, ...]]] = graph.__dict__.get(_SAMPLE_KEYS, {})
        self.now: dict[int, tuple[gs.Constant, LazyValues, tuple[object, ...]]] = {}

    def known(self, tensor: gs.Constant) -> tuple[object, ...] | None:
        entry = self.last.get(id(tensor))
        if entry is None or entry[0] is not tensor or entry[1] is not tensor._values:
            return None
        self.now[id(tensor)] = entry
        return entry[2]

    def remember(self, tensor: gs.Constant, key: tuple[object, ...]) -> tuple[object, ...]:
        key = (_SAMPLED, *key)
        if type(tensor._values) is LazyValues:  # (an array a pass made may be written in place)
            self.now[id(tensor)] = (tensor, tensor._values, key)
        return key

    def save(self) -> None:
        """Keep the keys of the constants this run saw (those that left the graph go)."""
        self.graph.__dict__[_SAMPLE_KEYS] = self.now


def _merge_into(graph: gs.Graph, first: gs.Node, duplicate: gs.Node, outputs: set[int]) -> bool:
    """Make `first` compute what `duplicate` did; graph output names survive. False when both
    produce graph outputs at one position (two names for one value: nothing to merge)."""
    pairs = list(zip(first.outputs, duplicate.outputs))
    if any(id(a) in outputs and id(b) in outputs for a, b in pairs):
        return False
    ir.detach_node(duplicate)
    for kept, dropped in pairs:
        ir.replace_all_uses(dropped, kept)
        if id(dropped) in outputs:  # the first node's tensor takes over the graph output and its name
            graph.outputs[next(i for i, t in enumerate(graph.outputs) if t is dropped)] = kept
            kept.name, dropped.name = dropped.name, f"{dropped.name}/merged"
            kept.dtype = kept.dtype if kept.dtype is not None else dropped.dtype
            kept.shape = kept.shape if kept.shape is not None else dropped.shape
            outputs.add(id(kept))
    return True


def _raw_key(tensor: gs.Constant) -> tuple[str, tuple[int, ...], bytes] | None:
    """The exact key of a small unloaded constant stored as raw little-endian bytes (a lifted Constant
    node's, mostly), read off its TensorProto: the key its loaded array would give, without loading it."""
    stored = tensor._values
    if type(stored) is not LazyValues:
        return None
    layout = raw_layout(stored, EXACT_KEY_BYTES)
    return None if layout is None else (layout[0].str, layout[1], layout[2])


def _peek(tensor: gs.Constant) -> np.ndarray:
    """A constant's values, without making graphsurgeon keep them loaded (read-only)."""
    stored = tensor._values
    if type(stored) is LazyValues and (view := raw_view(stored)) is not None:
        return view
    return stored.load() if isinstance(stored, LazyValues) else np.asarray(stored)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (so -0.0 and 0.0 differ, and equal NaNs match)."""
    if a.dtype.kind == "O" or b.dtype.kind == "O":
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    return np.ascontiguousarray(a).view(np.uint8).tobytes() == np.ascontiguousarray(b).view(np.uint8).tobytes()


def _sample_key(values: np.ndarray) -> tuple[object, ...]:
    """dtype, shape and a hash of at most ~4 KiB spread over the data: cheap, and equal for equal arrays."""
    flat = values.reshape(-1)
    step = max(1, flat.size // 512)
    sample = np.ascontiguousarray(flat[::step][:512]).tobytes()
    return (values.dtype.str, values.shape, hashlib.blake2b(sample, digest_size=16).digest())


def _node_key(node: gs.Node) -> tuple[object, ...] | None:
    """A hashable identity of what the node computes, or None when it must not be merged."""
    op, outputs, attrs = node.op, node.outputs, node.attrs
    if op in NONDETERMINISTIC or not outputs:
        return None
    key: tuple[object, ...] = ()
    if attrs:  # (most nodes have none: no subgraph to look for, nothing to sort)
        if ir.has_subgraph(node):
            return None
        try:
            key = tuple(sorted((k, _attr_key(v)) for k, v in attrs.items()))
        except TypeError:
            return None
    inputs = tuple([id(t) if t.name or type(t) is not gs.Variable else None for t in node.inputs])
    return (node.domain or "", op, inputs, len(outputs), key)


def _attr_key(value: object) -> object:
    if isinstance(value, gs.Constant):
        values = np.asarray(value.values)
        return ("tensor", values.dtype.str, values.shape, values.tobytes())
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, np.dtype):
        return ("dtype", value.str)
    hash(value)
    return value
