"""What is this machine's AVX512-VNNI peak in INT8 GOPS (1 MAC = 2 ops)?

A register-only microbenchmark built with TVM for the host CPU: each of `--threads` parallel tasks runs
`--iters` iterations of 24 independent `vpdpbusd zmm` (24 accumulators hide the instruction's latency;
no memory traffic in the loop). One `vpdpbusd zmm` is 16 lanes x 4 = 64 MACs. The best of `--repeat`
timings is reported; `bench/int8_gemm.py` imports `measure_peak` for its "% of peak" column.

    python bench/vnni_peak.py [--threads 2] [--iters 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ACCUMULATORS = 24
MACS_PER_INSTRUCTION = 64


def _peak_module(threads: int):
    import tvm
    from passes.kernels.x86_int8 import host_target
    from tvm.script import tirx as T

    width = ACCUMULATORS * 16

    @T.prim_func
    def peak(
        src: T.Buffer((128,), "int8"),
        out: T.Buffer((threads, width), "int32"),
        iters: T.int32,
    ):
        T.func_attr({"global_symbol": "peak", "tirx.noalias": True})
        for task in T.parallel(threads):
            acc = T.alloc_buffer((width,), "int32", scope="local")
            for j in T.vectorized(width):
                acc[j] = task
            a = T.reinterpret(src[T.ramp(0, 1, 64)], dtype="uint8x64")
            b = src[T.ramp(64, 1, 64)]
            for _ in range(iters):
                for j in T.unroll(ACCUMULATORS):
                    acc[T.ramp(j * 16, 1, 16)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                        acc[T.ramp(j * 16, 1, 16)],
                        a,
                        b,
                        dtype="int32x16",
                    )
            for j in T.vectorized(width):
                out[task, j] = acc[j]

    return tvm.compile(tvm.IRModule({"peak": peak}), target=host_target())


def measure_peak(threads: int = 2, iters: int = 200_000, repeat: int = 5) -> float:
    """Best measured VNNI GOPS over `repeat` runs with `threads` parallel tasks (TVM_NUM_THREADS >= threads)."""
    import numpy as np
    import tvm

    module = _peak_module(threads)
    src = tvm.runtime.tensor(np.arange(128, dtype=np.int8))
    out = tvm.runtime.tensor(np.zeros((threads, ACCUMULATORS * 16), np.int32))
    module["peak"](src, out, 1000)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        module["peak"](src, out, iters)
        best = min(best, time.perf_counter() - start)
    return 2 * threads * iters * ACCUMULATORS * MACS_PER_INSTRUCTION / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    gops = measure_peak(args.threads, args.iters, args.repeat)
    print(
        f"VNNI peak, {args.threads} thread(s): {gops:.0f} GOPS ({gops / args.threads:.0f} per thread)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
