"""Project Gutenberg boilerplate: the rule ``gutenberg`` strips the header and license footer.

A Project Gutenberg eBook opens with a header (title, credits, terms of use) ended by a line
``*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***`` and closes with a line
``*** END OF THE PROJECT GUTENBERG EBOOK <TITLE> ***`` followed by the license (about 18 KB).
Older files say ``*** START OF THIS PROJECT GUTENBERG EBOOK``, or end with a bare line
``End of Project Gutenberg's <Title>, by <Author>`` (the Chinese novel in gutenberg_zh).

The rule works on the lines of a text file before it is cut into documents: the lines up to
and including a START marker found in the first :data:`HEADER_LINES` lines are removed, and so
are the END marker line and everything after it. A file without markers passes unchanged. The
lines removed are counted per file (``gutenberg_lines_removed`` in the manifest's input entry).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

HEADER_LINES = 400
START = re.compile(r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK", re.IGNORECASE)
END = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK"
    r"|End of (?:the )?Project Gutenberg(?:'s|\u2019s)? )",
    re.IGNORECASE,
)


def strip_gutenberg(lines: Iterable[str], source=None) -> Iterator[str]:
    """The lines between the START and END markers (all lines when there is no marker).

    ``source.removed_lines`` (an :class:`~llmkit.data.readers.InputFile`) counts what was cut.
    """
    removed = 0
    head: list[str] = []
    it = iter(lines)
    started = False
    for line in it:
        head.append(line)
        if START.match(line):
            removed += len(head)
            head = []
            started = True
            break
        if len(head) >= HEADER_LINES:
            break
    pending = iter(head) if not started else iter(())
    for stream in (pending, it):
        for line in stream:
            if END.match(line):
                removed += 1 + sum(1 for _ in it)
                if source is not None:
                    source.removed_lines["gutenberg"] += removed
                return
            yield line
    if source is not None and removed:
        source.removed_lines["gutenberg"] += removed
