"""ONNX shape inference written into a graph: whole (`refresh_shapes(graph)`) or around what changed.

Inference runs on a skeleton (`passes.core._skeleton`): nodes and small constants, large constants as
typed inputs. After fold-constants replaced some tensors by constants, only what reads them can learn
anything: `refresh_shapes(graph, changed)` re-infers the readers of `changed` (with the integer shape
computations they read, which data propagation evaluates) as a small graph of their own, then the
readers of whatever got a new type, and so on until nothing changes. A region past a third of the graph,
or one with subgraphs, falls back to the whole graph. With PASSES_CHECK_CONTRACTS=1 (the test suite) a
whole-graph inference follows every regional one and must find nothing new. Re-exported by `passes.core.ir`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.core._skeleton import contracts_checked, graph_skeleton, region_skeleton
from passes.core._walk import has_subgraph, tensor_map

logger = logging.getLogger(__name__)

#: the nodes that end a region's walk back through integer values: they read types, not values
_SHAPE_SOURCES = ("Shape", "Size")
#: waves of regional inference before the whole graph is inferred instead
_MAX_WAVES = 64


def refresh_shapes(graph: gs.Graph, changed: Iterable[gs.Tensor] | None = None,
                   news: list[gs.Tensor] | None = None) -> int:
    """Re-run ONNX shape inference (with data propagation) and write the results into the graph.

    Inference sees the graph without the bytes of its large constants (they become typed inputs),
    so this costs the same at any model size. `changed`: the tensors that changed since the graph's
    types were last right (constants that replaced computed tensors); only what depends on them is
    inferred again. Returns how many tensors got a new shape or dtype; they go to `news`.
    """
    if changed is None:
        return infer_into(graph, graph_skeleton(graph), news=news)
    regional: list[gs.Tensor] = []
    count = _refresh_around(graph, changed, regional)
    if news is not None:
        news.extend(regional)  # (typed by waves before a fallback to the whole graph, too)
    if count is None:
        return infer_into(graph, graph_skeleton(graph), news=news)
    if contracts_checked():
        missed: list[gs.Tensor] = []
        if infer_into(graph, graph_skeleton(graph), news=missed):
            raise AssertionError("re-inferring around the changed tensors missed what a whole-graph inference "
                                 f"finds: {', '.join(f'{t.name} {t.dtype} {t.shape}' for t in missed[:5])}")
    return count


def _refresh_around(graph: gs.Graph, changed: Iterable[gs.Tensor], retyped: list[gs.Tensor]) -> int | None:
    """Waves of regional inference from the readers of `changed`; None when the whole graph must go."""
    nodes = graph.nodes
    order = {id(node): index for index, node in enumerate(nodes)}
    limit = max(len(nodes) // 3, 1)
    seeds = _with_value_readers({id(n): n for tensor in changed for n in tensor.outputs})
    total = 0
    for _ in range(_MAX_WAVES):
        if not seeds:
            return total
        if any(id(n) not in order for n in seeds.values()):
            return None  # a reader inside a subgraph
        region = _with_shape_sources(seeds)
        if len(region) > limit or any(has_subgraph(n) for n in region.values()):
            return None
        ordered = sorted(region.values(), key=lambda n: order[id(n)])
        outputs = {t.name: t for n in ordered for t in n.outputs if t.name}
        news: list[gs.Tensor] = []
        total += infer_into(graph, region_skeleton(graph, ordered, outputs), outputs, news)
        retyped.extend(news)
        seeds = _with_value_readers({id(n): n for tensor in news for n in tensor.outputs})
    return None  # types still changing after _MAX_WAVES waves (each only adds knowledge): the whole graph


def _with_value_readers(seeds: dict[int, gs.Node]) -> dict[int, gs.Node]:
    """The seeds and whatever reads the small integer values they compute, transitively: a Shape whose
    input learnt a dim keeps its output type, but its value (which data propagation hands on to a Reshape
    or Expand) changed."""
    stack = list(seeds.values())
    while stack:
        for tensor in stack.pop().outputs:
            if not _shape_like(tensor):
                continue
            for reader in tensor.outputs:
                if id(reader) not in seeds:
                    seeds[id(reader)] = reader
                    stack.append(reader)
    return seeds


def _with_shape_sources(seeds: dict[int, gs.Node]) -> dict[int, gs.Node]:
    """The seeds and the nodes computing the small integer tensors they read (up to the Shape queries),
    whose values data propagation needs to infer what a Reshape, Expand or Range makes."""
    region = dict(seeds)
    stack = list(seeds.values())
    while stack:
        for tensor in stack.pop().inputs:
            if type(tensor) is gs.Constant or not tensor.inputs or not _shape_like(tensor):
                continue
            source = tensor.inputs[0]
            if id(source) not in region:
                region[id(source)] = source
                if source.op not in _SHAPE_SOURCES:
                    stack.append(source)
    return region


def _shape_like(tensor: gs.Tensor) -> bool:
    """Whether the tensor may be a shape computation's value: integer of rank <= 1, or not known not to be."""
    dtype, shape = tensor.dtype, tensor.shape
    if shape is not None and len(shape) > 1:
        return False
    return dtype is None or isinstance(dtype, int) or np.dtype(dtype).kind in "iu"


def infer_into(graph: gs.Graph, skeleton: bytes, tensors: dict[str, gs.Tensor] | None = None,
               news: list[gs.Tensor] | None = None) -> int:
    """Infer the skeleton's types and write them into the graph's tensors (`tensors`: those that may take
    them, by name; default every tensor of the graph); each tensor that changed goes to `news`."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as err:
        logger.warning("shape inference failed, continuing without it: %s", str(err).splitlines()[0])
        return 0
    if tensors is None:
        tensors = tensor_map(graph)
    fresh = _fresh_dims(graph)
    # what each tensor was last given, as bytes: a re-inference mostly repeats itself, and comparing
    # bytes costs a tenth of applying the type again
    applied: dict[str, tuple[gs.Tensor, bytes, object, object]] = graph.__dict__.setdefault("_passes_applied_types", {})
    converted: dict[bytes, tuple[np.dtype | None, list[object] | None]] = {}  # many tensors share a type
    changed = 0
    for info in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = tensors.get(info.name)
        if tensor is None or type(tensor) is not gs.Variable:
            continue
        kind = info.type
        raw = kind.SerializeToString()
        last = applied.get(info.name)
        if last is not None and last[0] is tensor and last[1] == raw and last[2] is tensor.dtype and last[3] == tensor.shape:
            continue
        typed = converted.get(raw)
        if typed is None:
            if not kind.HasField("tensor_type"):
                continue
            typed = converted[raw] = _convert_type(kind.tensor_type, fresh)
        if _apply_type(tensor, *typed):
            changed += 1
            if news is not None:
                news.append(tensor)
        applied[info.name] = (tensor, raw, tensor.dtype, list(tensor.shape) if tensor.shape is not None else None)
    return changed


def as_np_dtype(dtype: object) -> np.dtype:
    """A numpy dtype from what graphsurgeon stores: a numpy type, or an ONNX enum for types numpy
    lacks (bfloat16, float8) which maps to ml_dtypes' numpy types."""
    if isinstance(dtype, (int, np.integer)):
        return onnx.helper.tensor_dtype_to_np_dtype(int(dtype))
    return np.dtype(dtype)  # type: ignore[arg-type]


INFERRED_DIM = re.compile(r"unk__\d+")
OUR_DIM = re.compile(r"passes_dim(\d+)_")
OUR_DIM_BYTES = re.compile(rb"passes_dim(\d+)_")
#: the graph's last inference run number (see `_fresh_dims`), kept on the graph
DIM_RUN = "_passes_dim_run"


def _fresh_dims(graph: gs.Graph) -> Callable[[str], str]:
    """Renames for the dims one inference run invents (`unk__N`): every run numbers them from 0, so a
    name kept from an earlier run would claim equal dims that are not (onnxruntime's memory planner
    trusts dim_params and reuses buffers on that claim). A run's names become `passes_dim<run>_<N>`:
    equal within the run, where inference made them equal, and distinct from every other run's (the run
number is past any the graph already holds, so re-imported and reloaded models are safe too)."""
    declared = {dim for tensor in (*graph.inputs, *graph.outputs) for dim in (tensor.shape or ()) if isinstance(dim, str)}
    run: list[int] = []  # found on the first invented name: most runs invent none

    def rename(name: str) -> str:
        if name in declared or not INFERRED_DIM.fullmatch(name):
            return name
        if not run:  # past every run whose names the graph (or the model it came from) holds
            last = graph.__dict__.get(DIM_RUN)
            if last is None:  # a graph import_graph did not make: look at its names once
                last = max((int(match.group(1)) for tensor in tensor_map(graph).values()
                            for dim in (tensor.shape or ())
                            if isinstance(dim, str) and (match := OUR_DIM.match(dim))), default=0)
            run.append(last + 1)
            graph.__dict__[DIM_RUN] = run[0]
        return f"passes_dim{run[0]}_{name.removeprefix('unk__')}"

    return rename


_NP_DTYPES: dict[int, np.dtype] = {}


def _convert_type(info: onnx.TypeProto.Tensor, rename: Callable[[str], str]) -> tuple[np.dtype | None, list[object] | None]:
    """An inferred tensor type as graphsurgeon keeps it: numpy dtype (None if unset), shape (None if unknown)."""
    dtype = None
    if info.elem_type:
        dtype = _NP_DTYPES.get(info.elem_type)
        if dtype is None:
            dtype = _NP_DTYPES[info.elem_type] = onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)
    shape = None
    if info.HasField("shape"):
        shape = [d.dim_value if kind == "dim_value" else rename(d.dim_param) if kind == "dim_param" and d.dim_param else None
                 for d in info.shape.dim for kind in (d.WhichOneof("value"),)]
    return dtype, shape


def _apply_type(tensor: gs.Tensor, dtype: np.dtype | None, shape: list[object] | None) -> int:
    """Give the tensor an inferred dtype, and the inferred shape when it knows more; 1 if anything changed."""
    changed = 0
    fields = tensor.__dict__  # a Variable's plain fields: no hook needs to see a type change
    if dtype is not None:
        current = fields.get("dtype")
        if current is None or current == 0 or (current is not dtype and as_np_dtype(current) != dtype):
            fields["dtype"] = dtype
            changed = 1
    if shape is not None:
        current = fields.get("shape")
        old = list(current) if current is not None else None
        if old != shape and (old is None or _more_static(shape, old)):
            fields["shape"] = list(shape)  # a copy: tensors of one type must not share a list
            changed = 1
    return changed


def _more_static(new: list[object], old: list[object]) -> bool:
    """Accept an inferred shape only when it knows more than the graph does (a rank, or more fixed
    dims): inference names unknown dims afresh (`unk__3`) on every run, and renaming them is no news."""
    if len(new) != len(old):
        return True
    return sum(isinstance(d, int) for d in new) > sum(isinstance(d, (int, np.integer)) for d in old)
