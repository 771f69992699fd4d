"""Fixtures for tests on real exporter output: `real_export(arch, exporter)` gives the path of a
cached, self-contained .onnx exported by PyTorch (see `export.py`).

Files live in pytest's cache (`.pytest_cache/d/real-exports`), keyed by arch, exporter, library
versions and a hash of the config and recipe, so only the first run pays for the exports; within a
session each model is exported (or found) once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.real_models.export import Exporter, cached_path, export_model

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
