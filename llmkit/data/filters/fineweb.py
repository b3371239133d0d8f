"""FineWeb's own quality rules (Penedo et al. 2024, §3.5; datatrove's
``FineWebQualityFilter``)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.data.filters.base import _Filter, _words, ends_with_terminal_punctuation

# ---------------------------------------------------------------------------------------------
# FineWeb (Penedo et al. 2024; datatrove FineWebQualityFilter).


@dataclass
class FineWebFilter(_Filter):
    """FineWeb's own quality rules (Penedo et al. 2024, "The FineWeb Datasets: Decanting the
    Web for the Finest Text Data at Scale", §3.5; its reference is datatrove's
    ``FineWebQualityFilter``, followed here rule by rule).

    Over the non-blank lines: dropped when fewer than 12% end in a sentence-terminal
    character (:func:`ends_with_terminal_punctuation`: Unicode Sentence_Terminal, as
    datatrove's ``TERMINAL_PUNCTUATION``; a line ending in a quoted word does not count, one
    ending in ``."`` does), more than
    67% are at most 30 characters long, the characters of lines repeating an earlier line exceed
    1% of the characters of the document (newlines not counted), or there are more than 0.3
    newlines per word. Lines are taken as they are, not stripped, as in datatrove.

    Deviations from datatrove (README table): a terminal mark followed by closing quotes or
    brackets counts (datatrove looks at the last character, so a paragraph of dialogue ending
    in ``."`` has no punctuated line there); words for the newline ratio are space-separated
    (datatrove: spaCy tokens, punctuation marks included, so it finds more words).
    For no-space scripts the newline-per-word rule is skipped; the others apply.
    """

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    name = "fineweb"
    word_rules = ("fineweb_list_ratio",)

    def check(self, text: str, no_space: bool = False) -> str | None:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "fineweb_empty"
        ratio = sum(ends_with_terminal_punctuation(line) for line in lines) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "fineweb_line_punct_ratio"
        short = sum(len(line) <= self.short_line_length for line in lines) / len(lines)
        if short > self.short_line_thr:
            return "fineweb_short_line_ratio"
        seen: set[str] = set()
        dup_chars = 0
        for line in lines:
            if line in seen:
                dup_chars += len(line)
            else:
                seen.add(line)
        if dup_chars / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return "fineweb_char_dup_ratio"
        if no_space:
            return None
        words = _words(text)
        if text.count("\n") / max(1, len(words)) > self.new_line_ratio:
            return "fineweb_list_ratio"
        return None
