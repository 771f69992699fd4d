"""Default schedules for CPU (llvm) targets, as dlight rules: what runs when no tuning record exists.

TVM 0.27's CPU pipeline schedules nothing by itself: every kernel it legalizes is a naive loop nest
(one thread, no vectors). These rules give each kernel class a schedule of its own, in this order:

    CpuMatmul    C[.., i, j] += A[.., i, k] * B[.., k, j] (any fused prologue inlined): column panels of
                 `tile_n` (and batch) spread over the threads, each packing its K x tile_n slice of B
                 contiguous once, then register tiles of `tile_m` rows x `tile_n` columns accumulated over K
                 steps of `tile_k`, columns vectorised; epilogues after it
    CpuLoops     everything else (elementwise chains, softmax, norms, means, GEMV-shaped reductions): a
                 fused chain's elementwise blocks computed where their one consumer reads them (no
                 intermediate buffers), then each block's spatial loops fused and spread over the threads; a
                 block without a reduction is also vectorised along its innermost elements (row-wise when its
                 rows are whole vectors, so a reshape's or concatenation's index arithmetic simplifies away);
                 a row reduction over whole vectors accumulates vector-wide lane partials (rfactor)

Tile sizes and the vector width come from the target description (`schedule.float_gemm`, and
`schedule.float_gemv` for a matmul whose rows fit one row tile: decode), never from code. Every schedule
is exact in integer arithmetic and reassociates float sums only by K-tiling (the host check's float
tolerance covers it). Kernels already scheduled (the dispatched INT8 kernels) are left
alone by dlight.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import auto_inline_producers, get_reduction_blocks
from tvm.target import Target

#: TIR iter types (tirx.IterVar): data parallel and reduction
_SPATIAL, _REDUCE = 0, 2


def fitting(extent: int, want: int) -> int:
    """The largest divisor of `extent` that is at most `want` (splits stay exact, no tail predicates)."""
    for size in range(min(extent, want), 0, -1):
        if extent % size == 0:
            return size
    return 1


def vector_tile(extent: int, want: int, vector: int) -> int:
    """The column tile: the largest multiple of `vector` that divides `extent` and is at most `want`
    (full vectors, no tail), else the largest divisor at most `want`."""
    for size in range(min(extent, want) // vector * vector, 0, -vector):
        if extent % size == 0:
            return size
    return fitting(extent, want)


def _static(extent: Any) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm | int) else None


class CpuMatmul(dl.ScheduleRule):
    """Register-tiled matmul for llvm targets (see the module docstring); tiles from `tiles`
    (a `KernelTiles`: tile_m, tile_n, tile_k, vector_width), and from `gemv_tiles` (when given) for a
    matmul whose rows fit one row tile (decode)."""

    def __init__(self, tiles: Any, gemv_tiles: Any = None) -> None:
        self.tiles = tiles
        self.gemv_tiles = gemv_tiles or tiles

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None or len(reductions) != 1:
            return None
        main = reductions[0]
        auto_inline_producers(sch, main)
        iters = sch.get(main).iter_vars
        loops = sch.get_loops(main)
        kinds = [int(iv.iter_type) for iv in iters]
        if len(loops) != len(iters) or len(iters) < 3 or kinds[-1] != _REDUCE or set(kinds[:-1]) != {_SPATIAL}:
            return None
        extents = [_static(iv.dom.extent) for iv in iters]
        if any(e is None for e in extents):
            return None
        weight, activation = _operands(sch.get(main), iters[-3].var, iters[-2].var, iters[-1].var)
        if weight is None or activation is None:
            return None  # a reduction, but not A[.., i, k] * B[.., k, j] (a mean, a sum, a GEMV over rows)
        *batch, i, j, k = loops
        rows, cols, depth = extents[-3], extents[-2], extents[-1]
        one_row_tile = rows <= self.tiles.tile_m  # decode
        tiles = self.gemv_tiles if one_row_tile else self.tiles
        tile_m = fitting(rows, self.tiles.tile_m)
        tile_n = vector_tile(cols, tiles.tile_n, tiles.vector_width)
        tile_k = fitting(depth, tiles.tile_k)
        if not one_row_tile and _in_panels(sch.get(main).reads[weight].source, depth, cols, tile_n):
            weight = None  # B laid out in these panels at lowering (`_packed_matmul`): read in place
        if one_row_tile:
            weight = None  # each B element is read once: a packed copy would double the reads
        i_o, i_i = sch.split(i, [None, tile_m])
        j_o, j_i = sch.split(j, [None, tile_n])
        k_o, k_i = sch.split(k, [None, tile_k])
        sch.reorder(*batch, j_o, i_o, k_o, k_i, i_i, j_i)
        accumulator = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(accumulator, i_o, preserve_unit_loops=True)
        panel = sch.fuse(*batch, j_o) if batch else j_o
        sch.parallel(panel)
        if weight is not None:  # B's K x tile_n panel copied contiguous once per column tile
            packed = sch.cache_read(main, weight, "global")
            sch.compute_at(packed, panel, preserve_unit_loops=True)
            innermost = sch.get_loops(packed)[-1]
            if (_static(sch.get(innermost).extent) or 1) > 1:
                sch.vectorize(innermost)
        vector = fitting(tile_n, tiles.vector_width)
        j_v, j_l = sch.split(j_i, [None, vector])
        sch.vectorize(j_l)
        sch.unroll(i_i)
        sch.unroll(j_v)
        sch.decompose_reduction(main, k_o)
        written = sch.get_loops(accumulator)
        inner = _static(sch.get(written[-1]).extent)
        if inner is not None and inner > 1:
            sch.vectorize(sch.split(written[-1], [None, fitting(inner, tiles.vector_width)])[1])
        for block in sch.get_child_blocks(get_root_block(sch)):
            if sch.get(block).name_hint not in (sch.get(main).name_hint, sch.get(accumulator).name_hint) \
                    and not sch.get(block).name_hint.endswith("_init"):
                _spread(sch, block, self.tiles.vector_width)
        return sch


def _in_panels(buffer: Any, depth: int, cols: int, tile_n: int) -> bool:
    """Whether B is already P[cols / tile_n, depth, tile_n] (`_packed_matmul`): each panel contiguous."""
    shape = [_static(d) for d in buffer.shape]
    return len(shape) == 3 and shape[1:] == [depth, tile_n] and shape[0] is not None and shape[0] * tile_n == cols


def _operands(block: Any, row: tirx.Var, column: tirx.Var, depth: tirx.Var) -> tuple[int | None, int | None]:
    """The indices of B (indexed by column and depth, not row) and A (by depth, not column) among
    `block`'s reads; None where there is not exactly one."""
    def only(keep: Any) -> int | None:
        found = [index for index, region in enumerate(block.reads) if keep(region)]
        return found[0] if len(found) == 1 else None

    weight = only(lambda r: _indexes(r, column) and _indexes(r, depth) and not _indexes(r, row))
    activation = only(lambda r: _indexes(r, depth) and not _indexes(r, column))
    return weight, activation


def _indexes(region: Any, var: tirx.Var) -> bool:
    return any(used.same_as(var) for dim in region.region for used in tirx.analysis.undefined_vars(dim.min))


class CpuLoops(dl.ScheduleRule):
    """Every block of a kernel no other rule took: spatial loops fused and parallel, elementwise blocks
    vectorised along their innermost `vector_width` elements."""

    def __init__(self, vector_width: int) -> None:
        self.vector_width = vector_width

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        _inline_chains(sch)
        for block in sch.get_child_blocks(get_root_block(sch)):
            trial = sch.copy()  # the same random variables; kept only if the whole transformation applies
            if _vectorized_row_reduction(trial, block, self.vector_width):
                sch = trial
            else:
                _spread(sch, block, self.vector_width)
        return sch


def _inline_chains(sch: s_tir.Schedule) -> None:
    """Compute each elementwise block of a fused chain where its one consumer reads it, instead of storing
    a whole intermediate buffer per op (a dequantize-SiLU-quantize chain was 13 passes over memory). A block
    read by several consumers stays: inlined, it would be computed once per consumer (softmax's exp by both
    the sum and the division). So does a block its consumer reads transposed (a layout change): inlined,
    every element of the chain would be computed from strided gathers; stored, the chain runs on contiguous
    vectors and only the transpose gathers."""
    inlined = True
    while inlined:
        inlined = False
        for block in sch.get_child_blocks(get_root_block(sch)):
            iters = sch.get(block).iter_vars
            consumers = sch.get_consumers(block)
            if any(int(iv.iter_type) != _SPATIAL for iv in iters) or len(consumers) != 1 \
                    or _reads_transposed(sch.get(consumers[0]), sch.get(block)):
                continue
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                continue
            inlined = True
            break


def _reads_transposed(consumer: Any, producer: Any) -> bool:
    """Whether `consumer` reads what `producer` writes with an innermost index that does not follow its own
    innermost axis (a transpose, or a broadcast along it)."""
    written = [region.source.same_as for region in producer.writes]
    innermost = consumer.iter_vars[-1].var if consumer.iter_vars else None
    for region in consumer.reads:
        if any(same(region.source) for same in written) and region.region:
            last = region.region[-1].min
            if innermost is None or not any(used.same_as(innermost) for used in tirx.analysis.undefined_vars(last)):
                return True
    return False


def _vectorized_row_reduction(sch: s_tir.Schedule, block: Any, vector_width: int) -> bool:
    """A row reduction (spatial loops, then one reduction loop of whole vectors: softmax's max and sum, a
    norm's mean) reduced `vector_width` lanes at a time: the reduction loop split into vectors and
    rfactor'ed, so each row's lane partials accumulate in a vector register (a per-row local buffer) and
    are combined at the row's end; rows parallel. Reassociates float sums by lanes (as K-tiling does); max
    and min exactly. False when the block is not such a reduction or a step does not apply (`sch`, then
    half-transformed, is to be discarded: the caller passes a copy)."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    kinds = [int(iv.iter_type) for iv in iters]
    leading = len(kinds) - 1
    if len(loops) != len(iters) or leading < 1 or kinds[-1] != _REDUCE or set(kinds[:-1]) != {_SPATIAL}:
        return False
    extent = _static(iters[-1].dom.extent)
    if extent is None or extent % vector_width or extent < 2 * vector_width:
        return False
    try:
        lanes = sch.split(loops[-1], [None, vector_width])[1]
        partial = sch.rfactor(lanes, leading)
        rows = sch.get_loops(partial)[:leading]
        outer = sch.fuse(*rows) if leading > 1 else rows[0]
        sch.parallel(outer)
        sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
        sch.set_scope(partial, 0, "local")
        sch.vectorize(sch.get_loops(partial)[-1])  # before the init is split off: a reduction block may vectorise
        sch.decompose_reduction(partial, sch.get_loops(partial)[-2])
    except (RuntimeError, ValueError):  # ScheduleError is a RuntimeError, as are TVM's other FFI errors
        return False
    return True


#: an elementwise block with at least this many rows (the product of all but its innermost extent) is
#: spread row-wise: enough rows to share among the threads
_ROWS = 16


def _rows_and_vectors(sch: s_tir.Schedule, block: Any, loops: list[Any], extents: list[Any],
                      vector_width: int) -> bool:
    """An elementwise block whose innermost extent is a whole number of vectors: its outer loops fused and
    parallel, its innermost loop split into vectors. Indices stay those of the block's own axes, so the
    simplifier can prove what a fused flat index hides (a reshape's `(i * 256 + j) // 1024` is 0, a
    concatenation's `j >= 128` holds for a whole vector) and loads stay contiguous vectors instead of
    gathers. False (nothing done) for a block that does not qualify."""
    if len(loops) < 2 or extents[-1] % vector_width or math.prod(extents[:-1]) < _ROWS or _writes_bool(sch, block):
        return False
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.parallel(outer)
    sch.vectorize(sch.split(loops[-1], [None, vector_width])[1])
    return True


def _writes_bool(sch: s_tir.Schedule, block: Any) -> bool:
    """LLVM codegen cannot store a vector of bools (TVM widens them to int8 lanes): keep such blocks scalar."""
    return any(str(getattr(region.source, "dtype", "")) == "bool" for region in sch.get(block).writes)


def _spread(sch: s_tir.Schedule, block: Any, vector_width: int) -> None:
    """Fuse `block`'s leading spatial loops into one parallel loop; vectorise a block with no reduction."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if not loops or len(loops) != len(iters):
        return  # already placed under another block's loops
    kinds = [int(iv.iter_type) for iv in iters]
    extents = [_static(iv.dom.extent) for iv in iters]
    if any(e is None for e in extents) or any(kind not in (_SPATIAL, _REDUCE) for kind in kinds):
        return
    leading = 0
    while leading < len(kinds) and kinds[leading] == _SPATIAL:
        leading += 1
    if leading == 0:
        return
    if leading == len(kinds) and _rows_and_vectors(sch, block, loops, extents, vector_width):
        return
    if leading == len(kinds):  # elementwise: one flat loop, vectors inside, threads outside
        flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = fitting(math.prod(extents), vector_width)
        if lanes > 1 and not _writes_bool(sch, block):
            outer, inner = sch.split(flat, [None, lanes])
            sch.parallel(outer)
            sch.vectorize(inner)
        else:
            sch.parallel(flat)
        return
    sch.parallel(sch.fuse(*loops[:leading]) if leading > 1 else loops[0])
