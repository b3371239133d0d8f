"""What every subcommand shares: one-line errors with exit status 2, and the stderr console.

No heavy imports here: this module is loaded for ``llmkit --help``.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import typer
from typer.core import TyperGroup

from llmkit.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


MODEL_CODE_HELP = (
    "Let a model that ships Python code of its own (auto_map in config.json or "
    "tokenizer_config.json) run it. Off: such a model is refused and its code never runs."
)


def threads_option() -> Any:
    """``--threads N``: the same flag, help and default (None: llmkit.runtime decides) on every
    command that runs a model."""
    return typer.Option(
        None,
        "--threads",
        help="CPU threads for torch (default: torch's, fewer on a busy machine).",
        show_default=False,
    )


def trust_remote_code_option(help: str = MODEL_CODE_HELP) -> Any:
    """``--trust-remote-code``: off by default on every command that loads a model (README,
    "What llmkit executes")."""
    return typer.Option(False, "--trust-remote-code", help=help)


def debug() -> bool:
    """True when ``LLMKIT_DEBUG`` is set to a non-empty value other than ``0``."""
    return os.environ.get("LLMKIT_DEBUG", "") not in ("", "0")


#: ``--dtype`` names (llmkit.core.loading reads the same, case-insensitively).
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
_DEVICE = re.compile(r"(auto|cpu|mps|(cuda|xpu)(:\d+)?)")


def check_device_dtype(device: str, dtype: str) -> None:
    """Refuse an unknown ``--device`` or ``--dtype`` name before torch is imported (whether the
    device exists here is checked when the model loads).

    Raises:
        UserError: not ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (or ``xpu``); a dtype
            that is not one of :data:`DTYPES`.
    """
    if not _DEVICE.fullmatch(device):
        raise UserError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps")
    if dtype.lower() not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")


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


def usage_error_line(err: click.UsageError, subcommand: str | None = None) -> str:
    """One line for a Click usage error (unknown option, missing argument, bad choice, a value
    that is not a number...): ``error: <Click's message> — run `llmkit CMD --help```.

    ``subcommand`` names the command when Click's error carries the group's context only."""
    message = " ".join(err.format_message().split()).rstrip(".")
    if message:
        message = message[0].lower() + message[1:]
    ctx = err.ctx
    command = ctx.command_path if ctx is not None and ctx.command_path else "llmkit"
    if subcommand and (ctx is None or ctx.parent is None):
        command = f"{command} {subcommand}"
    return f"error: {message} — run `{command} --help`"


class OneLineErrors(TyperGroup):
    """The ``llmkit`` group: Click's usage errors become one line and exit status 2 (SPEC §6)
    instead of Click's ``Usage:`` block; everything else is Typer's own behaviour."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        argv = kwargs.get("args", args[0] if args else None)
        argv = sys.argv[1:] if argv is None else list(argv)
        subcommand = next((a for a in argv if a in self.commands), None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # bare `llmkit`: the help
            err.show()
            sys.exit(err.exit_code)
        except click.UsageError as err:
            sys.stderr.write(usage_error_line(err, subcommand) + "\n")
            sys.stderr.flush()
            sys.exit(2)
        except click.ClickException as err:
            sys.stderr.write(f"error: {' '.join(err.format_message().split())}\n")
            sys.exit(err.exit_code)
        except click.Abort:
            sys.stderr.write("error: interrupted\n")
            sys.exit(130)
        # Without standalone mode Click returns an Exit's status, or the command's value.
        sys.exit(rv if isinstance(rv, int) else 0)


def utf8_text(text: str, what: str) -> str:
    """``text`` when it is UTF-8 text; a :class:`UserError` naming ``what`` otherwise.

    Python reads command-line arguments (and standard input, in its UTF-8 mode) with
    ``surrogateescape``: a byte that is not UTF-8 becomes a lone surrogate, which the
    tokenizers refuse with a ``TypeError`` traceback deep inside generation or scoring.

    Raises:
        UserError: ``text`` holds such a byte (its position named).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(
            f"{what} is not UTF-8 text (character {err.start + 1} is an undecodable byte)",
            "give the text in UTF-8 (iconv -f YOUR_ENCODING -t UTF-8 converts a file)",
        ) from None
    return text


def stdin_text() -> str:
    """All of standard input, decoded as UTF-8 (strictly).

    Raises:
        UserError: it is not UTF-8 (the byte's offset named).
    """
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return utf8_text(data, "standard input")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"standard input is not UTF-8 text (byte {err.start})",
            "give the text in UTF-8 (iconv -f YOUR_ENCODING -t UTF-8 converts it)",
        ) from None


class Utf8Lines:
    """Standard input read line by line (``readline``, ``isatty``), each line decoded as UTF-8
    strictly: a line that is not UTF-8 is one :class:`UserError`, not a traceback later."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stdin

    def isatty(self) -> bool:
        return self.stream.isatty()

    def readline(self) -> str:
        buffer = getattr(self.stream, "buffer", None)
        if buffer is None:
            return utf8_text(self.stream.readline(), "a line of standard input")
        line = buffer.readline()
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"a line of standard input is not UTF-8 text (byte {err.start} of the line)",
                "type or pipe UTF-8 text",
            ) from None
