"""This process's resident memory, for the pass manager's garbage-collection policy on heavy models."""

from __future__ import annotations

import os

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def grew(since: int | None, by: int) -> bool:
    """Whether the process grew by `by` bytes since `since` (True when memory cannot be read)."""
    now = resident_bytes()
    return since is None or now is None or now - since >= by
