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
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message
