"""`passes.kernels`: INT8 matmul compute definitions, per-backend schedules and tensor intrinsics.

Installed as `passes.kernels` (setuptools package-dir mapping); never importable as `kernels`.
Only this package and `passes.lowering` import TVM. The kernels themselves arrive with the INT8
kernels issue; until then the package holds no modules.
"""
