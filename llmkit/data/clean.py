"""Document stages of ``llmkit prepare``: normalize and exact de-duplication (SPEC §2).

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
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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

    def as_dict(self) -> dict:
        """The manifest entry of the stage."""
        return {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
        }


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
    The text is expected to be normalized already (NFC), so that composed and decomposed
    accents ("café" in NFC and NFD) share a key too.
    """
    collapsed = " ".join(text.split())
    return hashlib.blake2b(collapsed.encode("utf-8"), digest_size=16).digest()


class Normalize:
    """Unicode normalization (NFC by default); drops empty and whitespace-only documents.

    Drop reason: ``"empty"``.
    """

    name = "normalize"

    def __init__(self, form: str = "NFC"):
        if form not in NORMALIZATION_FORMS:
            raise ValueError(f"normalization form {form!r} is not one of {NORMALIZATION_FORMS}")
        self.form = form

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        text = normalize_text(text, self.form)
        if is_blank(text):
            return None, "empty"
        return text, None


class ExactDedup:
    """Exact de-duplication on :func:`dedup_key`: the first occurrence is kept.

    Holds one 16-byte key per distinct document seen (memory grows with the number of
    documents, not with their size). Drop reason: ``"duplicate"``.
    """

    name = "deduplicate"

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        key = dedup_key(text)
        if key in self._seen:
            return None, "duplicate"
        self._seen.add(key)
        return text, None


def run_stages(
    documents: Iterable[str], stages: Sequence[Stage], stats: Sequence[StageStats]
) -> Iterator[str]:
    """Pass each document through ``stages`` in order; yield the documents that all keep.

    ``stats[i]`` is updated with what ``stages[i]`` saw, kept and dropped, in documents and in
    UTF-8 bytes. A dropped document goes no further.
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
                kept = None
                break
            if out is not kept:
                size = len(out.encode("utf-8"))
            st.documents_out += 1
            st.bytes_out += size
            kept = out
        if kept is not None:
            yield kept
