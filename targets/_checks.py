"""Checks across the keys of a target description: what no single key's type can show.

Each check yields `(key path, problem)` for the key at fault, most basic first; the loader turns the
first into the one-line `TargetError`. Examples: a backend and its TVM kind, `int8_dot` without an int8
dot extension, `mattr` enabling a feature `[cpu]` says is off, work-groups above their limits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from passes.targets._schema import KernelTiles, KeyPath, TargetDescription

#: the opset each fused op first exists in.
OP_OPSETS = {"layer_norm_op": ("LayerNormalization", 17), "gelu_op": ("Gelu", 20),
             "rms_norm_op": ("RMSNormalization", 23)}
INT8_DOT_EXTENSIONS = ("cl_qcom_dot_product8", "cl_arm_integer_dot_product_int8", "cl_khr_integer_dot_product")
BACKEND_DEVICE = {"opencl": "gpu", "metal": "gpu", "llvm": "cpu"}


def show_value(value: Any) -> str:
    """A value as a TOML reader would recognise it in a message."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def consistency_problems(target: TargetDescription) -> Iterator[tuple[KeyPath, str]]:
    """Problems no single key shows: each as (key path, message), most basic first."""
    yield from _device_problems(target)
    yield from _cpu_problems(target)
    yield from _capability_problems(target)
    yield from _schedule_problems(target)
    yield from _figure_problems(target)


def _device_problems(t: TargetDescription) -> Iterator[tuple[KeyPath, str]]:
    if BACKEND_DEVICE[t.backend] != t.device:
        yield ("backend",), f"backend {t.backend!r} runs on a {BACKEND_DEVICE[t.backend]}, but device is {t.device!r}"
    kind = t.tvm.target.get("kind")
    if kind != t.backend:
        yield ("tvm", "target", "kind"), f"expected {t.backend!r} (the backend), got {show_value(kind)}"
    if t.tvm.host is not None and t.tvm.host.get("kind") != "llvm":
        yield ("tvm", "host", "kind"), f"expected 'llvm', got {show_value(t.tvm.host.get('kind'))}"
    if t.device == "gpu" and t.tvm.host is None:
        yield ("tvm", "host"), "required key is missing (a GPU target needs the CPU that launches its kernels)"
    if t.device == "gpu" and t.gpu is None:
        yield ("gpu",), "required key is missing (device is 'gpu')"
    if t.device == "cpu" and t.gpu is not None:
        yield ("gpu",), "not allowed when device is 'cpu' (the kernels run on the CPU)"
    if t.gpu is not None and t.gpu.opencl_extensions and t.backend != "opencl":
        yield ("gpu", "opencl_extensions"), f"only for the opencl backend, not {t.backend!r}"
    if t.gpu is not None and (t.gpu.metal_family is None) == (t.backend == "metal"):
        yield ("gpu", "metal_family"), ("required key is missing (backend is 'metal')" if t.backend == "metal"
                                        else f"only for the metal backend, not {t.backend!r}")


def _cpu_config(t: TargetDescription) -> tuple[str, Mapping[str, Any] | None]:
    """Which TVM dict compiles the code that runs on `cpu`: the host of a GPU target, else the target."""
    return ("host", t.tvm.host) if t.device == "gpu" else ("target", t.tvm.target)


def _cpu_problems(t: TargetDescription) -> Iterator[tuple[KeyPath, str]]:
    cpu = t.cpu
    arm_features = ("dotprod", "i8mm", "sve", "sve2", "fp16")
    if cpu.arch != "aarch64":
        for feature in arm_features:
            if getattr(cpu, feature) is not None:
                yield ("cpu", feature), f"an aarch64 feature, but cpu.arch is {cpu.arch!r}"
    if cpu.sve2 and cpu.sve is False:
        yield ("cpu", "sve2"), "SVE2 needs SVE, but cpu.sve is false"
    which, config = _cpu_config(t)
    mattr = config.get("mattr", []) if config is not None else []
    if not isinstance(mattr, list) or not all(isinstance(a, str) for a in mattr):
        yield ("tvm", which, "mattr"), f"expected an array of strings like ['+neon', '+dotprod'], got {show_value(mattr)}"
        return
    for feature in ("dotprod", "i8mm", "sve", "sve2"):
        if f"+{feature}" in mattr and getattr(cpu, feature) is False:
            yield ("tvm", which, "mattr"), f"enables {feature}, but cpu.{feature} is false"
        if f"-{feature}" in mattr and getattr(cpu, feature) is True:
            yield ("tvm", which, "mattr"), f"disables {feature}, but cpu.{feature} is true"
    counts = [int(n) for n in re.findall(r"(\d+)\s*x\s", t.identity.cpu_cores)]
    if counts and cpu.cores is not None and sum(counts) != cpu.cores:
        yield ("identity", "cpu_cores"), f"lists {sum(counts)} cores, but cpu.cores is {cpu.cores}"


def _capability_problems(t: TargetDescription) -> Iterator[tuple[KeyPath, str]]:
    caps = t.capabilities
    for capability, (op, opset) in OP_OPSETS.items():
        if getattr(caps, capability) and caps.max_opset < opset:
            problem = f"{op} needs opset {opset}, but capabilities.max_opset is {caps.max_opset}"
            yield ("capabilities", capability), problem
    if not caps.int8_dot:
        return
    extensions = set(t.gpu.opencl_extensions) if t.gpu is not None else set()
    if t.device == "gpu" and t.backend == "opencl" and not extensions & set(INT8_DOT_EXTENSIONS):
        listed = ", ".join(INT8_DOT_EXTENSIONS)
        yield ("capabilities", "int8_dot"), f"true, but gpu.opencl_extensions lists none of {listed}"
    if t.device == "cpu" and t.cpu.arch == "aarch64" and not t.cpu.dotprod:
        yield ("capabilities", "int8_dot"), "true, but cpu.dotprod is not true"


def _schedule_problems(t: TargetDescription) -> Iterator[tuple[KeyPath, str]]:
    schedule = t.schedule
    if schedule.gemv.tile_m != 1:
        yield ("schedule", "gemv", "tile_m"), f"a GEMV computes one row: expected 1, got {schedule.gemv.tile_m}"
    for kernel in ("gemm", "gemv"):
        tiles: KernelTiles = getattr(schedule, kernel)
        if tiles.tile_k % tiles.vector_width:
            problem = f"{tiles.tile_k} is not a multiple of vector_width {tiles.vector_width}"
            yield ("schedule", kernel, "tile_k"), problem
        threads = (tiles.work_group_x, tiles.work_group_y)
        if t.device == "cpu" and threads != (None, None):
            yield ("schedule", kernel, "work_group_x"), "a GPU setting, but device is 'cpu'"
        elif t.device == "gpu" and None in threads:
            missing = "work_group_x" if tiles.work_group_x is None else "work_group_y"
            yield ("schedule", kernel, missing), "required key is missing (device is 'gpu')"
        elif t.device == "gpu" and schedule.max_work_group is not None and math.prod(threads) > schedule.max_work_group:
            yield ("schedule", kernel), (f"work group {threads[0]}x{threads[1]} = {math.prod(threads)} exceeds "
                                         f"schedule.max_work_group {schedule.max_work_group}")
    yield from _work_group_limit_problems(t)


def _work_group_limit_problems(t: TargetDescription) -> Iterator[tuple[KeyPath, str]]:
    limit = t.schedule.max_work_group
    if t.device == "cpu":
        if limit is not None:
            yield ("schedule", "max_work_group"), "a GPU setting, but device is 'cpu'"
        return
    if limit is None:
        yield ("schedule", "max_work_group"), "required key is missing (device is 'gpu')"
        return
    if t.gpu is not None and limit > t.gpu.max_work_group:
        problem = f"{limit} exceeds the hardware's gpu.max_work_group {t.gpu.max_work_group}"
        yield ("schedule", "max_work_group"), problem
    tvm_limit = t.tvm.target.get("max_num_threads")
    if isinstance(tvm_limit, int) and limit > tvm_limit:
        yield ("schedule", "max_work_group"), f"{limit} exceeds tvm.target.max_num_threads {tvm_limit}"


def _figure_problems(t: TargetDescription) -> Iterator[tuple[KeyPath, str]]:
    if t.gpu is not None and t.gpu.subgroup_width > t.gpu.max_work_group:
        yield ("gpu", "subgroup_width"), f"{t.gpu.subgroup_width} exceeds gpu.max_work_group {t.gpu.max_work_group}"
