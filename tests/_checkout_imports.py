"""`kernels` and `targets` are folders of this checkout (installed as `passes.kernels` and
`passes.targets`). Whatever puts the checkout's root on sys.path (pytest; `bench/` scripts that import
`tests.*`) makes a top-level `import kernels` find our folder, and transformers imports Hugging Face's
`kernels` package (a dependency of it). `install()` adds a meta-path finder that sends top-level imports
of these names past the checkout's root to the installed package (where none is installed, the search
goes on as usual). Imported by `tests/conftest.py` and `tests/real_models/export.py`."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


class _InstalledOverCheckout(importlib.abc.MetaPathFinder):
    NAMES = frozenset({"kernels", "targets"})

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is not None or fullname not in self.NAMES:
            return None
        elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
        return importlib.machinery.PathFinder.find_spec(fullname, elsewhere)


def install() -> None:
    if not any(isinstance(finder, _InstalledOverCheckout) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstalledOverCheckout())
