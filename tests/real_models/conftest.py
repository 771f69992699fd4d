"""Fixtures for tests on real exporter output: `real_export(arch, exporter)` gives the path of a
cached, self-contained .onnx exported by PyTorch (see `export.py`); `real_kv_export(arch, exporter)`,
`tiny_llama_kv` and `smollm2_kv` the decoders with a KV cache in the graph (see `kv_export.py`).

Files live in pytest's cache (`.pytest_cache/d/real-exports`), keyed by arch, exporter, library
versions and a hash of the config and recipe, so only the first run pays for the exports; within a
session each model is exported (or found) once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.real_models import smollm2
from tests.real_models.export import Exporter, cached_path, export_model
from tests.real_models.kv_export import cached_kv_path, cached_smollm2_kv_paths, export_kv_model, export_smollm2_kv

#: what a cache miss needs; they come with the `test` extra (pip install -e '.[test]').
EXPORT_REQUIREMENTS = ("torch", "transformers", "onnxscript")


@pytest.fixture(scope="session")
def real_exports_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytest's cache folder for exports, or a session temp folder when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("real-exports")
    return Path(cache.mkdir("real-exports"))


@pytest.fixture(scope="session")
def real_export(real_exports_dir: Path) -> Callable[[str, Exporter], Path]:
    """`real_export("llama", "dynamo")` -> path of the export, exporting it on a cache miss."""
    paths: dict[tuple[str, Exporter], Path] = {}

    def get(arch: str, exporter: Exporter) -> Path:
        key = (arch, exporter)
        if key not in paths:
            if not cached_path(arch, exporter, real_exports_dir).is_file():
                missing = [name for name in EXPORT_REQUIREMENTS if importlib.util.find_spec(name) is None]
                if missing:
                    pytest.skip(f"exporting {arch} needs {', '.join(missing)} (pip install -e '.[test]')")
            paths[key] = export_model(arch, exporter, real_exports_dir)
        return paths[key]

    return get


@pytest.fixture(scope="session")
def real_kv_export(real_exports_dir: Path) -> Callable[[str, Exporter], Path]:
    """`real_kv_export("llama", "torchscript")` -> path of the KV-cache export, exporting it on a cache miss."""
    paths: dict[tuple[str, Exporter], Path] = {}

    def get(arch: str, exporter: Exporter) -> Path:
        key = (arch, exporter)
        if key not in paths:
            if not cached_kv_path(arch, exporter, real_exports_dir).is_file():
                missing = [name for name in EXPORT_REQUIREMENTS if importlib.util.find_spec(name) is None]
                if missing:
                    pytest.skip(f"exporting {arch} with a KV cache needs {', '.join(missing)} "
                                f"(pip install -e '.[test]')")
            paths[key] = export_kv_model(arch, exporter, real_exports_dir)
        return paths[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama_kv(real_kv_export: Callable[[str, Exporter], Path]) -> Path:
    """The tiny Llama with past/present K/V in the graph, TorchScript at opset 17."""
    return real_kv_export("llama", "torchscript")


@pytest.fixture(scope="session")
def smollm2_kv(real_exports_dir: Path) -> tuple[Path, Path]:
    """(model.onnx, tokenizer folder) of SmolLM2-135M-Instruct with a KV cache, exporting it on a miss."""
    model_path, tokenizer_dir = cached_smollm2_kv_paths(real_exports_dir)
    if not (model_path.is_file() and (tokenizer_dir / "tokenizer.json").is_file()):
        missing = smollm2.missing_requirements()
        if missing:
            pytest.skip(f"the SmolLM2 KV export needs {', '.join(missing)}")
    return export_smollm2_kv(real_exports_dir)
