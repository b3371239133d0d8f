"""Language identification: keep the documents in the languages asked for (py3langid,
FineWeb's threshold)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from llmkit.data.clean import Outcome
from llmkit.data.filters.base import _Filter

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
