"""Write the KV cache in place: `scatter_elements(cache, slots, new)` on a function's cache parameter
becomes a `call_tir_inplace` of a kernel that stores the S new rows into the caller's tensor.

`static-kv-cache` writes each layer's new keys and values into a fixed-capacity cache with
ScatterElements; imported as is, TVM legalizes that to a copy of the whole cache plus the scatter, per
layer per token. When the cache is a parameter of the Relax function and nothing else reads it, the
kernel here writes the B x H x S x D new entries into the parameter itself and the function returns that
same tensor, so a decode step touches S slots of the cache, not C. The caller (`passes generate`, an app)
keeps one tensor per cache and passes it on every call.
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax, tirx

from passes.lowering._dispatch import marked
from passes.lowering._matmul_rewrite import dtype_of, static_shape

#: threads per work-group for the GPU form of the write kernel
_GPU_THREADS = 64


def write_caches_in_place(module: tvm.IRModule, gpu: bool) -> tuple[tvm.IRModule, int]:
    """Rewrite every in-place-able cache scatter of every Relax function; returns (module, count).
    `module` is left as it was."""
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.scatter_elements")(wildcard(), wildcard(), wildcard())
    builder = relax.BlockBuilder(tvm.IRModule(dict(module.functions_items()), attrs=module.attrs))
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}
    count = 0
    for gvar, func in module.functions_items():
        if not isinstance(func, relax.Function):
            continue
        uses = _param_uses(func)

        def rewrite(call: relax.Call, _: object, uses: dict = uses) -> relax.Expr:
            nonlocal count
            replacement = _in_place(call, uses, builder, kernels, gpu)
            count += replacement is not None
            return call if replacement is None else replacement

        builder.update_func(gvar, rewrite_call(pattern, rewrite, func))
    return (builder.get(), count) if count else (module, 0)


def _in_place(call: relax.Call, uses: dict[int, int], builder: relax.BlockBuilder, kernels: dict,
              gpu: bool) -> relax.Expr | None:
    data, indices, updates = call.args
    if not isinstance(data, relax.Var) or uses.get(_key(data)) != 1 or str(call.attrs.reduction) != "update":
        return None
    shapes = [static_shape(arg) for arg in (data, indices, updates)]
    if any(shape is None for shape in shapes) or shapes[1] != shapes[2] or len(shapes[0]) != len(shapes[1]):
        return None
    axis = int(call.attrs.axis) % len(shapes[0])
    dtypes = (dtype_of(data), dtype_of(indices))
    key = (shapes[0], shapes[1], axis, dtypes, gpu)
    if key not in kernels:
        kernels[key] = builder.add_func(_write_kernel(shapes[0], shapes[1], axis, *dtypes, gpu), "kv_cache_write")
    return relax.call_tir_inplace(kernels[key], [data, indices, updates], [0], relax.TensorType(shapes[0], dtypes[0]))


def _key(var: relax.Var) -> int:
    return var.__hash__()


def _param_uses(func: relax.Function) -> dict[int, int]:
    """How many times each parameter is read in the function's body."""
    params = {_key(p) for p in func.params}
    counts: dict[int, int] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var) and _key(expr) in params:
            counts[_key(expr)] = counts.get(_key(expr), 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def _write_kernel(data: Sequence[int], rows: Sequence[int], axis: int, dtype: str, index_dtype: str,
                  gpu: bool) -> tirx.PrimFunc:
    """cache[.., slots[i], ..] = new[i] for every index i of `rows` (the slot replaces axis `axis`); a slot
    outside the cache writes nothing. CPU: plain nested loops; GPU: one thread per element,
    `_GPU_THREADS` to a work-group."""
    from tvm.script import from_source

    rank = len(rows)
    names = [f"i{k}" for k in range(rank)]
    where = ", ".join(names)
    at = ", ".join(f"slots[{where}]" if k == axis else name for k, name in enumerate(names))
    signature = (f"cache: T.Buffer({tuple(data)}, \"{dtype}\"), slots: T.Buffer({tuple(rows)}, \"{index_dtype}\"), "
                 f"new: T.Buffer({tuple(rows)}, \"{dtype}\")")
    inside = f"T.likely(slots[{where}] >= 0) and T.likely(slots[{where}] < {data[axis]})"  # no write out of bounds
    if not gpu:
        body = (f"    for {where} in T.grid({', '.join(map(str, rows))}):\n"
                f"        if {inside}:\n"
                f"            cache[{at}] = new[{where}]\n")
    else:
        total = 1
        for extent in rows:
            total *= extent
        groups = -(-total // _GPU_THREADS)
        unflatten, stride = [], total
        for name, extent in zip(names, rows):
            stride //= extent
            unflatten.append(f"            {name} = (flat // {stride}) % {extent}\n")
        body = (f"    for group in T.thread_binding({groups}, thread=\"blockIdx.x\"):\n"
                f"        for lane in T.thread_binding({_GPU_THREADS}, thread=\"threadIdx.x\"):\n"
                f"          flat = group * {_GPU_THREADS} + lane\n"
                f"          if flat < {total}:\n" + "".join(unflatten) +
                f"            if {inside}:\n"
                f"                cache[{at}] = new[{where}]\n")
    source = ("# from tvm.script import tirx as T\n@T.prim_func(private=True)\n"
              f"def kv_cache_write({signature}):\n"
              "    T.func_attr({\"tirx.noalias\": True})\n" + body)
    return marked(from_source(source))
