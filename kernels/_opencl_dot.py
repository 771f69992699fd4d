"""The 4-way int8 dot product of the OpenCL INT8 kernels: one extern name, a vendor builtin per GPU.

The TIR calls `passes_dot4_acc(char4 a, char4 b, int acc)` (= acc + a.x*b.x + a.y*b.y + a.z*b.z + a.w*b.w,
operands sign-extended to 32 bits) through `call_pure_extern`; TVM's OpenCL code generator emits the
call by name and this prelude, prepended to the generated source, defines it:

- Mali (`cl_arm_integer_dot_product_accumulate_int8`): `arm_dot_acc(char4, char4, int)`, signed
  per Khronos extension #52; `cl_arm_integer_dot_product_int8` alone gives `acc + arm_dot(a, b)`.
- Adreno (`cl_qcom_dot_product8`): `qcom_dot8_acc(uint, uint, int)` on the bytes reinterpreted as uint
  (Qualcomm's Adreno OpenCL guide, section 9.5.1). Qualcomm's text is ambiguous about the operands'
  signedness and this has not been checked on a device: `PASSES_QCOM_DOT8_UNSIGNED` selects the
  unsigned reading, recovering the signed product by flipping the sign bits (x + 128 as u8) and
  subtracting the cross terms: a.b = (a+128).(b+128) - 128*(sum a + sum b) - 4*128*128.
- anything else (PoCL here): four multiply-adds.

TVM 0.27's OpenCL code generator (`target.build.opencl`) passes each kernel's source through the global
function `tvm_callback_opencl_postproc(code, target)` when one is registered, and the runtime module
keeps what it returns (a `// Function: <kernel>` section per kernel, each compiled on its own).
`install_postproc` registers one that runs `with_prelude`, so a model built by `tvm.compile`, the
kernel files written from it and the harness's generated source all carry the prelude. The prelude is
include-guarded: several sections concatenated into one program define the dot product once.
"""

from __future__ import annotations

EXTERN = "passes_dot4_acc"
"""The name the TIR calls; defined by `PRELUDE`."""

ARM_BUILTIN = "arm_dot_acc"
QCOM_BUILTIN = "qcom_dot8_acc"

GUARD = "PASSES_DOT4_ACC_PRELUDE"
"""Include guard of `PRELUDE`."""
POSTPROC_HOOK = "tvm_callback_opencl_postproc"
"""The global function TVM's OpenCL code generator calls on each kernel's source."""
_OURS = "passes.kernels.opencl_dot_postproc"
"""The same function registered under our own name, to recognise it as the hook."""

PRELUDE = f"""\
// passes: 4-way int8 dot product with accumulate, {EXTERN}(char4 a, char4 b, int acc)
#ifndef {GUARD}
#define {GUARD}
#if defined(cl_arm_integer_dot_product_accumulate_int8)
#pragma OPENCL EXTENSION cl_arm_integer_dot_product_accumulate_int8 : enable
#define {EXTERN}(a, b, acc) {ARM_BUILTIN}((char4)(a), (char4)(b), (int)(acc))
#elif defined(cl_arm_integer_dot_product_int8)
#pragma OPENCL EXTENSION cl_arm_integer_dot_product_int8 : enable
#define {EXTERN}(a, b, acc) ((int)(acc) + arm_dot((char4)(a), (char4)(b)))
#elif defined(cl_qcom_dot_product8) && !defined(PASSES_QCOM_DOT8_UNSIGNED)
#pragma OPENCL EXTENSION cl_qcom_dot_product8 : enable
#define {EXTERN}(a, b, acc) {QCOM_BUILTIN}(as_uint((char4)(a)), as_uint((char4)(b)), (int)(acc))
#elif defined(cl_qcom_dot_product8)
#pragma OPENCL EXTENSION cl_qcom_dot_product8 : enable
inline int {EXTERN}(char4 a, char4 b, int acc) {{
  const uint flip = 0x80808080u;
  int sums = (int)a.x + a.y + a.z + a.w + b.x + b.y + b.z + b.w;
  return {QCOM_BUILTIN}(as_uint(a) ^ flip, as_uint(b) ^ flip, acc) - 128 * sums - 65536;
}}
#else
inline int {EXTERN}(char4 a, char4 b, int acc) {{
  return acc + (int)a.x * (int)b.x + (int)a.y * (int)b.y + (int)a.z * (int)b.z + (int)a.w * (int)b.w;
}}
#endif
#endif  // {GUARD}
"""


def with_prelude(source: str) -> str:
    """`source` (OpenCL C from TVM) with the definition of `passes_dot4_acc` in front of it, when it calls
    it and lacks it."""
    if EXTERN not in source or PRELUDE in source:
        return source
    return PRELUDE + "\n" + source


def install_postproc() -> None:
    """Make TVM's OpenCL code generator put `PRELUDE` in front of every kernel that calls `passes_dot4_acc`.

    Idempotent; a hook registered before (by someone else) still runs, first, and its output gets
    the prelude."""
    import tvm_ffi

    current = tvm_ffi.get_global_func(POSTPROC_HOOK, allow_missing=True)
    ours = tvm_ffi.get_global_func(_OURS, allow_missing=True)
    if current is not None and ours is not None and current.same_as(ours):
        return

    def postproc(code: str, target: object, previous: object = current) -> str:
        if previous is not None:
            code = previous(code, target)  # type: ignore[operator]
        return with_prelude(str(code))

    hook = tvm_ffi.convert(postproc)
    tvm_ffi.register_global_func(_OURS, hook, override=True)
    tvm_ffi.register_global_func(POSTPROC_HOOK, hook, override=True)
