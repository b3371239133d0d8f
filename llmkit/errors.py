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
