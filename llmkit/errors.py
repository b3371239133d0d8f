"""One error type for user mistakes (SPEC §6).

A :class:`UserError` is printed by the CLI as one line, ``error: <message> (<hint>)``, and the
process exits with status 2. Set ``LLMKIT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: bad path, bad config, bad data.

    Args:
        message: what is wrong, naming the file, key or value.
        hint: how to fix it (optional).
        reason: a short fixed code for the kind of mistake (``"missing field"``,
            ``"malformed json"``), for what counts problems by kind — the manifest's skipped
            records — so that rewording ``message`` never changes a count's key. None: the
            error has no code (counters then fall back to their own rule).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, *, reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reason = reason

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message


def require(module: str, message: str, hint: str) -> None:
    """Import an optional dependency, or raise a :class:`UserError` saying how to get it.

    The module is really imported (not only looked up), so an installed but broken package —
    e.g. trafilatura without ``lxml_html_clean`` — also ends in one line, not a traceback.

    Args:
        module: the module to import, e.g. ``"trafilatura"``.
        message: what needs it, e.g. ``"--html needs the trafilatura package"``.
        hint: how to install it.

    Raises:
        UserError: ``message`` plus "which is not installed" or the import's own error.
    """
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == module.split(".")[0]
        detail = "which is not installed" if missing else f"which cannot be imported ({err})"
        raise UserError(f"{message}, {detail}", hint) from None


def json_error_text(err: ValueError | RecursionError, *, line: bool = False) -> str:
    """What a JSON parse error says, for a one-line message: ``"Unterminated string starting
    at column 10"``, ``"Expecting value at line 3, column 1"`` (with ``line``).

    :class:`json.JSONDecodeError`'s ``msg`` sometimes ends with "at" already ("Unterminated
    string starting at", "Invalid control character at"), its position following in ``str``;
    every message llmkit composes from one goes through here, so the position is written once.
    Any other ``ValueError`` (e.g. a ``UnicodeDecodeError``) gives its first line; a
    ``RecursionError`` (``[[[[...`` nested past Python's recursion limit, which ``json.loads``
    raises instead of a ``JSONDecodeError``) says so.

    Args:
        err: the error ``json.loads`` raised.
        line: name the line too (a whole file parsed at once); off for one line of JSON lines,
            whose line number the caller gives.
    """
    if isinstance(err, RecursionError):  # json's C scanner recurses once per nesting level
        return "nested more deeply than the JSON reader allows"
    msg = getattr(err, "msg", None)
    if msg is None or not hasattr(err, "colno"):
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__
    msg = msg.removesuffix(" at")
    where = f"line {err.lineno}, column {err.colno}" if line else f"column {err.colno}"
    return f"{msg} at {where}"
