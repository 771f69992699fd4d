"""The error the lowering layer raises; kept free of TVM so callers can catch it without importing TVM."""

from __future__ import annotations

from passes.core.errors import PassesError


class LoweringError(PassesError):
    """A model cannot be lowered, built or run for a target: dynamic inputs, ops TVM cannot import,
    a failed TVM build, or an artifact or feed that does not fit. The message names the input, op,
    node or kernel and what to do."""


def last_line(err: BaseException) -> str:
    """`Type: message` from the informative (last) line of a possibly multi-line TVM error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else 'no message'}"
