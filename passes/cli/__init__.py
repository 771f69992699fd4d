"""`passes.cli`: the `passes` command line (click) and its rich renderers. The top layer: imports any
part of `passes`; nothing in `passes` imports it."""

from passes.cli._entry import main

__all__ = ["main"]
