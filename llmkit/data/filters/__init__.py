"""Document filters of ``llmkit prepare``, each a named rule set with its published thresholds,
one rule set per module (``length``, ``language``, ``gopher_quality``, ``gopher_repetition``,
``c4``, ``fineweb``; their common part in ``base``).

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

from llmkit.data.filters.base import (  # noqa: F401
    NO_SPACE_SCRIPT_SHARE,
    NO_SPACE_SCRIPTS,
    _Filter,
    ends_with_terminal_punctuation,
    no_space_script,
    no_space_script_share,
)
from llmkit.data.filters.c4 import (  # noqa: F401
    ABBREVIATIONS,
    C4_CJK_END_MARKS,
    C4_END_MARKS,
    C4_POLICY,
    C4Filter,
    count_sentences,
)
from llmkit.data.filters.fineweb import FineWebFilter
from llmkit.data.filters.gopher_quality import (  # noqa: F401
    GOPHER_STOP_WORDS,
    GopherQuality,
    strip_punctuation,
)
from llmkit.data.filters.gopher_repetition import GopherRepetition
from llmkit.data.filters.language import MACROLANGUAGES, LanguageFilter, detect_language  # noqa: F401
from llmkit.data.filters.length import LengthFilter

FILTERS = {
    "length": LengthFilter,
    "language": LanguageFilter,
    "gopher_quality": GopherQuality,
    "gopher_repetition": GopherRepetition,
    "c4": C4Filter,
    "fineweb": FineWebFilter,
}
