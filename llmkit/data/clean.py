"""Document stages of ``llmkit prepare``: normalize and exact de-duplication (SPEC §2).

The filters (:mod:`llmkit.data.filters`), near-duplicate removal (:mod:`llmkit.data.dedup`)
and PII redaction (:mod:`llmkit.data.pii`) are stages of the same two kinds:

- a *document stage* (:class:`DocumentStage`: normalize, the filters, PII) is a pure function
  of one text: ``stage.apply(text) -> (text, None, counts)`` keeps a (possibly changed)
  document, ``(None, reason, counts)`` drops it; ``counts`` (or None) is what the stage saw
  in that document, as ``{"key": n}`` or ``{"group/key": n}`` (e.g. ``{"replaced/email": 2}``);
- a *corpus stage* (:class:`CorpusStage`: exact and near de-duplication) splits into a pure
  ``stage.key(text)`` computed per document (a hash, a MinHash signature) and a sequential
  ``stage.admit(key) -> (reason, counts)`` that must see the keys of the whole corpus in
  document order (the first of a group of duplicates is kept).

Stages know nothing about files, datasets or processes. A document stage is a step
(:class:`llmkit.data.steps.base.DocumentStep`, ``run(documents, rank, world_size)``), and a
corpus stage becomes two (:mod:`llmkit.data.steps.dedup`: its signature on any rank, then its
``admit`` in corpus order); :mod:`llmkit.data.executor` runs the steps over worker processes.
:func:`run_stages` is the plain loop, the reference the steps are tested against. Both count,
per stage, the documents and UTF-8 bytes in and out, the documents dropped by reason and the
stage's own counts (:class:`StageStats`).

Calling a stage, ``stage(text) -> (text, None)`` or ``(None, reason)``, runs it on one document
and adds its counts to ``stage.counts``: handy in a notebook and in tests.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from llmkit.data.choices import NORMALIZATION_FORMS
from llmkit.data.document import utf8_len
from llmkit.data.steps.base import Counted as _Counted
from llmkit.data.steps.base import DocumentStep, Outcome, StageStats, shape_counts  # noqa: F401
from llmkit.errors import require


class DocumentStage(DocumentStep):
    """A stage that is a pure function of one document (see the module docstring and
    :class:`llmkit.data.steps.base.DocumentStep`, which runs it over documents)."""

    stateless = True


class CorpusStage(_Counted):
    """A stage that needs the whole corpus in order: a pure per-document :meth:`key`, then a
    sequential :meth:`admit` (see the module docstring)."""

    name = "corpus stage"
    stateless = False

    def key(self, text: str) -> Any:  # pragma: no cover - overridden
        """The per-document part (pure): what :meth:`admit` needs, storable in arrow."""
        raise NotImplementedError

    def key_feature(self) -> Any:  # pragma: no cover - overridden
        """The ``datasets`` feature of :meth:`key`'s values."""
        raise NotImplementedError

    def admit(self, key: Any) -> tuple[str | None, dict[str, int] | None]:  # pragma: no cover
        """The sequential part: ``(None, counts)`` keeps the document, ``(reason, counts)``
        drops it. Called once per document reaching the stage, in document order."""
        raise NotImplementedError

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        reason, counts = self.admit(self.key(text))
        if counts:
            self.counts.update(counts)
        return (text, None) if reason is None else (None, reason)


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


class Normalize(DocumentStage):
    """Normalize a document; drop it when nothing but whitespace is left.

    In order: main text of HTML (``html``, off by default), mojibake repair with ftfy
    (``fix_mojibake``, on), Unicode normalization (NFC by default, NFKC by option; UAX #15),
    control characters removed (:func:`remove_control_characters`), whitespace
    (:func:`normalize_whitespace`, on).

    Drop reasons: ``"empty"``, ``"no main text"`` (HTML).
    """

    name = "normalize"
    rewrites_messages = True

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
            require(
                "trafilatura",
                "--html needs the trafilatura package",
                "pip install 'llmkit[html]'",
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

    def apply(self, text: str) -> Outcome:
        if self.html:
            extracted = html_to_text(text)
            if extracted is None:
                return None, "no main text", None
            text = extracted
        if self.fix_mojibake:
            text = fix_mojibake(text, self.form)
        text = normalize_text(text, self.form)
        text = remove_control_characters(text)
        if self.whitespace:
            text = normalize_whitespace(text)
        if is_blank(text):
            return None, "empty", None
        return text, None, None


class ExactDedup(CorpusStage):
    """Exact de-duplication on :func:`dedup_key`: the first occurrence is kept.

    The key (16 bytes) is computed per document; :meth:`admit` holds one key per distinct
    document seen (memory grows with the number of documents, about 100 bytes each, not with
    their size). Drop reason: ``"duplicate"``.
    """

    name = "deduplicate"

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def key(self, text: str) -> bytes:
        return dedup_key(text)

    def key_feature(self):
        from datasets import Value

        return Value("binary")

    def admit(self, key: bytes) -> tuple[str | None, dict[str, int] | None]:
        if key in self._seen:
            return "duplicate", None
        self._seen.add(key)
        return None, None


def run_stages(
    documents: Iterable[str],
    stages: Sequence,
    stats: Sequence[StageStats],
    on_drop: Callable[[str, str, str], None] | None = None,
) -> Iterator[str]:
    """Pass each document through ``stages`` in order; yield the documents that all keep.

    The plain sequential executor (the pipeline runs the same stages with the per-document
    work in parallel, :func:`process_document`, and gets the same result). ``stats[i]`` is
    updated with what ``stages[i]`` saw, kept and dropped, in documents and in UTF-8 bytes,
    and with its counts. A dropped document goes no further; ``on_drop(text, stage_name,
    reason)`` is called with it (as the stage received it) when given.
    """
    if len(stats) != len(stages):
        raise ValueError("one StageStats per stage")
    for text in documents:
        size = utf8_len(text)
        kept: str | None = text
        for stage, st in zip(stages, stats, strict=True):
            st.documents_in += 1
            st.bytes_in += size
            if stage.stateless:
                out, reason, counts = stage.apply(kept)
            else:
                reason, counts = stage.admit(stage.key(kept))
                out = kept if reason is None else None
            if counts:
                st.counts.update(counts)
            if out is None:
                st.dropped[reason or "unspecified"] += 1
                if on_drop is not None:
                    on_drop(kept, stage.name, reason or "unspecified")
                kept = None
                break
            if out is not kept:
                size = utf8_len(out)
            st.documents_out += 1
            st.bytes_out += size
            kept = out
        if kept is not None:
            yield kept
