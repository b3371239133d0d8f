"""What every subcommand shares: one-line errors with exit status 2, and the stderr console.

No heavy imports here: this module is loaded for ``llmkit --help``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from llmkit.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def debug() -> bool:
    """True when ``LLMKIT_DEBUG`` is set to a non-empty value other than ``0``."""
    return os.environ.get("LLMKIT_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` as one line on stderr and return the Exit to raise."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn a :class:`UserError` into one line on stderr and exit status 2 (SPEC §6).

    Ctrl-C ends with status 130 and one line. With ``LLMKIT_DEBUG=1`` the traceback is shown.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            if debug():
                raise
            raise fail(str(err)) from None
        except KeyboardInterrupt:
            if debug():
                raise
            raise fail("interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, a job scheduler's stop) raises KeyboardInterrupt,
    so it is handled like Ctrl-C: cleanup runs and one ``interrupted`` line is printed."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
