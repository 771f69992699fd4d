"""`passes.targets`: one TOML description per target (a phone SoC's GPU or CPU, or this machine) and their loader.
May import core and infra (pipeline strings are validated); TVM only in `TargetDescription.tvm_target()`.

    from passes.targets import list_targets, load_target
    target = load_target("sd8gen2")          # bundled; "sd8gen2:cpu" selects the SoC's CPU instead
    target = load_target("my/phone.toml")    # a description of your own ("my/phone.toml:cpu" works too)
    if target.has("layer_norm_op"): ...
    target.tvm_target()                      # tvm.target.Target (imports TVM)

A file may hold variants, `[variants.NAME]` tables whose keys replace the file's top-level keys of the
same name whole (tables are not merged); a variant whose device is "cpu" also drops the `[gpu]` table.
Every problem in a file is a `TargetError` of one line naming the file, the key and what is wrong.

Installed as `passes.targets` (setuptools package-dir mapping); never importable as `targets`. Reading a
file needs only `tomllib`; the schema (pydantic) is imported when a target is loaded and TVM only by
`TargetDescription.tvm_target()`, so `import passes` stays fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from passes.core.errors import TargetError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

if TYPE_CHECKING:
    from passes.targets._schema import TargetDescription

__all__ = ["TargetDescription", "list_targets", "load_target"]

BUNDLED_DIR = Path(__file__).resolve().parent
VARIANT_SEPARATOR = ":"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


def list_targets() -> list[str]:
    """Names of the bundled targets and their variants ("sd8gen2", "sd8gen2:cpu", ...), sorted."""
    names: list[str] = []
    for path in sorted(BUNDLED_DIR.glob("*.toml")):
        names.append(path.stem)
        variants = _variant_tables(_read_toml(path), path)
        names.extend(f"{path.stem}{VARIANT_SEPARATOR}{variant}" for variant in variants)
    return sorted(names)


def load_target(spec: str | os.PathLike[str]) -> TargetDescription:
    """Load and validate a target: a bundled name ("sd8gen2", "sd8gen2:cpu") or a path to a .toml file."""
    path, variant = _locate(spec)
    document = _read_toml(path)
    selected, origins = _apply_variant(document, path, variant)
    from passes.targets._schema import build_description

    name = path.stem + (f"{VARIANT_SEPARATOR}{variant}" if variant else "")
    return build_description(selected, name=name, source_path=path, origins=origins)


def __getattr__(name: str) -> Any:
    if name == "TargetDescription":
        from passes.targets._schema import TargetDescription

        return TargetDescription
    raise AttributeError(f"module 'passes.targets' has no attribute {name!r}")


def _locate(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    text = os.fspath(spec)
    if isinstance(spec, os.PathLike) or "/" in text or os.sep in text or ".toml" in text:
        base, separator, variant = text.rpartition(VARIANT_SEPARATOR)
        if separator and base.endswith(".toml") and variant and not re.search(r"[/\\]", variant):
            path, selected = Path(base), variant
        else:
            path, selected = Path(text), None
        if not path.is_file():
            raise TargetError(f"{path}: no such target file")
        return path, selected
    name, separator, variant = text.partition(VARIANT_SEPARATOR)
    path = BUNDLED_DIR / f"{name}.toml"
    if not _NAME.match(name) or not path.is_file():
        raise TargetError(f"unknown target {text!r}; targets: {', '.join(list_targets())} (or a path to a .toml file)")
    if separator and not variant:
        raise TargetError(f"target {text!r}: empty variant name after {VARIANT_SEPARATOR!r}")
    return path, variant or None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise TargetError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise TargetError(f"{path}: not UTF-8 text (a TOML file must be UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        position = _TOML_POSITION.search(message)
        if position is None:
            raise TargetError(f"{path}: invalid TOML: {message}") from None
        where = f"line {position[1]}, column {position[2]}" if position[1] else "end of file"
        raise TargetError(f"{path}: {where}: invalid TOML: {message[: position.start()]}") from None


def _variant_tables(document: Mapping[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    variants = document.get("variants", {})
    if not isinstance(variants, dict):
        raise TargetError(f"{path}: variants: expected tables like [variants.cpu], got {variants!r}")
    for name, table in variants.items():
        if not isinstance(table, dict):
            raise TargetError(f"{path}: variants.{name}: expected a table, got {table!r}")
        if not _NAME.match(name):
            raise TargetError(f"{path}: variants.{name}: a variant name is lower-case letters, digits, '-' and '_'")
        if "variants" in table:
            raise TargetError(f"{path}: variants.{name}.variants: variants do not nest")
    return variants


def _apply_variant(
    document: Mapping[str, Any], path: Path, variant: str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The document with the variant's keys in place of the file's, and which keys the variant gave."""
    variants = _variant_tables(document, path)
    base = {key: value for key, value in document.items() if key != "variants"}
    if variant is None:
        return base, {}
    if variant not in variants:
        known = ", ".join(variants) or "none"
        raise TargetError(f"{path}: target {path.stem!r} has no variant {variant!r} (its variants: {known})")
    table = variants[variant]
    merged = {**base, **table}
    if table.get("device") == "cpu" and "gpu" not in table:
        merged.pop("gpu", None)
    return merged, {key: f"variants.{variant}." for key in table}
