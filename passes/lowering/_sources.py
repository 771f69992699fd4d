"""GPU kernel sources: finding the device module, splitting it per kernel, checking Metal structurally.

TVM's OpenCL and Metal modules hold one source text made of `// Function: <kernel>` sections, each
compilable on its own (the OpenCL ones repeat every kernel's declaration; the Metal ones repeat the
`#include <metal_stdlib>` preamble). A section is what `kernels/<kernel>.cl|.metal` holds.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

#: device module kind -> kernel file suffix
KERNEL_SUFFIX = {"opencl": "cl", "metal": "metal"}
#: longest kernel file stem; longer (deeply fused) names are shortened with a hash
MAX_STEM = 120

_SECTION = re.compile(r"^// Function: (\S+)[ \t]*$", re.MULTILINE)
#: MSL vector types exist with 2, 3 or 4 lanes only (MSL spec 2.2); `char8` / `half8` / `float8` do not
_MSL_VECTOR = re.compile(r"\b(bool|u?char|u?short|u?int|u?long|half|bfloat|float)(\d+)\b")
_MSL_LANES = frozenset({2, 3, 4})
#: scalar types MSL lacks altogether
_MSL_MISSING_SCALARS = re.compile(r"\b(double|size_t)\b")
_MSL_BUFFER_INDEX = re.compile(r"\[\[\s*buffer\((\d+)\)\s*\]\]")
#: Metal's argument table holds 31 buffers per kernel
_MSL_MAX_BUFFERS = 31


def device_modules(module: Any) -> list[Any]:
    """Every imported runtime module whose kind has kernel sources (opencl, metal), depth first."""
    found, stack = [], [module]
    while stack:
        current = stack.pop()
        if current.kind in KERNEL_SUFFIX:
            found.append(current)
        stack.extend(reversed(list(current.imports)))
    return found


def split_kernel_sources(source: str) -> dict[str, str]:
    """`// Function: name` sections of a device module's source, by kernel name."""
    marks = list(_SECTION.finditer(source))
    sections = {}
    for mark, following in zip(marks, [*marks[1:], None]):
        end = following.start() if following is not None else len(source)
        sections[mark.group(1)] = source[mark.start():end].rstrip() + "\n"
    return sections


def kernel_file_stem(kernel: str) -> str:
    """A file-system-safe stem for a kernel name, shortened with a hash when very long."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", kernel)
    if len(safe) <= MAX_STEM:
        return safe
    digest = hashlib.sha1(kernel.encode()).hexdigest()[:10]
    return f"{safe[:MAX_STEM - 11]}-{digest}"


def metal_source_problems(source: str, kernels: list[str]) -> list[str]:
    """What keeps `source` from being valid MSL for `kernels` (empty when nothing is wrong).

    Checks: each kernel is defined as `kernel void name(`; the section includes metal_stdlib; no
    vector type with other than 2-4 lanes; no double/size_t; at most 31 buffer arguments a kernel.
    """
    problems = []
    sections = split_kernel_sources(source)
    for kernel in kernels:
        section = sections.get(kernel)
        if section is None:
            problems.append(f"{kernel}: no `// Function: {kernel}` section")
            continue
        if not re.search(rf"\bkernel\s+void\s+{re.escape(kernel)}\s*\(", section):
            problems.append(f"{kernel}: no `kernel void {kernel}(` entry point")
        if "#include <metal_stdlib>" not in section:
            problems.append(f"{kernel}: does not include <metal_stdlib>")
        problems.extend(f"{kernel}: {problem}" for problem in _msl_type_problems(section))
    return problems


def _msl_type_problems(section: str) -> list[str]:
    problems = []
    bad_vectors = sorted({m.group(0) for m in _MSL_VECTOR.finditer(section) if int(m.group(2)) not in _MSL_LANES})
    if bad_vectors:
        problems.append(f"vector types MSL lacks: {', '.join(bad_vectors)}")
    missing = sorted({m.group(0) for m in _MSL_MISSING_SCALARS.finditer(section)})
    if missing:
        problems.append(f"types MSL lacks: {', '.join(missing)}")
    indices = [int(i) for i in _MSL_BUFFER_INDEX.findall(section)]
    if indices and max(indices) >= _MSL_MAX_BUFFERS:
        problems.append(f"buffer index {max(indices)} beyond Metal's {_MSL_MAX_BUFFERS} buffer arguments")
    return problems
