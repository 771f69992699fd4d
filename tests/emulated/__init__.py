"""Checks run under `qemu-x86_64 -cpu EPYC-Milan`: an emulated AMD Zen 3 (AVX2, no AVX-512, no VNNI),
so the AVX2-only paths are executed, not only compiled, on whichever x86-64 machine runs the suite."""
