"""`passes.kernels`: INT8 matmul compute definitions, per-backend schedules and tensor intrinsics.

Installed as `passes.kernels` (setuptools package-dir mapping); never importable as `kernels`.
Only this package and `passes.lowering` import TVM. The kernels themselves arrive with the INT8
kernels issue; until then the package holds no modules.

- `x86_vnni`: W8A8 GEMM for the x86 host (own `vpdpbusd` intrinsic that verifies under LLVM 22; s8 x s8 via
  the +128 shift), compute definition in `_gemm`.
"""
