"""Tests for `passes.targets`: the bundled descriptions, the schema's one-line errors, `has()`, the TVM
targets (marked slow: importing TVM takes ~3 s) and the `passes targets` commands.

Bad files are small edits of `MINIMAL`, a complete description written here, so each test names the
one thing it breaks and the exact line the loader must answer with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from passes.targets import BUNDLED_DIR, TargetDescription, list_targets, load_target
from pydantic import ValidationError

from passes.cli import main
from passes.core.errors import TargetError
from passes.infra.pipeline import parse_pipeline

SOCS = ("a16", "dimensity9200", "sd888", "sd8gen2", "sd8gen3", "tensor-g3")
BUNDLED = sorted([*SOCS, *(f"{soc}:cpu" for soc in SOCS), "host"])
ADRENO, MALI = ("sd888", "sd8gen2", "sd8gen3"), ("dimensity9200", "tensor-g3")

MINIMAL = """\
device = "gpu"
backend = "opencl"
pipeline = "canonicalize"

[identity]
vendor = "Example"
soc = "EX1"
marketing_name = "Example One"
gpu = "Example GPU"
cpu_cores = "4x Cortex-A78 + 4x Cortex-A55"

[tvm]
target = { kind = "opencl", device = "adreno" }
host = { kind = "llvm", mtriple = "aarch64-linux-android", mattr = ["+neon", "+dotprod"] }

[memory]
bandwidth_gbps = 40
source = "made up for a test"

[gpu]
fp16_tflops = 2.0
subgroup_width = 64
max_work_group = 1024
local_memory_kib = 32
dedicated_local_memory = true
opencl_extensions = ["cl_khr_fp16", "cl_qcom_dot_product8"]
source = "made up for a test"

[cpu]
arch = "aarch64"
cores = 8
dotprod = true
i8mm = false
sve = false
source = "made up for a test"

[capabilities]
layer_norm_op = true
rms_norm_op = false
gelu_op = true
einsum = false
int8_dot = true
quantization = "w8a8"
max_opset = 21
matmul_add = "reshape-gemm"

[schedule]
max_work_group = 256
source = "made up for a test"
gemm = { tile_m = 32, tile_n = 32, tile_k = 16, vector_width = 4, work_group_x = 8, work_group_y = 8 }
gemv = { tile_m = 1, tile_n = 8, tile_k = 128, vector_width = 4, work_group_x = 2, work_group_y = 32 }

[variants.cpu]
device = "cpu"
backend = "llvm"
tvm = { target = { kind = "llvm", mtriple = "aarch64-linux-android", mattr = ["+neon", "+dotprod"] } }

[variants.cpu.schedule]
source = "made up for a test"
gemm = { tile_m = 8, tile_n = 8, tile_k = 16, vector_width = 16 }
gemv = { tile_m = 1, tile_n = 16, tile_k = 64, vector_width = 16 }
"""


def _write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _edited(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """MINIMAL with each `old` (which must occur exactly once) replaced by `new`, written to mine.toml."""
    text = MINIMAL
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return _write(tmp_path, text)


def _error(spec: str | Path) -> str:
    with pytest.raises(TargetError) as caught:
        load_target(spec)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the bundled descriptions ----------------------------------------------------------------------

def test_list_targets_names_every_bundled_target_and_variant() -> None:
    assert list_targets() == BUNDLED
    assert sorted(p.stem for p in BUNDLED_DIR.glob("*.toml")) == sorted([*SOCS, "host"])


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_target_loads_with_consistent_figures(name: str) -> None:
    target = load_target(name)
    assert target.name == name
    assert target.source_path == BUNDLED_DIR / f"{name.partition(':')[0]}.toml"
    assert parse_pipeline(target.pipeline).spec()
    assert target.defaults.batch == 1 and target.defaults.sequence == 128
    for figures in (target.memory, target.gpu, target.cpu):
        assert figures is None or len(figures.source) > 40, "every figure group says where its numbers come from"
    peaks = [target.compute.int8_tops, target.compute.fp16_tflops, target.compute.fp32_tflops]
    stated = [p for p in peaks if p is not None]
    assert stated == sorted(stated, reverse=True), f"int8 >= fp16 >= fp32 where stated: {peaks}"
    if name == "host":
        assert target.memory.bandwidth_gbps is None and "not stated" in target.memory.source
        return
    assert target.memory.bandwidth_gbps is not None and 30 < target.memory.bandwidth_gbps < 120
    assert target.cpu.arch == "aarch64" and target.cpu.dotprod is True
    if name.endswith(":cpu"):
        assert (target.device, target.backend, target.gpu) == ("cpu", "llvm", None)
        assert target.tvm.target["mtriple"].startswith("aarch64-") and target.tvm.host is None
        assert target.capabilities.quantization == "w8a8" and target.has("int8_dot")
        assert target.schedule.max_work_group is None and target.schedule.gemm.work_group_x is None
    else:
        assert target.device == "gpu" and target.gpu is not None and target.compute is target.gpu
        assert target.gpu.fp16_tflops is not None
        assert target.tvm.host is not None and target.tvm.host["mtriple"].startswith("aarch64-")
        work_groups = [target.schedule.gemm, target.schedule.gemv]
        assert all(t.work_group_x * t.work_group_y <= target.schedule.max_work_group for t in work_groups)


def test_known_facts_are_kept_straight() -> None:
    """DESIGN.md's known facts, as data."""
    sd8gen2, sd888, a16 = load_target("sd8gen2"), load_target("sd888"), load_target("a16")
    assert round(sd8gen2.memory.bandwidth_gbps) == 67
    assert round(sd888.memory.bandwidth_gbps) == round(a16.memory.bandwidth_gbps) == 51
    assert (sd8gen2.cpu.dotprod, sd8gen2.cpu.i8mm, sd8gen2.cpu.sve) == (True, True, False)
    assert (sd888.cpu.dotprod, sd888.cpu.i8mm) == (True, False)
    assert "-sve" in sd8gen2.tvm.host["mattr"] and "+i8mm" not in sd888.tvm.host["mattr"]
    assert load_target("dimensity9200").cpu.sve2 is True
    for name in ADRENO:
        target = load_target(name)
        assert "cl_qcom_dot_product8" in target.gpu.opencl_extensions and target.tvm.target["device"] == "adreno"
        assert target.capabilities.quantization == "w8a8" and target.has("int8_dot")
    for name in MALI:
        target = load_target(name)
        assert "cl_arm_integer_dot_product_int8" in target.gpu.opencl_extensions
        assert target.gpu.dedicated_local_memory is False and target.tvm.target["device"] == "mali"
        assert target.schedule.max_work_group <= 64 and target.tvm.target["max_num_threads"] <= 64
        assert target.capabilities.quantization == "w8a8" and target.has("int8_dot")
    assert (a16.backend, a16.gpu.metal_family, a16.gpu.subgroup_width) == ("metal", "apple8", 32)
    assert a16.capabilities.quantization == "w8a16" and not a16.has("int8_dot") and a16.gpu.int8_tops is None
    assert a16.tvm.host["mtriple"] == "aarch64-apple-ios" and a16.tvm.target["thread_warp_size"] == 32
    assert load_target("a16:cpu").capabilities.quantization == "w8a8"
    host = load_target("host")
    assert (host.device, host.backend, host.tvm.target["mcpu"]) == ("cpu", "llvm", "detect")


def test_has_answers_yes_no_capabilities_and_refuses_the_rest() -> None:
    target = load_target("sd8gen2")
    assert target.has("layer_norm_op") and target.has("int8_dot") and not target.has("einsum")
    with pytest.raises(TargetError, match=r"^capability 'quantization' is not yes/no: read "
                                          r"target\.capabilities\.quantization \(= 'w8a8' for sd8gen2\)$"):
        target.has("quantization")
    with pytest.raises(TargetError, match=r"^unknown capability 'layernorm'; yes/no capabilities: einsum, gelu_op, "
                                          r"int8_dot, layer_norm_op, rms_norm_op$"):
        target.has("layernorm")


def test_description_is_frozen_and_serialises_to_json() -> None:
    target = load_target("sd8gen2")
    with pytest.raises(ValidationError):
        target.device = "cpu"  # type: ignore[misc]
    data = json.loads(json.dumps(target.to_dict()))
    assert data["name"] == "sd8gen2" and data["source_path"] == str(target.source_path)
    assert data["tvm"]["target"] == {"kind": "opencl", "device": "adreno"}


# --- user files ------------------------------------------------------------------------------------

def test_user_toml_by_path_with_and_without_variant(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    for spec in (path, str(path)):
        target = load_target(spec)
        assert isinstance(target, TargetDescription)
        assert (target.name, target.device, target.source_path) == ("mine", "gpu", path)
        assert target.defaults.sequence == 128, "[defaults] may be left out"
        assert target.capabilities.matmul_add == "reshape-gemm" and not target.has("rms_norm_op")
    cpu = load_target(f"{path}:cpu")
    assert (cpu.name, cpu.device, cpu.backend, cpu.gpu) == ("mine:cpu", "cpu", "llvm", None)
    assert cpu.memory == target.memory and cpu.capabilities == target.capabilities, "the rest is inherited"


def test_variant_replaces_tables_whole(tmp_path: Path) -> None:
    capabilities = ('capabilities = { layer_norm_op = false, rms_norm_op = false, gelu_op = false, einsum = true, '
                    'int8_dot = true, quantization = "w8a16", max_opset = 17, matmul_add = "keep-matmul" }')
    path = _edited(tmp_path, ("[variants.cpu]\n", f"[variants.cpu]\n{capabilities}\n"))
    assert load_target(path).has("layer_norm_op")
    cpu = load_target(f"{path}:cpu")
    assert not cpu.has("layer_norm_op") and cpu.has("einsum") and cpu.capabilities.quantization == "w8a16"


# --- one-line errors -------------------------------------------------------------------------------

TOP_LEVEL_KEYS = "backend, capabilities, cpu, defaults, device, gpu, identity, memory, pipeline, schedule, tvm"
CAPABILITY_KEYS = "einsum, gelu_op, int8_dot, layer_norm_op, matmul_add, max_opset, quantization, rms_norm_op"

SCHEMA_ERRORS = {
    "unknown key": (('einsum = false', 'einsum = false\nflash_attention = true'),
                    f"capabilities.flash_attention: unknown key (known: {CAPABILITY_KEYS})"),
    "misspelt key": (('layer_norm_op = true', 'layernorm_op = true'),
                     "capabilities.layernorm_op: unknown key; did you mean 'layer_norm_op'? (and 1 more problem)"),
    "unknown top-level key": (('device = "gpu"', 'device = "gpu"\nsoc = "x"'),
                              f"soc: unknown key (known: {TOP_LEVEL_KEYS})"),
    "wrong type": (("bandwidth_gbps = 40", 'bandwidth_gbps = "fast"'),
                   "memory.bandwidth_gbps: expected a number, got 'fast'"),
    "string for integer": (("max_opset = 21", 'max_opset = "21"'),
                           "capabilities.max_opset: expected an integer, got '21'"),
    "string for bool": (("einsum = false", 'einsum = "no"'), "capabilities.einsum: expected true or false, got 'no'"),
    "bad enum": (('quantization = "w8a8"', 'quantization = "int4"'),
                 "capabilities.quantization: expected 'w8a8' or 'w8a16', got 'int4'"),
    "missing required": (("int8_dot = true\n", ""), "capabilities.int8_dot: required key is missing"),
    "missing table": (('[memory]\nbandwidth_gbps = 40\nsource = "made up for a test"\n', ""),
                      "memory: required key is missing"),
    "not positive": (("bandwidth_gbps = 40", "bandwidth_gbps = 0"), "memory.bandwidth_gbps: must be > 0, got 0"),
    "infinite": (("bandwidth_gbps = 40", "bandwidth_gbps = inf"), "memory.bandwidth_gbps: must be a finite number, got inf"),
    "list item": (('opencl_extensions = ["cl_khr_fp16", ', "opencl_extensions = [16, "),
                  "gpu.opencl_extensions[0]: expected a string, got 16"),
    "scalar for table": (('device = "gpu"', 'device = "gpu"\ndefaults = 128'), "defaults: expected a table, got 128"),
    "empty source": (('bandwidth_gbps = 40\nsource = "made up for a test"', 'bandwidth_gbps = 40\nsource = ""'),
                     "memory.source: must not be empty"),
    "name is not a key": (('device = "gpu"', 'name = "other"\ndevice = "gpu"'),
                          "name: unknown key (a target's name comes from its file)"),
    "variant key": (('backend = "llvm"\n', 'backend = "llvm"\nquantize = true\n'),
                    f"variants.cpu.quantize: unknown key (known: {TOP_LEVEL_KEYS})"),
    "variant value": (('[variants.cpu]\ndevice = "cpu"', '[variants.cpu]\ndevice = "cpu"\npipeline = "nope-pass"'),
                      "variants.cpu.pipeline: unknown pass 'nope-pass'"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
def test_schema_errors_are_one_line_naming_file_key_and_problem(tmp_path: Path, case: str) -> None:
    edit, expected = SCHEMA_ERRORS[case]
    path = _edited(tmp_path, edit)
    spec = f"{path}:cpu" if expected.startswith("variants.") else str(path)
    message = _error(spec)
    assert message.startswith(f"{path}: {expected}"), message
    if case != "variant value":  # the pipeline parser's message goes on to list every pass
        assert message == f"{path}: {expected}"


def test_several_problems_are_counted_on_the_one_line(tmp_path: Path) -> None:
    path = _edited(tmp_path, ("einsum = false", 'einsum = "no"'), ("gelu_op = true", "gelu_op = 1"),
                   ("max_opset = 21", "max_opset = 1.5"))
    assert _error(path) == f"{path}: capabilities.gelu_op: expected true or false, got 1 (and 2 more problems)"


HOST_LINE = 'host = { kind = "llvm", mtriple = "aarch64-linux-android", mattr = ["+neon", "+dotprod"] }\n'
DOTS = "cl_qcom_dot_product8, cl_arm_integer_dot_product_int8, cl_khr_integer_dot_product"
CROSS_KEY_ERRORS = {
    "backend vs device": (('backend = "opencl"', 'backend = "llvm"'),
                          "backend: backend 'llvm' runs on a cpu, but device is 'gpu'"),
    "tvm kind": (('kind = "opencl"', 'kind = "vulkan"'),
                 "tvm.target.kind: expected 'opencl' (the backend), got 'vulkan'"),
    "host missing": ((HOST_LINE, ""),
                     "tvm.host: required key is missing (a GPU target needs the CPU that launches its kernels)"),
    "mattr vs features": (('mattr = ["+neon", "+dotprod"] }\n\n[memory]', 'mattr = ["+neon", "+i8mm"] }\n\n[memory]'),
                          "tvm.host.mattr: enables i8mm, but cpu.i8mm is false"),
    "sve2 without sve": (("sve = false", "sve = false\nsve2 = true"), "cpu.sve2: SVE2 needs SVE, but cpu.sve is false"),
    "core count": (("cores = 8", "cores = 6"), "identity.cpu_cores: lists 8 cores, but cpu.cores is 6"),
    "int8 dot without extension": (('["cl_khr_fp16", "cl_qcom_dot_product8"]', '["cl_khr_fp16"]'),
                                   f"capabilities.int8_dot: true, but gpu.opencl_extensions lists none of {DOTS}"),
    "op above max opset": (("rms_norm_op = false", "rms_norm_op = true"),
                           "capabilities.rms_norm_op: RMSNormalization needs opset 23, but capabilities.max_opset "
                           + "is 21"),
    "metal family on opencl": (("local_memory_kib = 32", 'local_memory_kib = 32\nmetal_family = "apple8"'),
                               "gpu.metal_family: only for the metal backend, not 'opencl'"),
    "work group over limit": (("work_group_x = 8, work_group_y = 8", "work_group_x = 32, work_group_y = 16"),
                              "schedule.gemm: work group 32x16 = 512 exceeds schedule.max_work_group 256"),
    "limit over hardware": (("max_work_group = 1024", "max_work_group = 128"),
                            "schedule.max_work_group: 256 exceeds the hardware's gpu.max_work_group 128"),
    "gemv row": (("gemv = { tile_m = 1, tile_n = 8", "gemv = { tile_m = 2, tile_n = 8"),
                 "schedule.gemv.tile_m: a GEMV computes one row: expected 1, got 2"),
    "tile_k vs vector width": (("tile_k = 16, vector_width = 4", "tile_k = 18, vector_width = 4"),
                               "schedule.gemm.tile_k: 18 is not a multiple of vector_width 4"),
    "gpu work group on cpu": (("gemm = { tile_m = 8, tile_n = 8, tile_k = 16, vector_width = 16 }",
                               "gemm = { tile_m = 8, tile_n = 8, tile_k = 16, vector_width = 16, work_group_x = 4 }"),
                              "variants.cpu.schedule.gemm.work_group_x: a GPU setting, but device is 'cpu'"),
    "pipeline": (('pipeline = "canonicalize"', 'pipeline = "canonicalize,fuse-everything"'),
                 "pipeline: unknown pass 'fuse-everything'"),
}


@pytest.mark.parametrize("case", sorted(CROSS_KEY_ERRORS))
def test_cross_key_checks_name_the_key_at_fault(tmp_path: Path, case: str) -> None:
    edit, expected = CROSS_KEY_ERRORS[case]
    path = _edited(tmp_path, edit)
    message = _error(f"{path}:cpu" if expected.startswith("variants.") else path)
    assert message.startswith(f"{path}: {expected}"), message


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'device = "gpu"\nbackend = opencl\n')
    assert _error(path).startswith(f"{path}: line 2, column 11: invalid TOML: ")
    unclosed = _write(tmp_path, 'device = "gpu"\n[capabilities\nx = 1\n', "unclosed.toml")
    expected = "line 2, column 14: invalid TOML: Expected ']' at the end of a table declaration"
    assert _error(unclosed) == f"{unclosed}: {expected}"
    truncated = _write(tmp_path, 'device = "gpu"\n[capabilities', "cut.toml")
    assert _error(truncated).startswith(f"{truncated}: end of file: invalid TOML: ")


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    assert _error(tmp_path / "absent.toml") == f"{tmp_path / 'absent.toml'}: no such target file"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert _error(binary) == f"{binary}: not UTF-8 text (a TOML file must be UTF-8)"


def test_unknown_target_name_lists_the_valid_ones() -> None:
    assert _error("nope") == f"unknown target 'nope'; targets: {', '.join(BUNDLED)} (or a path to a .toml file)"
    assert _error("SD8GEN2").startswith("unknown target 'SD8GEN2'; targets: a16, a16:cpu,")
    assert _error("sd8gen2:").startswith("target 'sd8gen2:': empty variant name")


def test_unknown_variant_lists_the_variants(tmp_path: Path) -> None:
    bundled = BUNDLED_DIR / "sd8gen2.toml"
    assert _error("sd8gen2:gpu") == f"{bundled}: target 'sd8gen2' has no variant 'gpu' (its variants: cpu)"
    assert _error("host:cpu") == f"{BUNDLED_DIR / 'host.toml'}: target 'host' has no variant 'cpu' (its variants: none)"
    path = _write(tmp_path, MINIMAL)
    assert _error(f"{path}:npu") == f"{path}: target 'mine' has no variant 'npu' (its variants: cpu)"
    nested = _edited(tmp_path, ('[variants.cpu]\n', '[variants.cpu]\nvariants = { x = { device = "cpu" } }\n'))
    assert _error(nested) == f"{nested}: variants.cpu.variants: variants do not nest"


# --- TVM (slow: importing TVM takes ~3 s) ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_tvm_accepts_every_bundled_target(name: str) -> None:
    from tvm.target import codegen

    target = load_target(name)
    built = target.tvm_target()  # also checks LLVM's view of dotprod / i8mm / sve against [cpu]
    assert built.kind.name == target.backend
    cpu_side = built if target.device == "cpu" else built.host
    assert cpu_side is not None and cpu_side.kind.name == "llvm"
    if name == "host":
        assert str(built.attrs["mcpu"]) == codegen.llvm_get_system_cpu() != "detect"
    else:
        assert bool(cpu_side.attrs["feature.has_dotprod"]) and bool(cpu_side.attrs["feature.is_aarch64"])


@pytest.mark.slow
def test_tvm_target_refuses_what_llvm_would_silently_change(tmp_path: Path) -> None:
    x3 = _edited(tmp_path, ('mattr = ["+neon", "+dotprod"] }\n\n[memory]',
                            'mcpu = "cortex-x3", mattr = ["+neon", "+dotprod", "+i8mm"] }\n\n[memory]'),
                 ("i8mm = false", "i8mm = true"))
    with pytest.raises(TargetError, match="^" + str(x3) + ": tvm.host: LLVM turns sve on for this mcpu/mattr but "
                                          "cpu.sve is false; add '-sve' to mattr$"):
        load_target(x3).tvm_target()
    bogus = _edited(tmp_path, ('mattr = ["+neon", "+dotprod"] }\n\n[memory]',
                               'mcpu = "cortex-z9", mattr = ["+neon", "+dotprod"] }\n\n[memory]'))
    with pytest.raises(TargetError, match=r": tvm\.host\.mcpu: LLVM \d+ does not know CPU 'cortex-z9' for "
                                          r"aarch64-linux-android$"):
        load_target(bogus).tvm_target()
    refused = _edited(tmp_path, ('device = "adreno"', 'device = "adreno", warp_size = 3'))
    with pytest.raises(TargetError, match=r": tvm: TVM refuses the target: .*warp_size"):
        load_target(refused).tvm_target()


# --- import cost -----------------------------------------------------------------------------------

_PROBE = """
import json, sys
import passes, passes.targets
after_import = sorted(m for m in ("pydantic", "tvm") if m in sys.modules)
names = passes.targets.list_targets()
after_list = sorted(m for m in ("pydantic", "tvm") if m in sys.modules)
passes.targets.load_target("sd8gen2:cpu").has("int8_dot")
after_load = sorted(m for m in ("pydantic", "tvm") if m in sys.modules)
print(json.dumps([after_import, after_list, after_load]))
"""


def test_loading_a_target_never_imports_tvm() -> None:
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == [[], [], ["pydantic"]]


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_lists_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in BUNDLED:
        assert name in out
    assert "Adreno" in out and "w8a16" in out
    assert main(["targets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["targets"]
    assert [t["name"] for t in listed] == BUNDLED


def test_cli_shows_one_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["targets", "show", "sd8gen2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == load_target("sd8gen2").to_dict()
    assert shown["capabilities"]["quantization"] == "w8a8" and shown["gpu"]["int8_tops"] >= shown["gpu"]["fp16_tflops"]
    assert main(["targets", "show", "sd8gen2"]) == 0
    out = capsys.readouterr().out
    assert "Adreno 740" in out and "cl_qcom_dot_product8" in out and "source" in out
    path = _write(tmp_path, MINIMAL)
    assert main(["targets", "show", f"{path}:cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "mine:cpu"
    brackets = _edited(tmp_path, ('source = "made up for a test"\n\n[gpu]', 'source = "see [bold] [/x]"\n\n[gpu]'))
    assert main(["targets", "show", str(brackets)]) == 0, "user text is not rich markup"
    assert "see [bold] [/x]" in capsys.readouterr().out


def test_cli_unknown_target_is_one_error_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["targets", "show", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    listing = ", ".join(BUNDLED)
    expected = f"error: unknown target 'nope'; targets: {listing} (or a path to a .toml file)"
    assert captured.err.splitlines() == [expected]
    path = _edited(tmp_path, ('quantization = "w8a8"', 'quantization = "int4"'))
    assert main(["targets", "show", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: capabilities.quantization: expected 'w8a8' or 'w8a16', got 'int4'"
    ]
