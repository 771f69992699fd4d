"""The schema of a target description, its validation into one-line errors, and `TargetDescription`.

Every section is a strict, frozen pydantic model that forbids unknown keys: TOML types must match
(no "1" for 1), and a misspelt key is an error rather than a silently ignored default. The checks
across keys (`_checks`) and the pipeline's parse run after the per-key validation. Every failure
becomes one `TargetError` line: `FILE: KEY.PATH: problem`.

Figures are optional where nobody knows them; each figure group carries a `source` string saying
where its numbers come from (a vendor sheet, a third-party table, an assumption, a measurement).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from passes.core.errors import PipelineError, TargetError
from passes.targets._checks import consistency_problems, show_value

if TYPE_CHECKING:
    import tvm.target

#: `tvm.target` / `tvm.host` value of an LLVM `mcpu` that is detected when the TVM target is built.
DETECT = "detect"

#: capabilities `has()` answers; the others are read as attributes (`target.capabilities.quantization`).
YES_NO_CAPABILITIES = ("einsum", "gelu_op", "int8_dot", "layer_norm_op", "rms_norm_op")
#: aarch64 CPU features checked against what LLVM derives from `mcpu`/`mattr` (TVM's attribute names).
LLVM_FEATURES = {"dotprod": "feature.has_dotprod", "i8mm": "feature.has_matmul_i8", "sve": "feature.has_sve"}

Source = Annotated[str, Field(min_length=1)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(gt=0)]
KeyPath = tuple[str | int, ...]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Identity(_Section):
    """What the target is: SoC, vendor, marketing name, GPU and CPU cores."""

    vendor: str
    soc: str
    marketing_name: str
    gpu: str | None = None
    cpu_cores: str


class TvmTargets(_Section):
    """TVM 0.27 JSON target dicts: `target` (the device) and `host` (the CPU that launches it)."""

    target: dict[str, Any]
    host: dict[str, Any] | None = None


class MemoryFigures(_Section):
    bandwidth_gbps: Positive | None = None
    dram: str | None = None
    source: Source


class _Peaks(_Section):
    fp32_tflops: Positive | None = None
    fp16_tflops: Positive | None = None
    int8_tops: Positive | None = None
    source: Source


class GpuFigures(_Peaks):
    cores: Count | None = None
    clock_mhz: Count | None = None
    subgroup_width: Count
    max_work_group: Count
    local_memory_kib: Count
    dedicated_local_memory: bool
    opencl_extensions: list[str] = []
    metal_family: str | None = None


class CpuFigures(_Peaks):
    arch: Literal["aarch64", "x86_64"]
    cores: Count | None = None
    dotprod: bool | None = None
    i8mm: bool | None = None
    sve: bool | None = None
    sve2: bool | None = None
    fp16: bool | None = None


class Capabilities(_Section):
    """What the passes ask the target about (by capability, never by target name)."""

    layer_norm_op: bool
    rms_norm_op: bool
    gelu_op: bool
    einsum: bool
    int8_dot: bool
    quantization: Literal["w8a8", "w8a16"]
    max_opset: Annotated[int, Field(ge=7)]
    matmul_add: Literal["reshape-gemm", "keep-matmul"]


class KernelTiles(_Section):
    """One INT8 matmul kernel's tiling: output tile, reduction step, int8 lanes per load/dot, threads."""

    tile_m: Count
    tile_n: Count
    tile_k: Count
    vector_width: Count
    work_group_x: Count | None = None
    work_group_y: Count | None = None


class Schedule(_Section):
    """Starting schedules of the INT8 kernels: `gemm` for prefill (M >= 16), `gemv` for decode (M = 1)."""

    max_work_group: Count | None = None
    gemm: KernelTiles
    gemv: KernelTiles
    #: CPU (llvm) targets: the float matmul register tile and the vector width of the default schedules
    float_gemm: KernelTiles | None = None
    #: CPU targets: the float matmul tile for a single row tile (decode, M <= float_gemm.tile_m), where B is
    #: streamed once: wide column panels keep each K row's read long and contiguous (float_gemm if unset)
    float_gemv: KernelTiles | None = None
    source: Source


class Defaults(_Section):
    """Sizes that bind dynamic dims when no --shape is given."""

    batch: Count = 1
    sequence: Count = 128
    #: a generator's KV-cache slots (the longest prompt + reply) and its prefill chunk
    context: Count = 1024
    prefill_chunk: Count = 64


class TargetDescription(_Section):
    """One target: identity, TVM target, figures, capabilities, default pipeline and schedules."""

    name: str
    device: Literal["gpu", "cpu"]
    backend: Literal["opencl", "metal", "llvm"]
    identity: Identity
    tvm: TvmTargets
    memory: MemoryFigures
    gpu: GpuFigures | None = None
    cpu: CpuFigures
    capabilities: Capabilities
    pipeline: str
    schedule: Schedule
    defaults: Defaults = Defaults()
    source_path: Path

    # top-level key -> "variants.NAME." when a variant supplied it, for error messages
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    def has(self, capability: str) -> bool:
        """Whether the target has a yes/no capability, e.g. `has("layer_norm_op")`."""
        if capability in YES_NO_CAPABILITIES:
            return bool(getattr(self.capabilities, capability))
        if capability in Capabilities.model_fields:
            value = getattr(self.capabilities, capability)
            raise TargetError(f"capability {capability!r} is not yes/no: read target.capabilities.{capability} "
                              f"(= {value!r} for {self.name})")
        raise TargetError(f"unknown capability {capability!r}; yes/no capabilities: {', '.join(YES_NO_CAPABILITIES)}")

    @property
    def compute(self) -> GpuFigures | CpuFigures:
        """The figures of the device that runs the kernels (the GPU, or the CPU for a cpu target)."""
        return self.gpu if self.gpu is not None and self.device == "gpu" else self.cpu

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def tvm_target(self) -> tvm.target.Target:
        """`tvm.target.Target(target, host=host)`, with `mcpu = "detect"` replaced by this machine's CPU.

        Also checks that LLVM derives the CPU features the description states (a Cortex-X3 `mcpu`
        turns SVE on, which Snapdragon SoCs leave off) and that LLVM knows the `mcpu`."""
        from tvm.target import Target

        target = self._llvm_dict(self.tvm.target, "target")
        host = self._llvm_dict(self.tvm.host, "host") if self.tvm.host is not None else None
        try:
            built = Target(target, host=host)
        except (ValueError, TypeError, RuntimeError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise self._error(("tvm",), f"TVM refuses the target: {message}") from err
        cpu_side = ("target", built) if self.device == "cpu" else ("host", built.host)
        if cpu_side[1] is not None:
            self._check_llvm_features(*cpu_side)
        return built

    # -- helpers ---------------------------------------------------------------------------------
    def _error(self, keys: KeyPath, message: str) -> TargetError:
        return located_error(self.source_path, self._origins.get(str(keys[0]), "") + _dotted(keys), message)

    def _llvm_dict(self, config: Mapping[str, Any], which: str) -> dict[str, Any]:
        resolved = dict(config)
        if resolved.get("kind") != "llvm" or "mcpu" not in resolved:
            return resolved
        from tvm.target import codegen

        if resolved["mcpu"] == DETECT:
            resolved["mcpu"] = codegen.llvm_get_system_cpu()
        triple = resolved.get("mtriple") or codegen.llvm_get_system_triple()
        if not codegen.llvm_is_valid_cpu(str(resolved["mcpu"]), str(triple)):
            raise self._error(("tvm", which, "mcpu"),
                              f"LLVM {codegen.llvm_version_major()} does not know CPU {resolved['mcpu']!r} "
                              f"for {triple}")
        return resolved

    def _check_llvm_features(self, which: str, built: Any) -> None:
        attrs = dict(built.attrs)
        for feature, attr in LLVM_FEATURES.items():
            stated = getattr(self.cpu, feature)
            if stated is None or attr not in attrs or bool(attrs[attr]) == stated:
                continue
            fix = f"add '{'+' if stated else '-'}{feature}' to mattr"
            state = "on" if attrs[attr] else "off"
            raise self._error(("tvm", which),
                              f"LLVM turns {feature} {state} for this mcpu/mattr but cpu.{feature} is "
                              f"{str(stated).lower()}; {fix}")


def located_error(path: Path | str, where: str, message: str) -> TargetError:
    """The one-line error every target problem becomes: `FILE: KEY.PATH: problem`."""
    return TargetError(f"{path}: {where}: {message}" if where else f"{path}: {message}")


def _dotted(keys: KeyPath) -> str:
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


# -- building a description ------------------------------------------------------------------------
def build_description(
    document: Mapping[str, Any], *, name: str, source_path: Path, origins: Mapping[str, str]
) -> TargetDescription:
    """Validate a parsed TOML document (variant already applied) into a `TargetDescription`."""

    def fail(keys: KeyPath, message: str, more: int = 0) -> TargetError:
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        return located_error(source_path, origins.get(str(keys[0]), "") + _dotted(keys), message + suffix)

    for reserved in ("name", "source_path"):
        if reserved in document:
            raise fail((reserved,), f"unknown key (a target's {reserved} comes from its file)")
    try:
        description = TargetDescription.model_validate({**document, "name": name, "source_path": source_path})
    except ValidationError as err:
        # a misspelt key is also a missing one: name the misspelling first
        errors = sorted(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        keys, message = describe_validation_error(errors[0])
        raise fail(keys, message, len(errors) - 1) from None
    description._origins = dict(origins)
    for keys, message in consistency_problems(description):
        raise fail(keys, message)
    _check_pipeline(description.pipeline, fail)
    return description


def _check_pipeline(pipeline: str, fail: Callable[..., TargetError]) -> None:
    from passes.infra.pipeline import parse_pipeline

    try:
        parse_pipeline(pipeline)
    except PipelineError as err:
        raise fail(("pipeline",), str(err)) from None


def describe_validation_error(error: Mapping[str, Any]) -> tuple[KeyPath, str]:
    """A pydantic error as (key path, message in TOML words)."""
    keys: KeyPath = tuple(error["loc"])
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    got = f", got {show_value(value)}"
    expected = {
        "string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
        "list_type": "an array", "dict_type": "a table", "model_type": "a table", "literal_error": ctx.get("expected"),
    }
    if kind == "extra_forbidden":
        known = _known_keys(keys[:-1])
        close = difflib.get_close_matches(str(keys[-1]), known, n=1)
        if close:
            return keys, f"unknown key; did you mean {close[0]!r}?"
        return keys, "unknown key" + (f" (known: {', '.join(known)})" if known else "")
    if kind == "missing":
        return keys, "required key is missing"
    if kind in expected:
        return keys, f"expected {expected[kind]}{got}"
    if kind in ("greater_than", "greater_than_equal"):
        bound = ctx.get("gt", ctx.get("ge"))
        return keys, f"must be {'>' if kind == 'greater_than' else '>='} {show_value(bound)}{got}"
    if kind == "string_too_short":
        return keys, "must not be empty"
    if kind == "finite_number":
        return keys, f"must be a finite number{got}"
    return keys, f"{error['msg']}{got}"


def _known_keys(section: KeyPath) -> list[str]:
    model: type[BaseModel] = TargetDescription
    for key in section:
        field = model.model_fields.get(str(key))
        candidates = list(getattr(field.annotation, "__args__", (field.annotation,))) if field else []
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    hidden = {"name", "source_path"} if model is TargetDescription else set()
    return sorted(set(model.model_fields) - hidden)
