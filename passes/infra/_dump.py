"""Where `--dump-ir` may write: checked before any work (`PassManager(dump_ir=...)`, `passes run --dump-ir`)."""

from __future__ import annotations

import os
from pathlib import Path

from passes.core.errors import ModelSaveError


def check_dump_folder(folder: str | Path, *, source: str | Path | None = None,
                      output: str | Path | None = None) -> Path:
    """Raise `ModelSaveError` unless `folder` can take IR dumps (checked before any work; nothing is created).
    `output`, the model the run writes, must not be the folder itself."""
    folder = Path(folder)
    try:
        if output is not None and Path(output).resolve() == folder.resolve():
            raise ModelSaveError(f"--dump-ir {folder}: the same path as the output model; choose another folder")
        if folder.exists() and not folder.is_dir():
            raise ModelSaveError(f"--dump-ir {folder}: exists and is not a folder")
        if source is not None and folder.resolve() == Path(source).resolve().parent:
            raise ModelSaveError(f"--dump-ir {folder}: the input model's own folder; choose an empty one")
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ModelSaveError(f"--dump-ir {folder}: '{existing}' is not a writable folder")
    except OSError as err:
        raise ModelSaveError(f"--dump-ir {folder}: {err.strerror or err}") from err
    return folder
