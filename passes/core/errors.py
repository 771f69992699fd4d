"""Typed exceptions raised by the `passes` library.

Every error a user can cause (a bad file, a bad pipeline string, a bad option) is a subclass of
`PassesError`; the CLI prints its message as one line and exits non-zero. Anything else is a bug.
"""

from __future__ import annotations

import re

#: a name (a run of non-blank characters) longer than this is shortened in the middle in one-line messages
NAME_LIMIT = 120
#: and the whole line never exceeds this many characters
LINE_LIMIT = 400
_LONG_WORD = re.compile(r"\S{%d,}" % (NAME_LIMIT + 1))


def one_line(text: str) -> str:
    """`text` as one bounded terminal line: control characters escaped (a newline in a tensor name
    shows as \\n), names past `NAME_LIMIT` characters shortened in the middle, at most `LINE_LIMIT`."""
    escaped = "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text.strip())
    half = NAME_LIMIT // 2 - 1
    short = _LONG_WORD.sub(lambda m: f"{m.group()[:half]}...{m.group()[-half:]}", escaped)
    return short if len(short) <= LINE_LIMIT else f"{short[:LINE_LIMIT - 3]}..."


class PassesError(Exception):
    """Base class of every error the library raises on purpose."""


class ModelLoadError(PassesError):
    """The input is not a loadable, valid ONNX model (or reaches outside its directory)."""


class ModelSaveError(PassesError):
    """An output could not be written (or would overwrite the input)."""


class PipelineError(PassesError):
    """A pipeline string or pass option is malformed, or names an unknown pass."""


class PassContractError(PassesError):
    """A pass broke its contract: a failed `requires`/`ensures`, or `modified` that lied."""


class PassFailedError(PassesError):
    """A pass raised, or produced a graph that fails the ONNX checker."""


class FixpointError(PassesError):
    """A fixpoint group did not converge within its round limit."""


class VerificationError(PassesError):
    """A numeric comparison could not be run, or found a mismatch beyond tolerance."""


class SampleError(PassesError):
    """An unknown sample model name or invalid sample parameters."""


class TargetError(PassesError):
    """A target description that cannot be found, read or validated, or that TVM refuses."""
