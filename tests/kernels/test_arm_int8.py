"""AArch64 INT8 GEMM (`passes.kernels.arm_int8`): instructions in the assembly, bit-exact under qemu.

Assembly: kernels built for `sd888:cpu` (dotprod) must contain `sdot`, for `sd8gen2:cpu` (i8mm)
`smmla`, and neither may contain an int8 multiply fallback (NEON `smull`/`smlal`/`sxtl`/`mla` on v
registers, or scalar `ldrsb` + `madd`); the same schedule without the tensorize step is the control:
LLVM 22 emits `ldrsb` + `madd` / `mla` for it, so the assertion can fail.
Numerics: the object TVM emits is statically linked with a small C driver (packed-function ABI,
serial `TVMBackendParallelLaunch` over 3 tasks) by `aarch64-linux-gnu-gcc` and run under
`qemu-aarch64`; outputs must equal numpy's int32 matmul exactly (tolerance: none, integer arithmetic).
Those tests skip when Debian's `qemu-user` / `gcc-aarch64-linux-gnu` are missing. The same schedules
without tensorize are also run on the x86 host (llvm) bit-exactly.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from passes.kernels import arm_int8
from passes.targets import load_target

pytestmark = pytest.mark.slow

FALLBACK = re.compile(
    r"\b(?:(?:smull2?|smlal2?|sxtl2?|sshll2?|saddw2?|mla)\s+v\d+|ldrsb\s|madd\s)"
)
"""What LLVM emits for int8 MACs without the intrinsic: NEON widening multiplies or multiply-adds on
v registers, or scalar sign-extending byte loads (`ldrsb`) feeding scalar `madd`."""
QEMU = shutil.which("qemu-aarch64")
CROSS_GCC = shutil.which("aarch64-linux-gnu-gcc")
needs_qemu = pytest.mark.skipif(
    not (QEMU and CROSS_GCC),
    reason="needs Debian qemu-user and gcc-aarch64-linux-gnu",
)
TARGETS = {"sdot": "sd888:cpu", "smmla": "sd8gen2:cpu"}

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
typedef struct { int32_t device_type, device_id; } Dev;
typedef struct { uint8_t code, bits; uint16_t lanes; } DType;
typedef struct { void* data; Dev device; int32_t ndim; DType dtype; int64_t* shape;
                 int64_t* strides; uint64_t byte_offset; } Tensor;
typedef struct { int32_t type_index; uint32_t pad; union { int64_t i; void* p; } v; } Any;
typedef struct { void* sync; int32_t num_task; } Env;
typedef int (*Lambda)(int, Env*, void*);
extern int __tvm_ffi_main(void*, const Any*, int32_t, Any*);
/* Function-pointer slots a TVM object defines only when it uses them (the loader fills them). */
extern void* __TVMBackendParallelLaunch __attribute__((weak));
extern void* __TVMBackendAllocWorkspace __attribute__((weak));
extern void* __TVMBackendFreeWorkspace __attribute__((weak));
static int launch(Lambda f, void* cdata, int num_task) {
  Env env = {0, 3};
  for (int t = 0; t < 3; ++t) if (f(t, &env, cdata)) return -1;
  return 0;
}
static void* alloc_ws(int dt, int id, uint64_t n, int c, int b) { return malloc(n ? n : 1); }
static int free_ws(int dt, int id, void* p) { free(p); return 0; }
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "%s:", kind);
  for (int i = 0; i < n; ++i) fprintf(stderr, " %s", parts[i]);
  fprintf(stderr, "\n");
}
static void* slurp(const char* path, size_t n) {
  void* buf = malloc(n); FILE* f = fopen(path, "rb");
  if (!f || fread(buf, 1, n, f) != n) { fprintf(stderr, "read %s\n", path); exit(2); }
  fclose(f); return buf;
}
int main(int argc, char** argv) {
  if (argc != 11) { fprintf(stderr, "usage: m k n p0 p1 p2 p3 a b c\n"); return 2; }
  int64_t s[7]; for (int i = 0; i < 7; ++i) s[i] = atoll(argv[i + 1]);
  if (&__TVMBackendParallelLaunch) __TVMBackendParallelLaunch = (void*)launch;
  if (&__TVMBackendAllocWorkspace) __TVMBackendAllocWorkspace = (void*)alloc_ws;
  if (&__TVMBackendFreeWorkspace) __TVMBackendFreeWorkspace = (void*)free_ws;
  int64_t ashape[2] = {s[0], s[1]}, cshape[2] = {s[0], s[2]};
  int64_t bshape[4] = {s[3], s[4], s[5], s[6]};
  Tensor a = {slurp(argv[8], (size_t)(s[0] * s[1])), {1, 0}, 2, {0, 8, 1}, ashape, 0, 0};
  Tensor b = {slurp(argv[9], (size_t)(s[3] * s[4] * s[5] * s[6])), {1, 0}, 4, {0, 8, 1},
              bshape, 0, 0};
  Tensor c = {calloc((size_t)(s[0] * s[2]), 4), {1, 0}, 2, {0, 32, 1}, cshape, 0, 0};
  Any args[3], ret = {0, 0, {0}};
  Tensor* ts[3] = {&a, &b, &c};
  for (int i = 0; i < 3; ++i) { args[i].type_index = 7; args[i].pad = 0; args[i].v.p = ts[i]; }
  int rc = __tvm_ffi_main(0, args, 3, &ret);
  if (rc) { fprintf(stderr, "kernel failed: %d\n", rc); return 1; }
  FILE* f = fopen(argv[10], "wb");
  fwrite(c.data, 4, (size_t)(s[0] * s[2]), f); fclose(f);
  return 0;
}
"""


def _target(name: str) -> tvm.target.Target:
    return load_target(name).tvm_target()


@functools.cache
def _kernel(
    inst: str, m: int, k: int, n: int, tensorize: bool = True
) -> arm_int8.ArmGemm:
    return arm_int8.build_gemm(m, k, n, _target(TARGETS[inst]), tensorize=tensorize)


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int32) @ b.astype(np.int32)


def _operands(m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    return (
        rng.integers(-128, 128, (m, k), dtype=np.int8),
        rng.integers(-128, 128, (k, n), dtype=np.int8),
    )


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C driver compiled once for aarch64."""
    work = tmp_path_factory.mktemp("arm-driver")
    source = work / "driver.c"
    source.write_text(DRIVER)
    obj = work / "driver.o"
    subprocess.run([CROSS_GCC, "-O1", "-c", str(source), "-o", str(obj)], check=True)
    return obj


def _run_under_qemu(
    kernel: arm_int8.ArmGemm, a: np.ndarray, b: np.ndarray, driver: Path, work: Path
) -> np.ndarray:
    """Export `kernel`'s object, link it with the driver, run it under qemu and read C back."""
    kernel.module.export_library(str(work / "kernel.tar"))
    with tarfile.open(work / "kernel.tar") as tar:
        tar.extractall(work / "objs", filter="data")
    objects = sorted(str(p) for p in (work / "objs").glob("*.o"))
    exe = work / "run"
    subprocess.run(
        [CROSS_GCC, "-static", str(driver), *objects, "-o", str(exe)],
        check=True,
    )
    packed = kernel.pack(b)
    a.tofile(work / "a.bin")
    packed.tofile(work / "b.bin")
    m, n = a.shape[0], b.shape[1]
    dims = [str(x) for x in (m, a.shape[1], n, *packed.shape)]
    files = [str(work / x) for x in ("a.bin", "b.bin", "c.bin")]
    done = subprocess.run(
        [QEMU, str(exe), *dims, *files],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return np.fromfile(work / "c.bin", np.int32).reshape(m, n)


def test_instruction_follows_target_features() -> None:
    assert arm_int8.pick_instruction(_target("sd8gen2:cpu")) is arm_int8.SMMLA
    assert arm_int8.pick_instruction(_target("sd888:cpu")) is arm_int8.SDOT
    plain = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    )
    with pytest.raises(ValueError, match="neither i8mm nor dotprod"):
        arm_int8.pick_instruction(plain)


@pytest.mark.parametrize("inst", [arm_int8.SDOT, arm_int8.SMMLA], ids=lambda i: i.name)
def test_pack_weights_layout_and_padding(inst: arm_int8.Instruction) -> None:
    b = np.arange(-60, 45, dtype=np.int8).reshape(7, 15)
    packed = arm_int8.pack_weights(b, inst, cols=16)
    assert packed.shape == (16 // inst.cols, 8 // inst.depth, inst.cols, inst.depth)
    for col_block, k_block, lane, depth in np.ndindex(*packed.shape):
        k, n = inst.depth * k_block + depth, inst.cols * col_block + lane
        assert packed[col_block, k_block, lane, depth] == (
            b[k, n] if k < 7 and n < 15 else 0
        )


@pytest.mark.parametrize("inst", ["sdot", "smmla"])
@pytest.mark.parametrize("m", [1, 16, 128])
def test_assembly_uses_the_instruction_and_no_fallback(inst: str, m: int) -> None:
    kernel = _kernel(inst, m, 256, 64)
    asm = kernel.assembly()
    other = "smmla" if inst == "sdot" else "sdot"
    assert kernel.instruction.name == inst
    assert re.search(rf"\b{inst}\s+v\d+", asm)
    assert not re.search(rf"\b{other}\s+v\d+", asm)
    assert not FALLBACK.search(asm), FALLBACK.search(asm)


@pytest.mark.parametrize("inst", ["sdot", "smmla"])
def test_control_without_tensorize_falls_back(inst: str) -> None:
    asm = _kernel(inst, 16, 256, 64, tensorize=False).assembly()
    assert FALLBACK.search(asm)
    assert not re.search(rf"\b{inst}\s+v\d+", asm)


def test_refuses_bad_tiles_and_weights() -> None:
    with pytest.raises(ValueError, match="rows a multiple of 2"):
        arm_int8.ArmShape(4, 8, 8, arm_int8.SMMLA, arm_int8.ArmTiles(3, 16))
    with pytest.raises(ValueError, match="cols a multiple of 4"):
        arm_int8.ArmShape(4, 8, 8, arm_int8.SDOT, arm_int8.ArmTiles(4, 6))
    with pytest.raises(ValueError, match="2-D int8 array"):
        arm_int8.pack_weights(np.ones((4, 4), np.int32), arm_int8.SDOT)


@pytest.mark.parametrize("inst", [arm_int8.SDOT, arm_int8.SMMLA], ids=lambda i: i.name)
@pytest.mark.parametrize("m, k, n", [(1, 64, 32), (5, 37, 19), (16, 100, 70)])
def test_untensorized_schedule_bit_exact_on_host(
    inst: arm_int8.Instruction, m: int, k: int, n: int
) -> None:
    """The same loops, tiles and layouts built for the x86 host (llvm) without the tensorize step."""
    shape = arm_int8.ArmShape(m, k, n, inst, arm_int8.default_tiles(m, inst))
    sch = arm_int8.schedule_gemm(arm_int8.gemm_func(shape), shape, tensorize=False)
    module = tvm.compile(sch.mod, target=tvm.target.Target("llvm"))
    a, b = _operands(m, k, n)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    packed = arm_int8.pack_weights(b, inst, shape.tiles.cols)
    module(tvm.runtime.tensor(a), tvm.runtime.tensor(packed), out)
    np.testing.assert_array_equal(out.numpy(), _reference(a, b))


@needs_qemu
@pytest.mark.parametrize("inst", ["sdot", "smmla"])
@pytest.mark.parametrize(
    "m, k, n",
    [(1, 256, 64), (16, 256, 64), (128, 96, 48), (1, 1, 1), (17, 1000, 70), (3, 13, 5)],
)
def test_bit_exact_under_qemu(
    inst: str, m: int, k: int, n: int, driver: Path, tmp_path: Path
) -> None:
    a, b = _operands(m, k, n)
    out = _run_under_qemu(_kernel(inst, m, k, n), a, b, driver, tmp_path)
    np.testing.assert_array_equal(out, _reference(a, b))


@needs_qemu
@pytest.mark.parametrize("inst", ["sdot", "smmla"])
@pytest.mark.parametrize("value_a, value_b", [(-128, -128), (127, -128), (-128, 127)])
def test_int8_extremes_exact_under_qemu(
    inst: str, value_a: int, value_b: int, driver: Path, tmp_path: Path
) -> None:
    m, k, n = (
        3,
        1031,
        37,
    )  # 128 * 128 * 1031 = 16.9M: past int16, far from int32 overflow
    a = np.full((m, k), value_a, np.int8)
    b = np.full((k, n), value_b, np.int8)
    out = _run_under_qemu(_kernel(inst, m, k, n), a, b, driver, tmp_path)
    np.testing.assert_array_equal(out, _reference(a, b))


@st.composite
def gemm_cases(draw: st.DrawFn) -> tuple[str, np.ndarray, np.ndarray]:
    inst = draw(st.sampled_from(["sdot", "smmla"]))
    m = draw(st.sampled_from([1, 2, 3, 5, 7, 16, 17, 33]))
    k, n = draw(st.integers(1, 200)), draw(st.integers(1, 150))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    if draw(st.booleans()):  # sprinkle the extremes
        values = np.array([-128, 127, -1, 0, 1], np.int8)
        a = np.where(rng.random(a.shape) < 0.3, rng.choice(values, a.shape), a)
        b = np.where(rng.random(b.shape) < 0.3, rng.choice(values, b.shape), b)
    return inst, a.astype(np.int8), b.astype(np.int8)


@needs_qemu
@given(case=gemm_cases())
@example(case=("smmla", np.full((1, 9), -128, np.int8), np.full((9, 3), -128, np.int8)))
@example(case=("sdot", np.full((7, 5), 127, np.int8), np.full((5, 17), -128, np.int8)))
def test_property_bit_exact_under_qemu(
    case: tuple[str, np.ndarray, np.ndarray], driver: Path
) -> None:
    inst, a, b = case
    kernel = _kernel(inst, a.shape[0], a.shape[1], b.shape[1])
    with tempfile.TemporaryDirectory() as work:
        out = _run_under_qemu(kernel, a, b, driver, Path(work))
    np.testing.assert_array_equal(out, _reference(a, b))
