"""Document filters of ``llmkit prepare``, each a named rule set with its published thresholds.

Every filter is a document stage (see :mod:`llmkit.data.clean`), a pure function of one text:
``filter.apply(text) -> (text, None, counts)`` keeps the document (C4 also removes lines from
it), ``(None, reason, counts)`` drops it, the reason naming the rule. Thresholds are
dataclass fields, so a ``prepare.yaml`` can override any of them (:mod:`llmkit.data.config`).
The code is written here from the papers' descriptions; the constants are theirs.

Languages written without spaces between words (Chinese, Japanese, Thai, ...) would lose every
document to rules that count space-separated words. The word-based rule sets (Gopher quality,
Gopher repetition, C4, FineWeb) are therefore *skipped* for documents identified as one of
:data:`NO_SPACE_LANGUAGES`, and the stage counts them in the manifest under
``skipped_by_language``. Language is identified with py3langid (a re-packaging of langid.py,
Lui & Baldwin 2012, whose model ships inside the package: nothing is downloaded).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields
from functools import lru_cache

from llmkit.data.clean import DocumentStage, Outcome

#: Languages whose words are not separated by spaces (ISO 639-1, as py3langid names them).
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my"})

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
#: Terminal punctuation: Latin (C4 §2.2: period, exclamation, question mark, end quote) and
#: the full-width CJK forms.
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", "。", "！", "？", "」", "』")


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
    summed. The first 10,000 characters are enough and keep the cost bounded. Cached for the
    last few texts, so that the language filter and the word-based rules share one call.
    """
    totals: dict[str, float] = {}
    for lang, prob in _identifier().rank(text[:10_000]):
        key = MACROLANGUAGES.get(lang, lang)
        totals[key] = totals.get(key, 0.0) + float(prob)
    lang = max(totals, key=totals.__getitem__)
    return lang, totals[lang]


class _Filter(DocumentStage):
    """Common part of the filters: name, settings for the manifest, the language skip.

    A word-based rule set (``word_based``) keeps a document identified as one of
    :data:`NO_SPACE_LANGUAGES` without looking at it, counting it under
    ``skipped_by_language/<code>``.
    """

    name = "filter"
    #: True for rules that count space-separated words (skipped for NO_SPACE_LANGUAGES).
    word_based = False

    def __post_init__(self) -> None:
        self.count_template = {"skipped_by_language": {}} if self.word_based else {}

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @property
    def skipped_by_language(self) -> Counter:
        """Documents kept unread because of their language, by language (from ``counts``)."""
        return self.count_group("skipped_by_language")

    def _language_skip(self, text: str) -> Outcome | None:
        if self.word_based:
            lang, _ = detect_language(text)
            if lang in NO_SPACE_LANGUAGES:
                return text, None, {f"skipped_by_language/{lang}": 1}
        return None

    def apply(self, text: str) -> Outcome:
        skip = self._language_skip(text)
        if skip is not None:
            return skip
        reason = self.check(text)
        return (text, None, None) if reason is None else (None, reason, None)

    def check(self, text: str) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


# ---------------------------------------------------------------------------------------------
# Length.


@dataclass
class LengthFilter(_Filter):
    """Length bounds in characters (and optionally in words).

    No published thresholds: by default only documents under ``min_chars`` (1) are dropped.
    Word bounds count space-separated words and are skipped for languages without spaces.
    Drop reasons: ``too_short``, ``too_long``, ``too_few_words``, ``too_many_words``.
    """

    min_chars: int = 1
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None

    name = "length"

    def __post_init__(self) -> None:
        self.word_based = self.min_words is not None or self.max_words is not None
        super().__post_init__()

    def apply(self, text: str) -> Outcome:
        if len(text) < self.min_chars:
            return None, "too_short", None
        if self.max_chars is not None and len(text) > self.max_chars:
            return None, "too_long", None
        return super().apply(text) if self.word_based else (text, None, None)

    def check(self, text: str) -> str | None:
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


@dataclass
class GopherQuality(_Filter):
    """Gopher's quality filter (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
    Insights from Training Gopher", appendix A.1.1, "Quality filtering").

    A document is dropped when it has fewer than 50 or more than 100,000 words, a mean word
    length outside [3, 10] characters, a symbol-to-word ratio over 0.1 for ``#`` and for
    ellipses, more than 90% of lines starting with a bullet, more than 30% of lines ending with
    an ellipsis, fewer than 80% of words holding an alphabetic character, or fewer than 2 of
    the stop words *the, be, to, of, and, that, have, with*.
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
    word_based = True

    def check(self, text: str) -> str | None:
        words = _words(text)
        n = len(words)
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
        if sum(bool(_ALPHA.search(w)) for w in words) / n < self.min_alpha_words_ratio:
            return "gopher_alpha_words"
        lowered = {w.lower() for w in words}
        if sum(s in lowered for s in GOPHER_STOP_WORDS) < self.min_stop_words:
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
    word_based = True

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

    def check(self, text: str) -> str | None:
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
# C4 (Raffel et al. 2020, §2.2).

_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.IGNORECASE)
_C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_SENTENCE_END = re.compile(r"[.!?。！？]+[\"'\u201d\u2019」』]?(?=\s|$)")


@dataclass
class C4Filter(_Filter):
    """The C4 line and document rules (Raffel et al. 2020, "Exploring the Limits of Transfer
    Learning with a Unified Text-to-Text Transformer", §2.2).

    Line rules (the lines are removed, the document kept): lines not ending in terminal
    punctuation, lines with fewer than 5 words, lines mentioning "javascript", lines with a
    policy phrase ("terms of use", "privacy policy", "cookie policy", "uses cookies", ...);
    citation markers ``[1]``, ``[citation needed]``, ``[edit]`` are removed. Document rules
    (dropped): "lorem ipsum", a curly bracket ``{``, a word over 1,000 characters, fewer than 3
    sentences in what is left. The paper's list of bad words is not applied (it is not shipped).

    The paper says 3 sentences and 5 words per line (as TFDS's c4 builder); datatrove's
    C4QualityFilter uses 5 and 3 — the paper's values are the defaults here.
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
    word_based = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.count_template = {**self.count_template, "lines_removed": {}}

    @property
    def lines_removed(self) -> Counter:
        """Lines removed by rule (from ``counts``)."""
        return self.count_group("lines_removed")

    def apply(self, text: str) -> Outcome:
        skip = self._language_skip(text)
        if skip is not None:
            return skip
        lowered = text.lower()
        if self.filter_lorem_ipsum and "lorem ipsum" in lowered:
            return None, "c4_lorem_ipsum", None
        if self.filter_curly_bracket and "{" in text:
            return None, "c4_curly_bracket", None
        removed: Counter = Counter()
        kept = []
        for line in text.split("\n"):
            if self.remove_citations:
                line = _CITATION.sub("", line)
            stripped = line.strip()
            if not stripped:
                continue
            low = stripped.lower()
            words = stripped.split()
            if any(len(w) > self.max_word_length for w in words):
                return None, "c4_long_word", _lines_counts(removed)
            if self.filter_no_terminal_punct and not stripped.endswith(TERMINAL_PUNCTUATION):
                removed["no_terminal_punct"] += 1
            elif len(words) < self.min_words_per_line:
                removed["few_words"] += 1
            elif self.filter_javascript and "javascript" in low:
                removed["javascript"] += 1
            elif self.filter_policy and any(p in low for p in _C4_POLICY):
                removed["policy"] += 1
            else:
                kept.append(line)
        out = "\n".join(kept)
        if len(_SENTENCE_END.findall(out)) < self.min_sentences:
            return None, "c4_few_sentences", _lines_counts(removed)
        return out, None, _lines_counts(removed)

    def check(self, text: str) -> str | None:  # pragma: no cover - apply is overridden
        return None


def _lines_counts(removed: Counter) -> dict[str, int] | None:
    return {f"lines_removed/{k}": n for k, n in removed.items()} or None


# ---------------------------------------------------------------------------------------------
# FineWeb (Penedo et al. 2024; datatrove FineWebQualityFilter).


@dataclass
class FineWebFilter(_Filter):
    """FineWeb's own quality rules (Penedo et al. 2024, "The FineWeb Datasets: Decanting the
    Web for the Finest Text Data at Scale", §3.5; datatrove ``FineWebQualityFilter``).

    Dropped when fewer than 12% of lines end in punctuation, more than 67% of lines are
    shorter than 30 characters, the characters of duplicated lines exceed 1% of the document,
    or there are more than 0.3 line breaks per word.
    """

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    name = "fineweb"
    word_based = True

    def check(self, text: str) -> str | None:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if not lines:
            return "fineweb_empty"
        ratio = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
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

    def check(self, text: str) -> str | None:  # pragma: no cover - apply is overridden
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
