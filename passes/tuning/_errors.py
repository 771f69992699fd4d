"""The error a tuning session raises for what its user can fix."""

from __future__ import annotations

from passes.core.errors import PassesError


class TuningError(PassesError):
    """A tuning session cannot start or go on: a target with nothing to measure on, an unreadable
    session folder, a tracker that does not answer."""
