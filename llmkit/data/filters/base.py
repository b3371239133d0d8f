"""The common part of the filters: words, scripts without spaces between words, line
ends, and :class:`_Filter` (a rule set's name, settings for the manifest and the
no-space-script skip). See the package docstring, :mod:`llmkit.data.filters`."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import fields
from functools import lru_cache

import regex

from llmkit.data.clean import DocumentStage, Outcome

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")

# ---------------------------------------------------------------------------------------------
# Scripts without spaces between words.

#: Unicode scripts whose words are not separated by spaces (Unicode Standard Annex #24 names).
NO_SPACE_SCRIPTS = ("Han", "Hiragana", "Katakana", "Thai", "Lao", "Khmer", "Myanmar")
_NO_SPACE_CHAR = regex.compile("[" + "".join(rf"\p{{{s}}}" for s in NO_SPACE_SCRIPTS) + "]")
_LETTER = regex.compile(r"\p{L}")
#: A document is in a no-space script when at least this share of its letters are in one of
#: :data:`NO_SPACE_SCRIPTS`. A majority of letters: a Chinese chapter is about 100% Han, an
#: English page quoting a Chinese name a few percent, Japanese with Latin brand names mostly
#: kana and kanji. The first 10,000 characters decide.
NO_SPACE_SCRIPT_SHARE = 0.5


@lru_cache(maxsize=8)
def no_space_script_share(text: str) -> float:
    """Share of the letters (Unicode category L) of ``text`` (first 10,000 characters) that are
    in a script written without spaces (:data:`NO_SPACE_SCRIPTS`); 0.0 when it has no letter."""
    head = text[:10_000]
    letters = len(_LETTER.findall(head))
    return len(_NO_SPACE_CHAR.findall(head)) / letters if letters else 0.0


def no_space_script(text: str) -> bool:
    """True when ``text`` is written in a script without spaces between words (its share of
    such letters is at least :data:`NO_SPACE_SCRIPT_SHARE`)."""
    return no_space_script_share(text) >= NO_SPACE_SCRIPT_SHARE


#: Sentence-terminal characters: the Unicode property Sentence_Terminal (UAX #29; ``. ! ?``,
#: ``。 ！ ？``, the Devanagari danda, ...), as datatrove's ``TERMINAL_PUNCTUATION`` that
#: FineWeb's line rule uses. A quotation mark is not one: ``"Home"`` does not end in
#: punctuation. Closing quotes and brackets *after* a terminal mark are looked through
#: (``...itchy."`` ends a sentence), where datatrove looks at the last character only.
_STERM_END = regex.compile(r"\p{Sentence_Terminal}[\p{Pf}\p{Pe}\"']*$")


def ends_with_terminal_punctuation(line: str) -> bool:
    """True when ``line`` ends in a Unicode Sentence_Terminal character, possibly followed by
    closing quotes or brackets (``."``, ``?)``, ``。」``); a quote alone does not count."""
    return _STERM_END.search(line) is not None


class _Filter(DocumentStage):
    """Common part of the filters: name, settings for the manifest, the no-space-script skip.

    ``word_rules`` names the rules of the set that count space-separated words: for a
    document in a no-space script (:func:`no_space_script`) :meth:`check` is called with
    ``no_space=True`` and must skip them; the manifest counts ``no_space_script_documents``
    and ``rules_skipped/<rule>`` (one per document per rule skipped).
    """

    name = "filter"
    #: The rules of this set that count space-separated words (skipped for no-space scripts).
    word_rules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.count_template = (
            {"no_space_script_documents": 0, "rules_skipped": {}} if self.word_rules else {}
        )

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @property
    def rules_skipped(self) -> Counter:
        """Documents each word rule was skipped for (from ``counts``)."""
        return self.count_group("rules_skipped")

    def _skip_counts(self, text: str) -> tuple[bool, dict[str, int] | None]:
        if not self.word_rules or not no_space_script(text):
            return False, None
        counts = {f"rules_skipped/{r}": 1 for r in self.word_rules}
        counts["no_space_script_documents"] = 1
        return True, counts

    def apply(self, text: str) -> Outcome:
        no_space, counts = self._skip_counts(text)
        reason = self.check(text, no_space=no_space)
        return (text, None, counts) if reason is None else (None, reason, counts)

    def check(self, text: str, no_space: bool = False) -> str | None:  # pragma: no cover
        raise NotImplementedError


def _words(text: str) -> list[str]:
    return _WORD.findall(text)
