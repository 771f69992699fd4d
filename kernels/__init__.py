"""`passes.kernels`: INT8 matmul compute definitions, per-backend schedules and tensor intrinsics.
The lowering layer: may import TVM, `passes.lowering` helpers (schedules, TIR tools) and the layers below.

Installed as `passes.kernels` (setuptools package-dir mapping); never importable as `kernels`.
Only this package and `passes.lowering` import TVM.

- `x86_int8`: exact W8A8 GEMM for every x86-64 host, one schedule over three ISAs chosen by CPU features:
  AVX512-VNNI and AVX-VNNI (`vpdpbusd`, s8 x s8 via the +128 shift and a per-column correction) and AVX2
  (`vpmaddwd` on int16-widened operands); intrinsics in `_x86_intrinsics`, compute definitions in `_gemm`.
- `arm_int8`: W8A8 GEMM for aarch64 CPUs: `sdot` (4-way dot) and an i8mm `smmla` (2x2x8) intrinsic,
  chosen by the target's CPU features.
- `opencl_int8`: W8A8 GEMM/GEMV for Adreno and Mali: char4 dot products through the vendor builtins
  (`cl_qcom_dot_product8`, `cl_arm_integer_dot_product_int8`) behind `#ifdef`, with a portable fallback
  (`_opencl_dot`), tiles from the target description.
"""
