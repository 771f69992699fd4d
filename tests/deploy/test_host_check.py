"""`passes run`'s host check on every x86 family and every scheme, judged by the exact reference.

The bundled decoder at hidden 256 is built for this machine's CPU (`host`) and for a Zen 3 (`znver3`:
AVX2, no AVX-512; its code runs on any AVX2 CPU), with each quantization scheme. Integer results must be
bit-exact; float outputs within float rounding (scaled by the output's magnitude); where activations
are quantized and an ulp of upstream rounding flips a code, the build must be as accurate against fp32
as the quantized model itself (`passes.deploy.host_check.QUANTIZED_MARGIN_DB`). The SQNR the run reports must not
depend on the CPU the build is for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from passes.core.errors import VerificationError
from passes.core.io import save_model
from passes.kernels import x86_int8
from passes.deploy.host_check import run_host_check
from passes.deploy.run import run_for_target
from passes.samples import build_sample
from tests.lowering import x86_target

pytestmark = pytest.mark.slow

SCHEMES = ["w8a8-static", "w8a8-dynamic", "w8a16"]
SHAPE = {"input_ids": (1, 64)}


@pytest.fixture(scope="module")
def wide_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wide") / "tiny-llama-256.onnx"
    save_model(build_sample("tiny-llama", hidden=256), path)
    return path


def _target(cpu: str):  # -> target spec or description
    return "host" if cpu == "host" else x86_target(cpu).source_path


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_builds_exact_on_this_cpu_and_on_zen3(wide_sample: Path, tmp_path: Path, scheme: str) -> None:
    reports = {cpu: run_for_target(wide_sample, _target(cpu), tmp_path / cpu, input_shapes=SHAPE, quantize=scheme)
               for cpu in ("host", "znver3")}
    expected_family = {"host": x86_int8.best_isa().family, "znver3": "x86-avx2"}
    for cpu, report in reports.items():
        check = report.host_check
        assert check is not None and check["ok"], (cpu, check)
        if scheme != "w8a16":  # static, and dynamic with per-token scales (zero point 128): int8 kernels
            assert report.dispatched[expected_family[cpu]]["matmuls"] == 9
        if check["criterion"] != "allclose":  # codes flipped by an ulp: as accurate as the quantized model
            for output in check["sqnr"].values():
                assert output["build_db"] >= output["reference_db"] - check["margin_db"]
    sqnr = [report.quantization["output_sqnr_db"] for report in reports.values()]
    assert abs(sqnr[0] - sqnr[1]) < 0.1


def _quantized_sample():
    import passes
    from passes.transforms.quantize_int8 import QuantizeInt8

    frozen = passes.optimize(build_sample("tiny-llama"), input_shapes={"input_ids": (1, 16)})
    return frozen, QuantizeInt8(scheme="w8a8-dynamic")(frozen).model


def test_a_build_less_accurate_than_the_quantized_model_is_refused() -> None:
    """A build whose error is that of a saturating kernel (noise at the quantization's own level) fails."""
    from passes.numerics.verify import run_model

    frozen, quantized = _quantized_sample()
    rng = np.random.default_rng(0)

    def noisy_build(_built: object, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = run_model(quantized, feeds)
        return {k: (v + rng.normal(0, 0.2 * float(np.std(v)), v.shape)).astype(v.dtype) for k, v in out.items()}

    with pytest.raises(VerificationError, match="less accurate than the quantized model: output 'logits' SQNR"):
        run_host_check(None, quantized, {"input_ids": (1, 16)}, noisy_build, frozen)
    exact = run_host_check(None, quantized, {"input_ids": (1, 16)}, lambda _b, f: run_model(quantized, f), frozen)
    assert exact["ok"] and exact["criterion"] == "allclose"


def test_an_integer_output_must_be_bit_exact() -> None:
    from tests.numerics.test_exact import matmul_integer

    a = np.zeros((4, 8), np.uint8)
    made = matmul_integer(a, np.ones((8, 3), np.int8))

    def off_by_one(_built: object, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": (feeds["a"].astype(np.int32) @ np.ones((8, 3), np.int32) + 1).astype(np.int32)}

    with pytest.raises(VerificationError, match="output 'y' max abs error 1"):
        run_host_check(None, made, {"a": (4, 8)}, off_by_one, None)
