"""Keep TVM's native messages off the user's terminal: what its C++ passes write to file descriptor 2
(`LOG(WARNING)`, e.g. "Fast mode segfaults when there are out-of-bounds indices" from every `take`)
is captured and handed to `logging` at DEBUG level instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

logger = logging.getLogger("passes.lowering.tvm")


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Redirect fd 2 into a temporary file for the block, then log each line it received."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    logger.debug("%s", line)
