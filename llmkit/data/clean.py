"""Document stages of ``llmkit prepare``: normalize and exact de-duplication (SPEC §2).

The filters (:mod:`llmkit.data.filters`), near-duplicate removal (:mod:`llmkit.data.dedup`)
and PII redaction (:mod:`llmkit.data.pii`) are stages of the same protocol.

A stage is a callable ``stage(text) -> (text, None)`` to keep a (possibly changed) document or
``(None, reason)`` to drop it; it has a ``name``. Stages know nothing about files, datasets
or processes, so a chain of them runs the same under a plain loop, a ``datasets`` map or
another executor. :func:`run_stages` applies a chain to a stream of documents and counts,
per stage, the documents and UTF-8 bytes in and out and the documents dropped by reason.

Stateless stages (:class:`Normalize`) can run on any shard of the corpus; a stateful one
(:class:`ExactDedup` remembers the documents it has seen) must see the whole stream in order.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmkit.errors import UserError

NORMALIZATION_FORMS = ("NFC", "NFKC")


class Stage(Protocol):
    """One document stage (see the module docstring)."""

    name: str

    def __call__(self, text: str) -> tuple[str | None, str | None]: ...


@dataclass
class StageStats:
    """What one stage did: documents and UTF-8 bytes in and out, drops counted by reason."""

    name: str
    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    #: Stage-specific counts (PII replaced by kind, rules skipped by language, ...).
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The manifest entry of the stage."""
        entry = {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
        }
        for key, value in self.extra.items():
            entry[key] = dict(sorted(value.items())) if isinstance(value, Counter) else value
        return entry

    def merge(self, other: StageStats) -> None:
        """Add the counts of ``other`` (the same stage run on another shard) to these."""
        self.documents_in += other.documents_in
        self.documents_out += other.documents_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.dropped.update(other.dropped)
        for key, value in other.extra.items():
            if isinstance(value, Counter):
                self.extra.setdefault(key, Counter()).update(value)
            else:
                self.extra[key] = value


def normalize_text(text: str, form: str = "NFC") -> str:
    """Unicode normalization of ``text`` (``"NFC"`` or ``"NFKC"``, UAX #15)."""
    return unicodedata.normalize(form, text)


def is_blank(text: str) -> bool:
    """True when ``text`` is empty or holds only whitespace."""
    return not text or text.isspace()


def dedup_key(text: str) -> bytes:
    """The exact-duplicate key of a document: 16-byte BLAKE2b of its whitespace-collapsed text.

    Runs of whitespace become one space and the ends are stripped, so two documents that differ
    only in spacing or line breaks share a key; any other difference ("a-b" and "ab") does not.
    The text is put in NFC first (a no-op after :class:`Normalize`), so that composed and
    decomposed accents ("café" in NFC and NFD) share a key too.
    """
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    collapsed = " ".join(text.split())
    return hashlib.blake2b(collapsed.encode("utf-8"), digest_size=16).digest()


#: C0 and C1 control characters other than tab and line feed (``\r`` is a line end).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_ENDS = re.compile("\r\n?|[\u2028\u2029\x85]")
_TRAILING_SPACE = re.compile("[^\\S\n]+(?=\n|$)")
_BLANK_LINE_RUNS = re.compile("\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Line ends to ``\\n``, trailing spaces of each line removed, blank-line runs cut to one.

    Blank lines at the start and whitespace at the end of the document are removed; the
    indentation of lines (full-width ``\\u3000`` indents of Chinese text included) is kept, and
    so are spaces inside a line (collapsing them would change code and tables).
    """
    text = _LINE_ENDS.sub("\n", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINE_RUNS.sub("\n\n", text)
    return text.lstrip("\n").rstrip()


def remove_control_characters(text: str) -> str:
    """Remove C0/C1 control characters except tab and line feed (``\\r`` becomes ``\\n`` first)."""
    return _CONTROL.sub("", _LINE_ENDS.sub("\n", text))


#: ftfy settings: its defaults (those its own test cases check) but for character width.
#: ``fix_character_width`` would fold every full-width character to half width, rewriting the
#: full-width punctuation (，：。) and indents of Chinese and Japanese text.
FTFY_SETTINGS = {"fix_character_width": False}


def fix_mojibake(text: str, form: str = "NFC") -> str:
    """Repair mojibake and other encoding accidents with ftfy (Speer 2019, ``ftfy.fix_text``).

    ftfy's defaults except ``fix_character_width`` (see :data:`FTFY_SETTINGS`); among them
    curly quotes become straight ones, as in ftfy's reference outputs. ``form`` is the Unicode
    normalization ftfy applies last.
    """
    import ftfy

    return ftfy.fix_text(text, normalization=form, **FTFY_SETTINGS)


def html_to_text(text: str) -> str | None:
    """The main text of an HTML document (trafilatura's extractor), or None when it finds none.

    Text that holds no tag is returned as it is.
    """
    if "<" not in text or ">" not in text:
        return text
    import trafilatura

    return trafilatura.extract(text, include_comments=False, include_tables=True)


class Normalize:
    """Normalize a document; drop it when nothing but whitespace is left.

    In order: main text of HTML (``html``, off by default), mojibake repair with ftfy
    (``fix_mojibake``, on), Unicode normalization (NFC by default, NFKC by option; UAX #15),
    control characters removed (:func:`remove_control_characters`), whitespace
    (:func:`normalize_whitespace`, on).

    Drop reasons: ``"empty"``, ``"no main text"`` (HTML).
    """

    name = "normalize"
    stateless = True

    def __init__(
        self,
        form: str = "NFC",
        *,
        fix_mojibake: bool = True,
        whitespace: bool = True,
        html: bool = False,
    ):
        if form not in NORMALIZATION_FORMS:
            raise ValueError(f"normalization form {form!r} is not one of {NORMALIZATION_FORMS}")
        self.form = form
        self.fix_mojibake = fix_mojibake
        self.whitespace = whitespace
        if html:
            import importlib.util

            if importlib.util.find_spec("trafilatura") is None:
                raise UserError(
                    "--html needs the trafilatura package, which is not installed",
                    "pip install 'llmkit[html]' (or pip install trafilatura)",
                )
        self.html = html

    def settings(self) -> dict:
        """What the manifest records."""
        return {
            "form": self.form,
            "fix_mojibake": self.fix_mojibake,
            "ftfy": FTFY_SETTINGS if self.fix_mojibake else None,
            "control_characters": "removed",
            "whitespace": self.whitespace,
            "html": self.html,
        }

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        if self.html:
            extracted = html_to_text(text)
            if extracted is None:
                return None, "no main text"
            text = extracted
        if self.fix_mojibake:
            text = fix_mojibake(text, self.form)
        text = normalize_text(text, self.form)
        text = remove_control_characters(text)
        if self.whitespace:
            text = normalize_whitespace(text)
        if is_blank(text):
            return None, "empty"
        return text, None


class ExactDedup:
    """Exact de-duplication on :func:`dedup_key`: the first occurrence is kept.

    Holds one 16-byte key per distinct document seen (memory grows with the number of
    documents, not with their size). Drop reason: ``"duplicate"``.
    """

    name = "deduplicate"
    stateless = False

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        key = dedup_key(text)
        if key in self._seen:
            return None, "duplicate"
        self._seen.add(key)
        return text, None


def run_stages(
    documents: Iterable[str],
    stages: Sequence[Stage],
    stats: Sequence[StageStats],
    on_drop: Callable[[str, str, str], None] | None = None,
) -> Iterator[str]:
    """Pass each document through ``stages`` in order; yield the documents that all keep.

    ``stats[i]`` is updated with what ``stages[i]`` saw, kept and dropped, in documents and in
    UTF-8 bytes. A dropped document goes no further; ``on_drop(text, stage_name, reason)`` is
    called with it (as the stage received it) when given.
    """
    if len(stats) != len(stages):
        raise ValueError("one StageStats per stage")
    for text in documents:
        size = len(text.encode("utf-8"))
        kept: str | None = text
        for stage, st in zip(stages, stats, strict=True):
            st.documents_in += 1
            st.bytes_in += size
            out, reason = stage(kept)
            if out is None:
                st.dropped[reason or "unspecified"] += 1
                if on_drop is not None:
                    on_drop(kept, stage.name, reason or "unspecified")
                kept = None
                break
            if out is not kept:
                size = len(out.encode("utf-8"))
            st.documents_out += 1
            st.bytes_out += size
            kept = out
        if kept is not None:
            yield kept
