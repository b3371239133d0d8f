"""The rich console llmkit prints through: rich's own on a terminal; unwrapped when the output
goes to a file or a pipe.

Off a terminal rich lays everything out for 80 columns (or ``$COLUMNS``): a longer line —
``train --dry-run``'s memory line, the ``done:`` line of a run, a wide table — is cut into
pieces at 80 columns, and a log or a ``grep`` then sees half lines. :func:`make_console`
gives such a console a width no line of llmkit reaches and ``soft_wrap`` (a printed line is
never broken), so each line stays one line. ``$COLUMNS``, when set, is still honoured.
"""

from __future__ import annotations

import os
from typing import Any

#: The width of a console that is not a terminal (and has no ``$COLUMNS``): wider than any
#: line or table llmkit prints, so nothing is wrapped or squeezed (a table keeps its natural
#: width; rules and bars are not drawn off a terminal).
PIPE_WIDTH = 10_000


def make_console(*, stderr: bool = False) -> Any:
    """A ``rich.console.Console`` on stdout (or stderr): rich's default on a terminal or with
    ``$COLUMNS`` set; otherwise :data:`PIPE_WIDTH` columns and ``soft_wrap`` on."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)
