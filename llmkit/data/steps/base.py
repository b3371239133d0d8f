"""The step contract and the document step that every formatter and filter is.

After datatrove's ``PipelineStep`` (``src/datatrove/pipeline/base.py``: ``run(data, rank,
world_size)``, a generator; statistics kept on the step) and ``BaseFilter``
(``pipeline/filters/base_filter.py``: counting and the writer of dropped documents done once in
the base, so that a filter only says whether to keep a document).

A step never knows who runs it: a plain loop (:func:`run_chain`), worker processes
(:mod:`llmkit.data.executor`) or another executor calling ``run`` with the documents of one
rank. Its statistics (:class:`StageStats`) add up over ranks with :meth:`StageStats.merge`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.data.document import Document

#: What a document step's rule returns for one text: the kept text (None when dropped), the
#: drop reason (None when kept), and the counts for this document (None when none).
Outcome = tuple[str | None, str | None, dict[str, int] | None]


def shape_counts(template: Mapping[str, Any], counts: Mapping[str, int]) -> dict:
    """The manifest form of a stage's counts: ``"group/key"`` counts nested under ``group``.

    ``template`` gives the entries present even when nothing was counted (``{}`` for a group,
    ``0`` for a total): ``shape_counts({"replaced": {}, "documents_changed": 0},
    {"replaced/email": 2, "documents_changed": 1})`` is ``{"replaced": {"email": 2},
    "documents_changed": 1}``. Groups are sorted by key.
    """
    out: dict = {k: (dict(v) if isinstance(v, dict) else v) for k, v in template.items()}
    for key, n in counts.items():
        group, sep, sub = key.partition("/")
        if sep:
            entry = out.setdefault(group, {})
            entry[sub] = entry.get(sub, 0) + n
        else:
            out[key] = out.get(key, 0) + n
    return {k: dict(sorted(v.items())) if isinstance(v, dict) else v for k, v in out.items()}


@dataclass
class StageStats:
    """What one stage did: documents and UTF-8 bytes in and out, drops counted by reason, and
    the stage's own counts (``counts``, shaped by ``template``, see :func:`shape_counts`)."""

    name: str
    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    template: dict = field(default_factory=dict)

    @classmethod
    def of(cls, stage) -> StageStats:
        """Empty statistics for ``stage``."""
        return cls(stage.name, template=dict(getattr(stage, "count_template", {})))

    def as_dict(self) -> dict:
        """The manifest entry of the stage."""
        entry = {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
        }
        entry.update(shape_counts(self.template, self.counts))
        return entry

    def merge(self, other: StageStats) -> None:
        """Add the counts of ``other`` (the same stage run on another shard) to these."""
        self.documents_in += other.documents_in
        self.documents_out += other.documents_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.dropped.update(other.dropped)
        self.counts.update(other.counts)


class DroppedWriter:
    """Writes each dropped document as one JSON line, one file per stage and rank
    (``<folder>/<stage>-<rank>.jsonl``), in the order the rank drops them: ``{"id",
    "stage", "reason", "url" (a web page), "text"}``, or for a conversation ``{"id",
    "stage", "reason", "where", "messages"}``: the document as the dropping stage received
    it. :func:`merge_dropped` puts the files of every rank and stage back in corpus order."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._files: dict[tuple[str, int], Any] = {}

    def write(self, doc: Document, stage: str, reason: str, rank: int = 0) -> None:
        """Append ``doc``, dropped by ``stage`` for ``reason``."""
        f = self._files.get((stage, rank))
        if f is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{stage}-{rank:05d}.jsonl"
            f = self._files[stage, rank] = open(path, "a", encoding="utf-8")
        record: dict = {"id": doc.id, "stage": stage, "reason": reason}
        if doc.messages is not None:
            record["where"] = doc.metadata.get("where")
            record["messages"] = doc.messages
        else:
            if doc.metadata.get("where"):
                record["url"] = doc.metadata["where"]
            record["text"] = doc.text
        f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        """Close the files (a later :meth:`write` opens them again, appending)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict:  # open files stay in the process that opened them
        return {**self.__dict__, "_files": {}}


def merge_dropped(folder: str | Path, out: str | Path) -> None:
    """The dropped-document files of a :class:`DroppedWriter` folder, every rank and stage,
    merged into ``out`` in corpus order (by ``id``, which is left out)."""
    import heapq

    files = sorted(Path(folder).glob("*.jsonl")) if Path(folder).is_dir() else []
    handles = [open(p, encoding="utf-8") for p in files]
    try:

        def records(f) -> Iterator[tuple[int, dict]]:
            for line in f:
                record = json.loads(line)
                yield record.pop("id"), record

        with open(out, "w", encoding="utf-8") as dst:
            for _, record in heapq.merge(*(records(f) for f in handles), key=lambda r: r[0]):
                dst.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for f in handles:
            f.close()


class Counted:
    """``counts`` of direct calls (a Counter created on first use), ``count_group()`` and
    ``extra()``: what calling a step on one text counted, for notebooks and tests."""

    #: The stage's own manifest entries and their empty values (see :func:`shape_counts`).
    count_template: dict = {}

    @property
    def counts(self) -> Counter:
        """What calling the step has counted so far (``"key"`` or ``"group/key"``)."""
        found = self.__dict__.get("_counts")
        if found is None:
            found = self.__dict__["_counts"] = Counter()
        return found

    def count_group(self, group: str) -> Counter:
        """The counts of one group, e.g. ``count_group("replaced") == {"email": 2}``."""
        prefix = group + "/"
        cut = len(prefix)
        return Counter({k[cut:]: n for k, n in self.counts.items() if k.startswith(prefix)})

    def extra(self) -> dict:
        """The step's own manifest entries from ``counts``."""
        return shape_counts(self.count_template, self.counts)


class PipelineStep:
    """A step: ``run(documents, rank, world_size)`` yields the documents it keeps.

    ``stats`` (or None for a step the manifest does not list) is what the step saw, kept on
    the step and added up over ranks by the executor. ``global_order`` is True for a step that
    must see every document of the corpus, in order, in one call (world_size 1): the executor
    runs it alone behind a barrier.
    """

    name = "step"
    global_order = False
    #: The stage's own manifest entries and their empty values (see :func:`shape_counts`).
    count_template: dict = {}

    @property
    def stats(self) -> StageStats | None:
        """This step's statistics so far (created on first use)."""
        found = self.__dict__.get("_stats")
        if found is None:
            found = self.__dict__["_stats"] = StageStats.of(self)
        return found

    def reset_stats(self) -> None:
        """Start counting again."""
        self.__dict__.pop("_stats", None)

    def run(
        self, data: Iterable[Document], rank: int = 0, world_size: int = 1
    ) -> Iterator[Document]:  # pragma: no cover - overridden
        raise NotImplementedError


def _merge_message_counts(total: dict[str, int], counts: Mapping[str, int]) -> None:
    # a grouped count ("replaced/email") adds up over the messages; a plain one
    # ("documents_changed") counts the conversation once
    for key, n in counts.items():
        total[key] = total.get(key, 0) + n if "/" in key else max(total.get(key, 0), n)


class DocumentStep(Counted, PipelineStep):
    """A step that judges or rewrites one document at a time: the formatters (normalize, PII)
    and the filters.

    A subclass implements only :meth:`apply`, a pure function of one text; this base does the
    rest once for all: the statistics (documents and UTF-8 bytes in and out, drops by reason,
    the step's own counts), the writer of dropped documents (``dropped_writer``, a
    :class:`DroppedWriter` or None), and conversations:

    - a formatter (``rewrites_messages = True``) runs on each message's content; the
      conversation is dropped when one message is (``"empty"`` becomes ``"empty message"``:
      a turn with nothing left in it breaks the conversation; any other reason
      ``"<reason> (a message)"``);
    - a filter judges the conversation's text (:attr:`Document.text`) and only keeps or drops
      it: a rule that would rewrite the text (C4's line removal) does not rewrite the
      conversation, and its counts are kept only for a conversation it passed unchanged.

    Calling a step, ``step(text) -> (text, None)`` or ``(None, reason)``, runs :meth:`apply`
    on one text and adds its counts to ``step.counts``: handy in a notebook and in tests.
    """

    name = "stage"
    #: Formatters rewrite each message of a conversation; filters judge the whole.
    rewrites_messages = False
    dropped_writer: DroppedWriter | None = None

    def apply(self, text: str) -> Outcome:  # pragma: no cover - overridden
        """``(text, None, counts)`` to keep ``text`` (possibly changed), ``(None, reason,
        counts)`` to drop it. Pure: the same text always gives the same outcome."""
        raise NotImplementedError

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        out, reason, counts = self.apply(text)
        if counts:
            self.counts.update(counts)
        return out, reason

    # -- the step ---------------------------------------------------------------------------

    def outcome(self, doc: Document) -> Outcome | tuple[list, str | None, dict | None]:
        """:meth:`apply` on ``doc``: for a document its text; for a conversation its messages
        (a formatter, the kept value is then the new list of messages) or its text (a
        filter, the kept value then the unchanged text)."""
        if doc.messages is None:
            return self.apply(doc.text)
        if not self.rewrites_messages:
            out, reason, counts = self.apply(doc.text)
            if out is None:
                return None, reason, None
            return doc.text, None, (counts if out == doc.text else None)
        messages: list = []
        total: dict[str, int] = {}
        changed = False
        for message in doc.messages:
            content, reason, counts = self.apply(message["content"])
            if content is None:
                why = "empty message" if reason == "empty" else f"{reason} (a message)"
                return None, why, None
            _merge_message_counts(total, counts or {})
            changed = changed or content != message["content"]
            messages.append({"role": message["role"], "content": content})
        return (messages if changed else doc.messages), None, total or None

    def run(
        self, data: Iterable[Document], rank: int = 0, world_size: int = 1
    ) -> Iterator[Document]:
        st = self.stats
        for doc in data:
            st.documents_in += 1
            st.bytes_in += doc.n_bytes
            out, reason, counts = self.outcome(doc)
            if counts:
                st.counts.update(counts)
            if out is None:
                st.dropped[reason or "unspecified"] += 1
                if self.dropped_writer is not None:
                    self.dropped_writer.write(doc, self.name, reason or "unspecified", rank)
                continue
            if doc.messages is None:
                doc.set_text(out)
            elif out is not doc.messages and out is not doc.text:
                doc.set_messages(out)
            st.documents_out += 1
            st.bytes_out += doc.n_bytes
            yield doc


def run_chain(
    steps: Iterable[PipelineStep],
    data: Iterable[Document],
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Document]:
    """The documents that pass every step of ``steps``, piped in one process (each step's
    generator feeding the next, as datatrove's ``_run_for_rank``)."""
    for step in steps:
        data = step.run(data, rank, world_size)
    return iter(data)
