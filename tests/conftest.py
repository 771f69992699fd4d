"""Shared test set-up: hypothesis profiles (`dev` locally, `ci` when CI=true, `soak` on request via
HYPOTHESIS_PROFILE=soak for a long bug hunt) and small fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, settings

from tests._checkout_imports import install as install_checkout_imports

ROOT = Path(__file__).resolve().parents[1]

install_checkout_imports()  # transformers must get Hugging Face's `kernels`, not our folder
# every pipeline run in the suite compares whole-graph fingerprints around passes that report no change
# (`PassManager.check_contracts`; users get the cheap node-identity check)
os.environ.setdefault("PASSES_CHECK_CONTRACTS", "1")

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("soak", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def sample_model() -> Callable[..., onnx.ModelProto]:
    """Build (and cache) a bundled sample: sample_model("tiny-llama", idiom="dynamo")."""
    from passes.samples import build_sample

    cache: dict[tuple[object, ...], onnx.ModelProto] = {}

    def build(name: str = "tiny-llama", **kwargs: object) -> onnx.ModelProto:
        key = (name, *sorted(kwargs.items()))
        if key not in cache:
            cache[key] = build_sample(name, **kwargs)  # type: ignore[arg-type]
        copy = onnx.ModelProto()
        copy.CopyFrom(cache[key])
        return copy

    return build


@pytest.fixture()
def sample_file(tmp_path: Path, sample_model: Callable[..., onnx.ModelProto]) -> Path:
    """The 2-layer tiny-llama (torchscript idiom) saved to a temporary folder."""
    path = tmp_path / "tiny-llama.onnx"
    onnx.save_model(sample_model("tiny-llama"), str(path))
    return path
