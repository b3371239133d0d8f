"""Length bounds in characters and words (no published thresholds)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.data.filters.base import _Filter, _words

# ---------------------------------------------------------------------------------------------
# Length.


@dataclass
class LengthFilter(_Filter):
    """Length bounds in characters (and optionally in words).

    No published thresholds: by default only documents under ``min_chars`` (1) are dropped.
    Word bounds count space-separated words and are skipped for no-space scripts.
    Drop reasons: ``too_short``, ``too_long``, ``too_few_words``, ``too_many_words``.
    """

    min_chars: int = 1
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None

    name = "length"

    def __post_init__(self) -> None:
        self.word_rules = (
            ("too_few_words", "too_many_words")
            if self.min_words is not None or self.max_words is not None
            else ()
        )
        super().__post_init__()

    def check(self, text: str, no_space: bool = False) -> str | None:
        if len(text) < self.min_chars:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        if no_space or not self.word_rules:
            return None
        n = len(_words(text))
        if self.min_words is not None and n < self.min_words:
            return "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return "too_many_words"
        return None
