"""Lowered TIR of scheduled PrimFuncs: device kernels, which buffers they take, and launch sizes.

The scheduled PrimFuncs go through the TIR pipeline `tvm.compile` uses (s_tir) and are split into
host and device functions. Each host function launches its kernels with `call_ffi_kernel(name,
args..., extents...)`, the extents in the order of the kernel's `tirx.kernel_launch_params`
(blockIdx.* then threadIdx.*): those are the launch sizes an OpenCL host must use. Each kernel
argument is traced back through the host's buffer declarations and bindings to the packed argument
it comes from, which is the PrimFunc parameter at that position: names cannot be used, since a
PrimFunc may have several buffers of one name (a split's outputs are all `T_split`).

TVM 0.27 exposes no TIR visitor to Python; `walk` follows the FFI reflection fields instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx

from passes.lowering._errors import LoweringError

_KERNEL_CALL = "tirx.call_ffi_kernel"
_STRUCT_GET = "tirx.tvm_struct_get"
_BUFFER_DATA = "tirx.buffer_data"


@dataclass(frozen=True)
class KernelLaunch:
    """One device kernel launch of a PrimFunc: the kernel, the PrimFunc parameters it takes (positions,
    in kernel parameter order; None for a buffer that is not a parameter), and the OpenCL NDRange
    (global = blocks * threads, local = threads) for axes x, y, z."""

    function: str
    kernel: str
    arguments: tuple[int | None, ...]
    global_size: tuple[int, int, int]
    local_size: tuple[int, int, int]

    @property
    def threads_per_group(self) -> int:
        x, y, z = self.local_size
        return x * y * z


@dataclass(frozen=True)
class LoweredKernels:
    """Device functions of a set of PrimFuncs and the launches each PrimFunc makes, in order."""

    device_module: tvm.IRModule
    launches: Mapping[str, tuple[KernelLaunch, ...]]


def lower_kernels(funcs: Mapping[str, tirx.PrimFunc], tvm_target: tvm.target.Target) -> LoweredKernels:
    """Lower scheduled `funcs` for `tvm_target` (a GPU target with a host) as `tvm.compile` would."""
    from tvm.tirx.build import split_host_device_mods

    module = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in funcs.items()})
    module = tvm.tirx.transform.BindTarget(tvm_target)(module)
    pipeline, _, finalize_device = tvm.tirx.get_tir_pipeline("s_tir")
    with tvm.transform.PassContext():
        host_module, device_modules = split_host_device_mods(pipeline(module))
        if len(device_modules) != 1:
            raise LoweringError(f"expected one device module for {tvm_target.kind.name}, got {len(device_modules)}")
        device_module = finalize_device()(next(iter(device_modules.values())))
    kernels = {gvar.name_hint: func for gvar, func in device_module.functions_items()}
    launches = {}
    for gvar, host_func in host_module.functions_items():
        name = gvar.name_hint.removeprefix("__tvm_ffi_")
        tracer = _ArgumentTracer(host_func)
        calls = [node for node in walk(host_func.body) if _is_call(node, _KERNEL_CALL)]
        launches[name] = tuple(_launch(name, call, kernels, tracer) for call in calls)
    return LoweredKernels(device_module, launches)


def codegen(device_module: tvm.IRModule, tvm_target: tvm.target.Target) -> str:
    """The device source TVM's code generator emits for `device_module`."""
    build_source = tvm.get_global_func(f"target.build.{tvm_target.kind.name}")
    return build_source(device_module, tvm_target).inspect_source()


def walk(node: Any) -> Iterator[Any]:
    """Every TIR/IR object reachable from `node`, each once, parents before children."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, (tvm_ffi.Array, list, tuple)):
            stack.extend(reversed(list(current)))
            continue
        if isinstance(current, (tvm_ffi.Map, dict)):
            stack.extend(current.values())
            continue
        if not isinstance(current, tvm_ffi.core.Object) or isinstance(current, (tvm.ir.Span, tvm.target.Target)):
            continue
        handle = current.__chandle__()
        if handle in seen:
            continue
        seen.add(handle)
        yield current
        stack.extend(reversed([getattr(current, name) for name in _field_names(type(current)) if name != "span"]))


def call_counts(module: tvm.IRModule) -> Counter[str]:
    """How many `call_tir`s of the module's Relax functions call each TIR function, by name."""
    from tvm import relax

    counts: Counter[str] = Counter()
    for func in module.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for node in walk(func.body):
            if (isinstance(node, relax.Call) and getattr(node.op, "name", "") == "relax.call_tir"
                    and isinstance(node.args[0], tvm.ir.GlobalVar)):
                counts[node.args[0].name_hint] += 1
    return counts


def _field_names(cls: type, cache: dict[type, tuple[str, ...]] = {}) -> tuple[str, ...]:  # noqa: B006 (memo)
    if cls not in cache:
        names: list[str] = []
        info = getattr(cls, "__tvm_ffi_type_info__", None)
        while info is not None:
            names.extend(field.name for field in info.fields)
            info = info.parent_type_info
        cache[cls] = tuple(names)
    return cache[cls]


def _is_call(node: Any, op_name: str) -> bool:
    return isinstance(node, tvm.ir.Call) and getattr(node.op, "name", "") == op_name


class _ArgumentTracer:
    """Which packed argument (= PrimFunc parameter position) a buffer pointer in a host function is.

    MakePackedAPI reads argument i as `tvm_struct_get(args, i, ...)`, binds it to a handle, declares a
    buffer on that handle's data and (FlattenBuffer) a flat alias of that buffer; the tracer follows
    `buffer_data(alias) -> alias's data -> ... -> tvm_struct_get(args, i, ...)`.
    """

    def __init__(self, host_func: tirx.PrimFunc) -> None:
        self._args = host_func.params[1].__chandle__()  # (self_handle, args, num_args, result)
        self._bound: dict[int, Any] = {}
        for node in walk(host_func.body):
            if isinstance(node, tirx.Bind):
                self._bound[node.var.__chandle__()] = node.value
            elif isinstance(node, tirx.DeclBuffer) and node.data is not None:
                self._bound[node.buffer.__chandle__()] = node.data

    def position(self, expr: Any, depth: int = 0) -> int | None:
        if depth > 32:
            return None
        for node in walk(expr):
            if _is_call(node, _STRUCT_GET) and node.args[0].__chandle__() == self._args:
                return int(node.args[1])
        for node in walk(expr):
            bound = self._bound.get(node.__chandle__()) if isinstance(node, tvm.ir.Var) else None
            if bound is not None and (found := self.position(bound, depth + 1)) is not None:
                return found
        return None


def _launch(function: str, call: tvm.ir.Call, kernels: Mapping[str, tirx.PrimFunc],
            tracer: _ArgumentTracer) -> KernelLaunch:
    kernel_name = str(call.args[0].value)
    kernel = kernels.get(kernel_name)
    if kernel is None:
        raise LoweringError(f"{function}: the host launches {kernel_name!r}, which the device module lacks")
    count = len(kernel.params)
    arguments = tuple(tracer.position(arg) if _is_call(arg, _BUFFER_DATA) else None for arg in call.args[1:1 + count])
    tags = [str(tag) for tag in kernel.attrs["tirx.kernel_launch_params"]]
    sizes = dict(zip(tags, (int(extent) for extent in call.args[1 + count:])))
    local = tuple(sizes.get(f"threadIdx.{axis}", 1) for axis in "xyz")
    global_ = tuple(sizes.get(f"blockIdx.{axis}", 1) * threads for axis, threads in zip("xyz", local))
    return KernelLaunch(function, kernel_name, arguments, global_, local)  # type: ignore[arg-type]
