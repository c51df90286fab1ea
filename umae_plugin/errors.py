"""The errors a user fixes without reading a traceback. Every entry point (the three scripts, the
launcher, the analysis tools, the quick start) prints them as one line `error: ...` naming the
file or flag and the cause, and exits with `exit_code`: 2 for usage errors (a flag or a
combination of flags that cannot work, as argparse), 1 for runtime errors (a file that cannot be
read or written, a device that is not there, a loss that diverged). `UMAE_DEBUG=1` shows the
traceback as well.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A runtime error with a one-line message naming the file or flag and the cause (exit 1)."""

    exit_code = 1


class UsageError(UserError, ValueError):
    """A flag value or combination of flags that cannot work (exit 2, as argparse)."""

    exit_code = 2


DEBUG_ENV = "UMAE_DEBUG"  # set to 1: the entry points print the traceback before the one line
INTERRUPTED = 130  # exit status after Ctrl-C, as a shell reports SIGINT
MAX_DETAILS = 4  # detail lines of a multi-line message kept on the one line


def debug() -> bool:
    """`UMAE_DEBUG` is set to something other than '', '0' or 'false'."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: object, max_details: int = MAX_DETAILS) -> str:
    """A message on one line: the first line (what names the problem), then at most `max_details`
    of the following lines, each with its runs of spaces collapsed, joined by '; '."""
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    head, details = lines[0], lines[1:]
    if not details or max_details <= 0:
        return head
    shown = "; ".join(details[:max_details])
    if len(details) > max_details:
        shown += f"; ... {len(details) - max_details} more ({DEBUG_ENV}=1 shows all)"
    return f"{head}{' ' if head.endswith((':', '.', '!', '?')) else '; '}{shown}"


def describe(err: BaseException) -> str | None:
    """The one-line message of an error the user fixes: a `UserError` (its message) or an
    `OSError` (`<filename>: <strerror>`, e.g. a log file that cannot be written); None for
    anything else, which is a bug and keeps its traceback."""
    if isinstance(err, UserError):
        return one_line(err) or type(err).__name__
    if isinstance(err, OSError):
        cause = err.strerror or one_line(err) or type(err).__name__
        if err.filename is None:
            return cause
        where = _name(err.filename) + (f" -> {_name(err.filename2)}" if err.filename2 is not None else "")
        return f"{where}: {cause}"
    return None


def _name(filename: object) -> str:
    return os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)


def exit_code(err: BaseException) -> int:
    """The exit status an error ends a command with: its `exit_code` (2 usage, 1 runtime), 1 for an
    `OSError`, 130 for Ctrl-C."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    return int(getattr(err, "exit_code", 1))


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Every entry point's `__main__` runs inside this. A `UserError` or an `OSError` prints
    `error: <one line>` on stderr and exits with `exit_code(err)` (2 usage, 1 runtime); Ctrl-C
    exits with 130, without a traceback; with `UMAE_DEBUG=1` the traceback is printed first.
    Anything else (a bug) propagates with its traceback; `SystemExit` (argparse's usage errors,
    status 2) passes through."""
    try:
        yield
    except KeyboardInterrupt:
        if debug():
            traceback.print_exc()
        _flush()
        raise SystemExit(INTERRUPTED) from None
    except (UserError, OSError) as err:
        if debug():
            traceback.print_exc()
        _flush()
        print(f"error: {describe(err)}", file=sys.stderr, flush=True)
        raise SystemExit(exit_code(err)) from None


def exit_on_error(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` inside `one_line_errors()`."""
    with one_line_errors():
        return fn(*args, **kwargs)


def _flush() -> None:
    """Whatever was printed or logged so far comes before the error line."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
