"""Gopher's repetition filter (Rae et al. 2021, appendix A.1.1 and table A1)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from llmkit.data.filters.base import _Filter, _words


def _ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


@dataclass
class GopherRepetition(_Filter):
    """Gopher's repetition filter (Rae et al. 2021, appendix A.1.1, "Repetition removal" and
    table A1).

    Dropped when duplicate lines exceed 30% of lines or 20% of characters, duplicate
    paragraphs (split on blank lines) 30% of paragraphs or 20% of characters; when the most
    frequent 2-, 3-, 4-gram covers more than 20%, 18%, 16% of the characters of words; when
    the characters in duplicated 5- to 10-grams exceed 15, 14, 13, 12, 11, 10%.

    Deviations from datatrove's ``GopherRepetitionFilter`` (README table): n-grams are of
    space-separated words (datatrove: spaCy tokens, punctuation included); the n-gram shares
    are of the characters of words (datatrove: of the whole text, spaces and newlines
    included); a "most frequent" n-gram counts only when it occurs at least twice (datatrove
    also drops a short text whose single 2-gram is over 20% of it); a duplicated n-gram
    covers every word of each repeat, overlapping repeats included (datatrove skips ahead
    by n after a repeat).

    For no-space scripts the duplicate line and paragraph rules apply, the n-gram rules
    (:data:`word_rules`) are skipped.
    """

    max_duplicate_lines_ratio: float = 0.30
    max_duplicate_lines_chars_ratio: float = 0.20
    max_duplicate_paragraphs_ratio: float = 0.30
    max_duplicate_paragraphs_chars_ratio: float = 0.20
    max_top_ngram_chars_ratio: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicate_ngram_chars_ratio: dict = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    name = "gopher_repetition"
    word_rules = ("gopher_top_ngram", "gopher_duplicate_ngram_chars")

    @staticmethod
    def _duplicates(parts: list[str]) -> tuple[int, int]:
        """(number of parts that repeat an earlier one, their characters)."""
        seen: set[str] = set()
        n = chars = 0
        for p in parts:
            if p in seen:
                n += 1
                chars += len(p)
            else:
                seen.add(p)
        return n, chars

    def check(self, text: str, no_space: bool = False) -> str | None:
        total_chars = max(1, len(text))
        paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
        if paragraphs:
            n, chars = self._duplicates(paragraphs)
            if n / len(paragraphs) > self.max_duplicate_paragraphs_ratio:
                return "gopher_duplicate_paragraphs"
            if chars / total_chars > self.max_duplicate_paragraphs_chars_ratio:
                return "gopher_duplicate_paragraph_chars"
        lines = [line for line in text.split("\n") if line.strip()]
        if lines:
            n, chars = self._duplicates(lines)
            if n / len(lines) > self.max_duplicate_lines_ratio:
                return "gopher_duplicate_lines"
            if chars / total_chars > self.max_duplicate_lines_chars_ratio:
                return "gopher_duplicate_line_chars"
        if no_space:
            return None
        words = _words(text)
        word_chars = sum(len(w) for w in words)
        if not word_chars:
            return None
        for n, limit in sorted(self.max_top_ngram_chars_ratio.items()):
            counts = _ngram_counts(words, int(n))
            if not counts:
                continue
            gram, count = counts.most_common(1)[0]
            if count > 1 and sum(len(w) for w in gram) * count / word_chars > limit:
                return f"gopher_top_{n}gram"
        for n, limit in sorted(self.max_duplicate_ngram_chars_ratio.items()):
            n = int(n)
            if len(words) < n:
                continue
            # characters of words covered by an n-gram that occurs more than once
            seen: set[tuple] = set()
            covered = [False] * len(words)
            for i in range(len(words) - n + 1):
                gram = tuple(words[i : i + n])
                if gram in seen:
                    for j in range(i, i + n):
                        covered[j] = True
                else:
                    seen.add(gram)
            dup = sum(len(w) for w, c in zip(words, covered, strict=True) if c)
            if dup / word_chars > limit:
                return f"gopher_duplicate_{n}gram_chars"
        return None
