"""Document filters of ``llmkit prepare``, each a named rule set with its published thresholds.

Every filter is a document stage (see :mod:`llmkit.data.clean`), a pure function of one text:
``filter.apply(text) -> (text, None, counts)`` keeps the document (C4 also removes lines from
it), ``(None, reason, counts)`` drops it, the reason naming the rule. Thresholds are
dataclass fields, so a ``prepare.yaml`` can override any of them (:mod:`llmkit.data.config`).
The code is written here from the papers and their reference implementations (named on each
class: the Gopher paper, TFDS ``c4_utils`` for C4, datatrove for FineWeb); the constants are
theirs. Where llmkit departs from datatrove on purpose the class docstring says so, and
``tests/test_peer_datatrove.py`` runs both on the same real documents and checks that every
disagreement is one of the documented deviations (the table is in the README).

Scripts written without spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Myanmar)
would lose every document to rules that count space-separated words. Those rules, and only
those, are skipped for a document whose letters are mostly in such a script
(:func:`no_space_script`, a script test on the characters, not a language guess: "Yup..." or an
all-caps English SMS is Latin whatever a language identifier says). The other rules of the
same rule set (duplicate lines, curly brackets, line punctuation, ...) still apply. The manifest
counts, per rule set, the documents in such scripts (``no_space_script_documents``) and how many
documents each rule was skipped for (``rules_skipped``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields
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


# ---------------------------------------------------------------------------------------------
# Language identification.


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


#: Varieties py3langid tells apart that are one macrolanguage (ISO 639-3): Cantonese (yue) and
#: Wu (wuu) are Chinese (zh). py3langid spreads classical Chinese over zh, yue and wuu (the
#: novel in gutenberg_zh: 3,459 paragraphs zh, 215 yue, 19 wuu), so their probabilities add up.
MACROLANGUAGES = {"yue": "zh", "wuu": "zh", "uzs": "uz", "ary": "ar", "arz": "ar"}


@lru_cache(maxsize=8)
def detect_language(text: str) -> tuple[str, float]:
    """``(language, probability)`` of ``text`` by py3langid (ISO 639 codes, 140 languages).

    Varieties of one macrolanguage are merged (:data:`MACROLANGUAGES`), their probabilities
    summed. The first 10,000 characters are enough and keep the cost bounded. Used by the
    language filter only (the word-rule skip looks at scripts, :func:`no_space_script`).
    """
    totals: dict[str, float] = {}
    for lang, prob in _identifier().rank(text[:10_000]):
        key = MACROLANGUAGES.get(lang, lang)
        totals[key] = totals.get(key, 0.0) + float(prob)
    lang = max(totals, key=totals.__getitem__)
    return lang, totals[lang]


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


# ---------------------------------------------------------------------------------------------
# Gopher (Rae et al. 2021, appendix A.1.1).

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_BULLETS = ("\u2022", "\u2023", "\u25e6", "\u2043", "\u2219", "-", "*", "\u25cf", "\u25aa")
#: Punctuation and symbols around a word ("and," "(the" "that..."), Unicode categories P* and S*.
_EDGE_PUNCT = regex.compile(r"^[\p{P}\p{S}]+|[\p{P}\p{S}]+$")


def strip_punctuation(word: str) -> str:
    """``word`` without the punctuation and symbols at its ends (``"and,"`` -> ``"and"``)."""
    return _EDGE_PUNCT.sub("", word)


@dataclass
class GopherQuality(_Filter):
    """Gopher's quality filter (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
    Insights from Training Gopher", appendix A.1.1, "Quality filtering").

    A document is dropped when it has fewer than 50 or more than 100,000 words, a mean word
    length outside [3, 10] characters, a symbol-to-word ratio over 0.1 for ``#`` and for
    ellipses, more than 90% of lines starting with a bullet, more than 30% of lines ending with
    an ellipsis, fewer than 80% of words holding an alphabetic character, or fewer than 2 of
    the stop words *the, be, to, of, and, that, have, with*.

    Words are the space-separated words of the paper; a stop word is matched on the word with
    its punctuation stripped and in lower case (``"and,"`` and ``"The"`` count). Deviations
    from datatrove's ``GopherQualityFilter`` (which splits words with spaCy, punctuation marks
    becoming words of their own, and matches stop words case-sensitively): the word counts and
    the mean word length are over space-separated words, the alphabetic share too (datatrove
    counts every punctuation token as a word without a letter, so ordinary prose with many
    commas falls under 80% there); bullets are the common bullet characters and ``-``/``*`` on
    non-blank lines (datatrove: ``•`` and ``-`` over all lines, blank ones included). The
    lines rules and the stop words are listed in the README's deviations table with the counts
    measured on real documents.

    For no-space scripts only the bullet and ellipsis line rules apply (:data:`word_rules`).
    """

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2

    name = "gopher_quality"
    word_rules = (
        "gopher_min_words",
        "gopher_max_words",
        "gopher_mean_word_length",
        "gopher_hash_ratio",
        "gopher_ellipsis_ratio",
        "gopher_alpha_words",
        "gopher_stop_words",
    )

    def check(self, text: str, no_space: bool = False) -> str | None:
        words = [] if no_space else _words(text)
        n = len(words)
        if not no_space:
            if n < self.min_words:
                return "gopher_min_words"
            if n > self.max_words:
                return "gopher_max_words"
            mean = sum(len(w) for w in words) / n
            if mean < self.min_mean_word_length:
                return "gopher_short_mean_word_length"
            if mean > self.max_mean_word_length:
                return "gopher_long_mean_word_length"
            if text.count("#") / n > self.max_symbol_word_ratio:
                return "gopher_hash_ratio"
            if (text.count("...") + text.count("\u2026")) / n > self.max_symbol_word_ratio:
                return "gopher_ellipsis_ratio"
        lines = [line for line in text.split("\n") if line.strip()]
        if lines:
            bullets = sum(line.lstrip().startswith(_BULLETS) for line in lines)
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return "gopher_bullet_lines"
            ellipsis = sum(line.rstrip().endswith(("...", "\u2026")) for line in lines)
            if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
                return "gopher_ellipsis_lines"
        if no_space:
            return None
        if sum(bool(_ALPHA.search(w)) for w in words) / n < self.min_alpha_words_ratio:
            return "gopher_alpha_words"
        bare = {strip_punctuation(w).lower() for w in words}
        if sum(s in bare for s in GOPHER_STOP_WORDS) < self.min_stop_words:
            return "gopher_stop_words"
        return None


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


# ---------------------------------------------------------------------------------------------
# C4 (Raffel et al. 2020, §2.2; TFDS c4_utils.clean_page).

#: Policy phrases whose lines are removed (TFDS ``c4_utils._POLICY_SUBSTRINGS``).
C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
#: Line end marks (TFDS ``c4_utils._END_MARKS``: period, question and exclamation marks, the
#: double quote; the paper's "terminal punctuation mark"). No single quote (datatrove adds it).
C4_END_MARKS = (".", "?", "!", '"')
#: Added for documents in no-space scripts, whose sentences end in full-width marks.
C4_CJK_END_MARKS = ("\u3002", "\uff01", "\uff1f", "\u300d", "\u300f")
#: Wikipedia-style citation markers removed from lines (TFDS ``get_clean_page_fn``).
_C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")

#: Abbreviations whose period does not end a sentence (lower case, without the final period).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx inc ltd co corp bros no nos "
    "vol vols fig figs pp ed eds rev gen col lt capt sgt gov sen rep dept univ est jan feb mar "
    "apr jun jul aug sep sept oct nov dec a.m p.m u.s u.k".split()
)
_MARK_RUN = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")
_NEXT_STARTS_SENTENCE = re.compile(r"\s+[\"'\u201c\u2018(\[]*[A-Z0-9]")
_CJK_SENTENCE = re.compile(r"[\u3002\uff01\uff1f!?]+[\u300d\u300f\"']*")


def count_sentences(line: str, no_space: bool = False) -> int:
    """Sentences in one line (0 for a blank line), for C4's 3-sentence rule.

    TFDS counts them with NLTK's English punkt model, which cannot be downloaded here; this
    is a rule-based stand-in with punkt's main behaviours: a sentence ends at ``!`` or ``?``
    followed by a space, and at ``.`` (closing quotes and brackets may follow) when the next
    word starts with a capital letter, a digit or an opening quote; not at an ellipsis
    (``...``), nor after an abbreviation (:data:`ABBREVIATIONS`) or a single-letter initial.
    The end of the line closes the last sentence. For no-space scripts each run of
    ``。！？`` ends a sentence.
    """
    line = line.strip()
    if not line:
        return 0
    if no_space:
        inner = sum(1 for m in _CJK_SENTENCE.finditer(line) if m.end() < len(line))
        return 1 + inner
    breaks = 0
    for m in _MARK_RUN.finditer(line):
        marks = m.group(0).rstrip("\"'\u201d\u2019)]")
        if ".." in marks:
            continue  # an ellipsis
        if "!" in marks or "?" in marks:
            breaks += 1  # as punkt: always a sentence end before a space
            continue
        if not _NEXT_STARTS_SENTENCE.match(line, m.end()):
            continue
        if marks == ".":
            start = line.rfind(" ", 0, m.start()) + 1
            before = line[start : m.start()].lstrip("\"'\u201c\u2018([").lower()
            if before in ABBREVIATIONS or (len(before) == 1 and before.isalpha()):
                continue
        breaks += 1
    return 1 + breaks


@dataclass
class C4Filter(_Filter):
    """The C4 line and page rules as TFDS's reference implementation applies them
    (``tensorflow_datasets/text/c4_utils.py``, ``clean_page``; Raffel et al. 2020, "Exploring
    the Limits of Transfer Learning with a Unified Text-to-Text Transformer", §2.2).

    Each line is stripped, then removed when (in this order) it holds a word over 1,000
    characters, does not end in ``. ? ! "`` (citation markers ``[1]``, ``[]``, ``[edit]``,
    ``[citation needed]`` removed first) or ends in ``...``, has fewer than 5 words, mentions
    "javascript", or holds a policy phrase (:data:`C4_POLICY`). A kept line holding "lorem
    ipsum" or a curly bracket ``{`` drops the page. The page is dropped when its kept lines
    hold fewer than 3 sentences (:func:`count_sentences`); otherwise it becomes its kept lines.
    The list of bad words is not applied (it is not shipped).

    Paper and reference differ, and llmkit follows the reference: the paper drops "any page
    that contained a curly bracket" and any page with "lorem ipsum"; TFDS (and datatrove)
    look only at lines that passed the line rules before, so a ``{`` in a menu line without
    punctuation does not drop the page. The paper does not mention long words or ellipses.
    Deviations from datatrove's ``C4QualityFilter`` (README table): its defaults are 5
    sentences and 3 words per line (the paper and TFDS: 3 and 5, used here); it also takes
    ``'`` as an end mark; it counts sentences with spaCy's sentencizer, TFDS with punkt, here
    :func:`count_sentences`.

    For no-space scripts the long-word and words-per-line rules are skipped (a Chinese
    paragraph is one "word"), the full-width end marks :data:`C4_CJK_END_MARKS` are accepted
    and sentences end at ``。！？``; the other rules apply.
    """

    min_words_per_line: int = 5
    min_sentences: int = 3
    max_word_length: int = 1000
    filter_no_terminal_punct: bool = True
    filter_javascript: bool = True
    filter_policy: bool = True
    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True
    remove_citations: bool = True

    name = "c4"
    word_rules = ("c4_long_word", "c4_few_words")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.count_template = {**self.count_template, "lines_removed": {}}

    @property
    def lines_removed(self) -> Counter:
        """Lines removed by rule (from ``counts``)."""
        return self.count_group("lines_removed")

    def apply(self, text: str) -> Outcome:
        no_space, counts = self._skip_counts(text)
        counts = dict(counts or {})
        removed: Counter = Counter()
        marks = C4_END_MARKS + C4_CJK_END_MARKS if no_space else C4_END_MARKS
        kept = []
        sentences = 0
        reason = None
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if not no_space and any(len(w) > self.max_word_length for w in line.split()):
                removed["long_word"] += 1
                continue
            if self.remove_citations:
                line = _C4_CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(marks) or line.endswith("...")):
                removed["no_terminal_punct"] += 1
                continue
            if not no_space and len(line.split()) < self.min_words_per_line:
                removed["few_words"] += 1
                continue
            low = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                reason = "c4_lorem_ipsum"
                break
            if self.filter_javascript and "javascript" in low:
                removed["javascript"] += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                reason = "c4_curly_bracket"
                break
            if self.filter_policy and any(p in low for p in C4_POLICY):
                removed["policy"] += 1
                continue
            sentences += count_sentences(line, no_space)
            kept.append(line)
        counts.update({f"lines_removed/{k}": n for k, n in removed.items()})
        if reason is None and sentences < self.min_sentences:
            reason = "c4_few_sentences"
        if reason is not None:
            return None, reason, counts or None
        return "\n".join(kept).strip(), None, counts or None

    def check(self, text: str, no_space: bool = False) -> str | None:  # pragma: no cover
        return None


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


# ---------------------------------------------------------------------------------------------
# Language identification.


@dataclass
class LanguageFilter(_Filter):
    """Keep documents whose identified language is in ``languages`` with a probability of at
    least ``min_score``.

    The threshold 0.65 is FineWeb's (Penedo et al. 2024, §3.3, fastText language score for
    English); here the probability is py3langid's normalised one. The manifest counts the kept
    documents by language (``languages_kept``). Drop reasons: ``language:<code>`` (another
    language), ``low_language_score``.
    """

    languages: list = field(default_factory=lambda: ["en"])
    min_score: float = 0.65

    name = "language"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.count_template = {"languages_kept": {}}

    @property
    def kept_by_language(self) -> Counter:
        """Documents kept, by language (from ``counts``)."""
        return self.count_group("languages_kept")

    def apply(self, text: str) -> Outcome:
        lang, score = detect_language(text)
        if lang not in self.languages:
            return None, f"language:{lang}", None
        if score < self.min_score:
            return None, "low_language_score", None
        return text, None, {f"languages_kept/{lang}": 1}

    def check(self, text: str, no_space: bool = False) -> str | None:  # pragma: no cover
        return None


#: Filters by name, in the order they run.
FILTERS = {
    "length": LengthFilter,
    "language": LanguageFilter,
    "gopher_quality": GopherQuality,
    "gopher_repetition": GopherRepetition,
    "c4": C4Filter,
    "fineweb": FineWebFilter,
}
