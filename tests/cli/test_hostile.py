"""Hostile and unusual input: every case of `hostile.cases(SEED)` through the CLI, in-process.

For every case, in a fresh folder (also the working directory), the CLI must:
  - exit with one of the codes the case allows: 0 with a correct output (`opt`: the output loads with
    onnx and passes the checker), 1 for a `verify` mismatch where that is right, or 2 with exactly one
    stderr line `error: ...` (no control characters, at most MAX_ERROR_LINE characters);
  - never exit 70 (internal error) nor print a traceback;
  - leave every file that was there untouched (the input model and its external data included), and
    create nothing but the case's outputs, and only on success (a failing command leaves no file, no
    folder, not even an empty output folder).
stderr is captured at the file-descriptor level (capfd): what a user's terminal would show.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import os
import stat
from pathlib import Path

import onnx
import pytest

from passes.cli import main
from tests.cli.hostile import FAMILIES, Case, cases

SEED = 0
MAX_ERROR_LINE = 400
MIN_CASES = 500
EXIT_INTERNAL = 70

CORPUS = cases(SEED)
FAST = [case for case in CORPUS if not case.slow]
SLOW = [case for case in CORPUS if case.slow]

Entry = tuple[str, int, str]  # kind, permission bits, digest or link target


def _snapshot(root: Path) -> dict[str, Entry]:
    """Every path under `root` (symlinks not followed): its kind, mode and content hash or link target."""
    entries: dict[str, Entry] = {}

    def walk(folder: Path) -> None:
        with os.scandir(folder) as listing:
            for item in listing:
                relative = Path(item.path).relative_to(root).as_posix()
                info = item.stat(follow_symlinks=False)
                mode = stat.S_IMODE(info.st_mode)
                if item.is_symlink():
                    entries[relative] = ("link", 0, os.readlink(item.path))
                elif item.is_dir(follow_symlinks=False):
                    entries[relative] = ("dir", mode, "")
                    walk(Path(item.path))
                elif item.is_file(follow_symlinks=False):
                    entries[relative] = ("file", mode, hashlib.sha256(Path(item.path).read_bytes()).hexdigest())
                else:
                    entries[relative] = ("other", mode, str(stat.S_IFMT(info.st_mode)))

    walk(root)
    return entries


def _allowed(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _file_changes(before: dict[str, Entry], after: dict[str, Entry], code: int, outputs: tuple[str, ...]) -> list[str]:
    """What changed that should not have: anything after a failure; outside the outputs after success."""
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if code == 0:
        changed = [p for p in changed if not _allowed(p, outputs)]
    problems = []
    for path in changed:
        if path not in after:
            problems.append(f"removed {path!r}")
        elif path not in before:
            problems.append(f"left behind {path!r} ({after[path][0]})")
        else:
            problems.append(f"changed {path!r}")
    return problems


def _error_line_problems(err: str) -> list[str]:
    lines = err.splitlines()
    if len(lines) != 1 or not err.endswith("\n"):
        return [f"stderr is {len(lines)} lines, expected exactly one `error:` line"]
    line = lines[0]
    problems = []
    if not line.startswith("error: "):
        problems.append("the stderr line does not start with 'error: '")
    if not line.isprintable():
        problems.append("control characters in the error line")
    if len(line) > MAX_ERROR_LINE:
        problems.append(f"error line of {len(line)} characters (> {MAX_ERROR_LINE})")
    return problems


def _output_problems(argv: list[str], folder: Path) -> list[str]:
    """After `opt` exits 0: its -o output loads with onnx and passes the checker."""
    if argv[0] != "opt" or "-o" not in argv:
        return []
    output = Path(argv[argv.index("-o") + 1])
    output = output if output.is_absolute() else folder / output
    try:
        model = onnx.load_model(str(output))
        onnx.checker.check_model(model)
    except Exception as err:  # noqa: BLE001 - any failure to load or check is the finding
        return [f"output {output.name!r} is not a valid model: {type(err).__name__}: {str(err)[:200]}"]
    return []


def _short(text: str, limit: int = 300) -> str:
    text = repr(text)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def _check(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    monkeypatch.chdir(folder)  # a stray relative write lands where the snapshot sees it
    argv = case.setup(folder)
    before = _snapshot(folder)
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    after = _snapshot(folder)

    problems = []
    if code == EXIT_INTERNAL or "internal error" in err:
        problems.append(f"internal error (exit {code})")
    if "Traceback" in out or "Traceback" in err:
        problems.append("a traceback was printed")
    if code not in case.exits:
        problems.append(f"exit {code}, expected one of {sorted(case.exits)}")
    if code == 2:
        problems += _error_line_problems(err)
    problems += _file_changes(before, after, code, case.outputs)
    if code == 0:
        problems += _output_problems(argv, folder)
    assert not problems, (
        f"{case.id}: " + "; ".join(problems)
        + f"\n  argv:   {_short(' '.join(argv))}\n  exit:   {code}\n  stderr: {_short(err, 600)}"
    )


@pytest.mark.parametrize("case", FAST, ids=[case.id for case in FAST])
def test_hostile_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capfd: pytest.CaptureFixture[str]) -> None:
    _check(case, tmp_path, monkeypatch, capfd)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[case.id for case in SLOW])
def test_hostile_run(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capfd: pytest.CaptureFixture[str]) -> None:
    """`passes run` fails before building: no OUT folder, nothing else left behind."""
    _check(case, tmp_path, monkeypatch, capfd)


def test_corpus_covers_every_family() -> None:
    counts = collections.Counter(case.family for case in CORPUS)
    assert len(CORPUS) >= MIN_CASES, f"only {len(CORPUS)} hostile cases"
    assert not set(FAMILIES) - set(counts), f"families without a case: {sorted(set(FAMILIES) - set(counts))}"
    assert not set(counts) - set(FAMILIES), f"cases of unlisted families: {sorted(set(counts) - set(FAMILIES))}"
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    assert all(case.family == "run" for case in SLOW) and len(SLOW) <= 10
    assert [case.id for case in cases(SEED)] == [case.id for case in CORPUS], "the corpus is not deterministic"
    assert [case.id for case in cases(SEED + 1)] != [case.id for case in CORPUS], "the seed changes nothing"
