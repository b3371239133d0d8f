"""The executor of ``llmkit prepare``'s cleaning steps: the only place that knows about worker
processes, arrow columns and progress bars.

After datatrove's ``executor/base.py`` (``_run_for_rank``: pipe the steps' generators, drain
them, keep the stats) and ``executor/local.py`` (ranks run by a pool of workers, stats merged
by addition). The steps (:mod:`llmkit.data.steps`) see only :class:`~llmkit.data.document.
Document` objects and their ``rank`` and ``world_size``.

:func:`run_pipeline` cuts the list of steps at each step with ``global_order`` (the resolve
step of a de-duplication): the steps between run on ``procs`` ranks, each rank a contiguous
slice of the documents written to its own arrow file, the files read back in rank order; a
global step runs alone on one rank over every document in order. So the documents, their
order, the statistics (added up over ranks) and the dropped documents (put back in corpus
order by their ids, :func:`llmkit.data.steps.base.merge_dropped`) are the same for any number
of processes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.data.document import Document
from llmkit.data.steps.base import PipelineStep, StageStats, run_chain

#: Documents per batch read from and written to arrow (a batch of whole books must fit in
#: memory).
BATCH_DOCUMENTS = 100


@dataclass
class Columns:
    """How a :class:`Document` is stored as an arrow row: ``text`` (a conversation's JSON list
    of messages, ``chat``), ``id``, ``n_bytes``, ``where`` (when the documents have one) and
    the de-duplication keys waiting for their resolve step (``keys``: column -> feature)."""

    chat: bool = False
    where: bool = False
    keys: dict = field(default_factory=dict)

    def features(self):
        """The ``datasets.Features`` of the rows."""
        from datasets import Features, Value

        return Features(
            {
                "text": Value("string"),
                "id": Value("int64"),
                "n_bytes": Value("int64"),
                **({"where": Value("string")} if self.where else {}),
                **self.keys,
            }
        )

    def to_document(self, row: dict, index: int) -> Document:
        """The document of ``row`` (``index``: its row number, the id of a document read)."""
        metadata = {k: row[k] for k in self.keys}
        if self.where:
            metadata["where"] = row["where"]
        text = row["text"]
        doc_id = row.get("id", index)
        if self.chat:
            doc = Document.conversation(json.loads(text), doc_id, metadata)
        else:
            doc = Document(text, doc_id, metadata)
        doc._n_bytes = row.get("n_bytes")  # as stored (None: measured when needed)
        return doc

    def to_row(self, doc: Document) -> dict:
        """The row of ``doc``."""
        row = {"text": doc.stored(), "id": doc.id, "n_bytes": doc.n_bytes}
        if self.where:
            row["where"] = doc.metadata.get("where")
        for key in self.keys:
            row[key] = doc.metadata.get(key)
        return row


def groups(steps: Sequence[PipelineStep]) -> list[list[PipelineStep]]:
    """``steps`` cut at the barriers: runs of steps that may run on any rank, and runs of
    ``global_order`` steps (which run on one rank, in order)."""
    out: list[list[PipelineStep]] = []
    for step in steps:
        if out and out[-1][0].global_order == step.global_order:
            out[-1].append(step)
        else:
            out.append([step])
    return out


#: Documents done per rank of the running group, shared with forked workers (a
#: ``multiprocessing`` RawArray, one slot per rank, so no lock is needed); None when none runs.
_PROGRESS = None
#: What the forked workers run: ``(steps, dataset, columns in, columns out, folder, name)``.
_JOB: tuple | None = None


def _bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice ``[start, end)`` of ``n`` rows that ``rank`` of ``world_size``
    takes (the first ``n % world_size`` ranks take one row more)."""
    div, mod = divmod(n, world_size)
    start = div * rank + min(rank, mod)
    return start, start + div + (1 if rank < mod else 0)


def _reset_stats(steps) -> None:
    for step in steps:
        if step.stats is not None:
            step.reset_stats()


def _run_rank(rank: int, world_size: int) -> list[StageStats | None]:
    """One rank: its slice of the documents through the steps, the kept ones written to
    ``<folder>/<name>-<rank>.arrow``; returns the steps' statistics."""
    from datasets.arrow_writer import ArrowWriter

    steps, dataset, cols_in, cols_out, folder, name = _JOB  # type: ignore[misc]
    start, end = _bounds(len(dataset), rank, world_size)
    if world_size > 1:  # a pool worker may run several ranks: return this rank's counts only
        _reset_stats(steps)

    def documents() -> Iterator[Document]:
        part = dataset.select(range(start, end))
        done = start
        for batch in part.iter(batch_size=BATCH_DOCUMENTS):
            n = len(batch["text"])
            for j in range(n):
                yield cols_in.to_document({c: batch[c][j] for c in batch}, done + j)
            done += n
            if _PROGRESS is not None:
                _PROGRESS[rank] += n

    path = Path(folder) / f"{name}-{rank:05d}.arrow"
    with ArrowWriter(
        features=cols_out.features(), path=str(path), writer_batch_size=BATCH_DOCUMENTS
    ) as writer:
        for doc in run_chain(steps, documents(), rank, world_size):
            writer.write(cols_out.to_row(doc))
        writer.finalize()
    for step in steps:
        if getattr(step, "dropped_writer", None) is not None:
            step.dropped_writer.close()
    return [step.stats for step in steps]


@contextmanager
def _worker_progress(advance: Callable, ranks: int) -> Iterator[None]:
    """Advance a progress bar from the documents the ranks report in :data:`_PROGRESS`
    (polled by a thread every 0.2 s)."""
    global _PROGRESS
    from multiprocessing.sharedctypes import RawArray

    _PROGRESS = RawArray("q", ranks)
    slots = _PROGRESS
    stop = threading.Event()
    done = 0

    def poll() -> None:
        nonlocal done
        while not stop.wait(0.2):
            now = sum(slots)
            if now > done:
                advance(now - done)
                done = now

    thread = threading.Thread(target=poll, name="llmkit-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if sum(slots) > done:
            advance(sum(slots) - done)
        _PROGRESS = None


def _pool(processes: int):
    """The worker pool of a group (forked: the job is inherited, not pickled)."""
    import multiprocessing

    return multiprocessing.get_context("fork").Pool(processes)


def _run_group(steps, dataset, cols_in: Columns, cols_out: Columns, *, procs, folder, name):
    global _JOB

    from datasets import Dataset, concatenate_datasets

    world_size = 1 if steps[0].global_order else max(1, min(procs, len(dataset)))
    _JOB = (steps, dataset, cols_in, cols_out, folder, name)
    try:
        if world_size == 1:
            _run_rank(0, 1)  # in this process: the steps' own stats are the totals
        else:
            with _pool(world_size) as pool:
                per_rank = pool.starmap(_run_rank, [(r, world_size) for r in range(world_size)])
            for i, step in enumerate(steps):
                if step.stats is None:
                    continue
                step.reset_stats()
                for stats in per_rank:
                    step.stats.merge(stats[i])
    finally:
        _JOB = None
    parts = [
        Dataset.from_file(str(Path(folder) / f"{name}-{r:05d}.arrow")) for r in range(world_size)
    ]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0], world_size


def run_pipeline(
    steps: Sequence[PipelineStep],
    dataset,
    *,
    chat: bool,
    procs: int,
    work: Path,
    task: Callable,
) -> tuple[object, int]:
    """Every document of ``dataset`` (rows ``text`` and, for web pages and conversations,
    ``where``) through ``steps``; returns the dataset of the documents kept (columns ``text``,
    ``id``, ``n_bytes``, ``where``) and the most ranks a group ran on.

    Args:
        steps: the steps in order (their ``stats`` hold the totals afterwards).
        dataset: an arrow-backed ``datasets.Dataset`` of the documents as read.
        chat: the rows are conversations (``text`` holds their JSON list of messages).
        procs: worker processes for the steps that run on any rank (1: this process).
        work: a directory for the arrow files of each group.
        task: ``task(description, total)``, a context manager yielding ``advance(n)`` for a
            progress bar.
    """
    cols = Columns(chat=chat, where="where" in dataset.column_names)
    used = 1
    for g, group in enumerate(groups(steps)):
        keys = dict(cols.keys)
        for step in group:
            if hasattr(step, "feature"):
                keys[step.key] = step.feature()
            elif getattr(step, "key", None) in keys:
                del keys[step.key]
        out = Columns(chat=chat, where=cols.where, keys=keys)
        folder = work / f"group-{g}"
        folder.mkdir(parents=True, exist_ok=True)
        names = ", ".join(s.name for s in group)
        kind = "deduplicate" if group[0].global_order else "clean"
        ranks = 1 if group[0].global_order else max(1, min(procs, len(dataset)))
        with task(f"{kind}: {names} (documents)", total=len(dataset)) as advance:
            with _worker_progress(advance, ranks):
                dataset, world = _run_group(
                    group, dataset, cols, out, procs=procs, folder=folder, name="documents"
                )
        used = max(used, world)
        cols = out
    return dataset, used
