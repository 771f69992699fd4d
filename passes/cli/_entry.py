"""The `passes` console entry point: runs the click group and keeps the error contract. A user mistake
is one `error:` line on stderr and exit 2; a verify mismatch exits 1; Ctrl-C exits 130 with one line
(outputs are written atomically, so nothing half-written stays); only a bug of ours exits 70."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence

import click

from passes.cli.main import cli
from passes.core.errors import PassesError, one_line

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class Interrupted(BaseException):
    """SIGINT while a command runs. Not a KeyboardInterrupt: click would print a bare newline for that
    before re-raising it, and the contract is one line."""


def _on_sigint(signum: int, frame: object) -> None:
    raise Interrupted


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: run the CLI, turning library errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if in_main_thread else None
    try:
        return _main(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _main(args: list[str]) -> int:
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="passes", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code or 0)
    except click.ClickException as err:  # usage mistakes: one line too, with where to look
        if debug:
            raise
        if isinstance(err, _NO_ARGS) and err.ctx is not None:  # `passes` alone: the help, then one line
            click.echo(err.ctx.get_help())
            commands = getattr(err.ctx.command, "commands", {})
            _error(f"error: no command given (one of: {', '.join(sorted(commands))})")
            return EXIT_USER_ERROR
        hint = ""
        if isinstance(err, click.UsageError) and err.ctx is not None:
            hint = f" (see '{err.ctx.command_path} --help')"
        _error(f"error: {err.format_message()}{hint}")
        return EXIT_USER_ERROR if err.exit_code in (0, 1) else err.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt, Interrupted):  # Ctrl-C: outputs are atomic, nothing half-written stays
        _error("interrupted: nothing was written")
        return EXIT_INTERRUPTED
    except PassesError as err:
        if debug:
            raise
        _error(f"error: {err}")
        return EXIT_USER_ERROR
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else EXIT_USER_ERROR
    except OSError as err:  # the file system refused (name too long, permissions, a full disk): not a bug of ours
        if debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        _error(f"error: {where}{err.strerror or err}")
        return EXIT_USER_ERROR
    except RecursionError as err:
        if debug:
            raise
        _error(f"error: input nested too deeply to process ({err})")
        return EXIT_USER_ERROR
    except Exception as err:
        if debug:
            raise
        _error(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL
    return 0


#: click >= 8.2 raises this for a group called without a command
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _error(line: str) -> None:
    """One line on stderr, whatever the message holds (newlines and control characters escaped,
    long names shortened)."""
    click.echo(one_line(line), err=True)
