"""Exact and MinHash de-duplication across shards, with llmkit's greedy rule, for any number of
tasks.

llmkit's rule (:meth:`llmkit.data.clean.ExactDedup.admit`,
:meth:`llmkit.data.dedup.MinHashDedup.admit`, run in document order by
:func:`llmkit.data.clean.admit_document`): a document is dropped when it collides with an
earlier document that was *kept*. With MinHash, collisions are not transitive (A~B, B~C, not
A~C: the one-process pass keeps A, drops B, and keeps C, since B was not kept), so "one per
cluster" (union-find, as datatrove's and NeMo Curator's MinHash pipelines do) is another rule.
Here it is replayed exactly, in three steps:

1. **signatures** (:func:`shard_records`, one task per shard): each document's keys, exactly
   those the one-process chain computes (:func:`llmkit.data.clean.process_document` rows: the
   exact key, :func:`llmkit.data.clean.dedup_key`; the MinHash band hashes,
   :meth:`~llmkit.data.dedup.MinHashDedup.band_hashes`), each record ``(stage, key, position)``
   sent to partition ``hash(key) % partitions`` (:func:`partition_of`). A document that a
   document stage dropped before a dedup stage sends nothing for it.
2. **collision groups** (:func:`collision_groups`, one task per partition): the records of a
   partition grouped by ``(stage, key)``; only groups of two documents or more are kept.
3. **resolve** (:func:`resolve`, one task): over the colliding documents only, in global
   position order, stage after stage: a document is dropped at a stage when one of its groups
   already holds a kept document (with a MinHash ``threshold``: a kept document of its groups
   whose signature agrees on at least ``threshold`` of its values), else it is kept and marks
   its groups. A document no group holds collides with nothing and is kept. This is the
   one-process pass restricted to the documents whose decision can differ from "keep", so the
   kept set is the same for any number of shards and partitions.

:func:`admit_rows` then gives each row the ``(stop, reason, corpus_counts)`` that
:func:`~llmkit.data.clean.admit_document` gives it in one process, so the stage counts of the
manifest add up the same.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from llmkit.data.clean import ExactDedup
from llmkit.data.dedup import MinHashDedup

#: A document's global position: (shard index, index within the shard).
Position = tuple[int, int]

#: Drop reasons of the dedup stages (the strings their ``admit`` returns).
REASONS = {ExactDedup: "duplicate", MinHashDedup: "near_duplicate"}


def _inner(stage):
    """The dedup stage itself (chat data wraps it in a ConversationCorpusStage)."""
    return getattr(stage, "inner", stage)


def corpus_stages(stages: Sequence) -> list[int]:
    """Indexes of the corpus (order-dependent) stages of a chain.

    Raises:
        ValueError: a corpus stage this module cannot replay (not exact or MinHash dedup).
    """
    out = []
    for i, stage in enumerate(stages):
        if stage.stateless:
            continue
        if type(_inner(stage)) not in REASONS:
            raise ValueError(f"cannot distribute the corpus stage {type(stage).__name__}")
        out.append(i)
    return out


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a key: its first 8 bytes (little-endian) modulo ``partitions``.

    Keys are already uniform hashes (BLAKE2b), so this spreads them evenly.
    """
    return int.from_bytes(key[:8], "little") % partitions


def _stage_keys(stage, key) -> list[bytes]:
    """The group keys of one document at one stage (empty: it can collide with nothing)."""
    if key is None:
        return []
    inner = _inner(stage)
    if isinstance(inner, ExactDedup):
        return [bytes(key)]
    return [int(h).to_bytes(8, "little", signed=True) for h in key[: inner.bands]]


def _reaches(row: Mapping, i: int) -> bool:
    return row["drop_stage"] < 0 or row["drop_stage"] > i


def shard_records(
    rows: Iterable[Mapping], shard: int, stages: Sequence, partitions: int
) -> list[list[tuple[int, bytes, int, int]]]:
    """Step 1 for one shard: the records of its documents, by partition.

    Args:
        rows: the shard's :func:`~llmkit.data.clean.process_document` rows, in order.
        shard: the shard's index.
        stages: the chain (the same objects' settings as in one process).
        partitions: number of partitions.

    Returns:
        ``out[p]`` = ``[(stage_index, key, shard, index), ...]`` for partition ``p``.
    """
    corpus = corpus_stages(stages)
    out: list[list[tuple[int, bytes, int, int]]] = [[] for _ in range(partitions)]
    for index, row in enumerate(rows):
        for i in corpus:
            if not _reaches(row, i):
                continue
            for k in _stage_keys(stages[i], row[f"key_{i}"]):
                out[partition_of(k, partitions)].append((i, k, shard, index))
    return out


def collision_groups(records: Iterable[tuple[int, bytes, int, int]]) -> list[tuple[int, list]]:
    """Step 2 for one partition: ``[(stage_index, sorted positions), ...]`` for each key held
    by two documents or more, in a deterministic order (by stage, then key)."""
    groups: dict[tuple[int, bytes], set[Position]] = defaultdict(set)
    for stage, key, shard, index in records:
        groups[(stage, key)].add((shard, index))
    return [
        (stage, sorted(members))
        for (stage, _), members in sorted(groups.items())
        if len(members) > 1
    ]


def signatures_needed(stages: Sequence) -> set[int]:
    """Corpus stages whose resolve needs the MinHash signatures (those with a threshold)."""
    return {
        i
        for i in corpus_stages(stages)
        if isinstance(_inner(stages[i]), MinHashDedup) and _inner(stages[i]).threshold is not None
    }


def resolve(
    groups: Iterable[tuple[int, Sequence[Position]]],
    stages: Sequence,
    signatures: Mapping[int, Mapping[Position, np.ndarray]] | None = None,
) -> dict[Position, tuple[int, str]]:
    """Step 3: the documents dropped by the dedup stages, ``{position: (stage, reason)}``.

    Args:
        groups: every partition's :func:`collision_groups` (in any order).
        stages: the chain.
        signatures: for a MinHash stage with a ``threshold``, ``{stage: {position:
            signature}}`` of the colliding documents (the values after the band hashes in
            its key).

    Memory: one entry per colliding document and group membership.
    """
    by_stage: dict[int, list[Sequence[Position]]] = defaultdict(list)
    for stage, members in groups:
        by_stage[stage].append(members)
    dropped: dict[Position, tuple[int, str]] = {}
    for i in corpus_stages(stages):
        inner = _inner(stages[i])
        reason = REASONS[type(inner)]
        member_of: dict[Position, list[int]] = defaultdict(list)
        for g, members in enumerate(by_stage.get(i, ())):
            for m in members:
                if m not in dropped:
                    member_of[m].append(g)
        threshold = getattr(inner, "threshold", None)
        kept_in: dict[int, list[Position]] = defaultdict(list)
        sigs = (signatures or {}).get(i, {})
        for doc in sorted(member_of):
            gs = member_of[doc]
            if threshold is None:
                hit = any(kept_in[g] for g in gs)
            else:
                sig = sigs[doc]
                candidates = {c for g in gs for c in kept_in[g]}
                hit = any(
                    np.count_nonzero(sigs[c] == sig) / sig.size >= threshold for c in candidates
                )
            if hit:
                dropped[doc] = (i, reason)
            else:
                for g in gs:
                    kept_in[g].append(doc)
    return dropped


def admit_rows(
    rows: Iterable[Mapping],
    shard: int,
    stages: Sequence,
    dropped: Mapping[Position, tuple[int, str]],
) -> list[tuple[int, str | None, list]]:
    """What :func:`~llmkit.data.clean.admit_document` returns for each row of a shard, given
    :func:`resolve`'s decisions (the counts a MinHash stage adds for a document too short to
    index included)."""
    corpus = corpus_stages(stages)
    out = []
    for index, row in enumerate(rows):
        stop = row["drop_stage"] if row["drop_stage"] >= 0 else len(stages)
        reason = row["drop_reason"]
        called = []
        decided = dropped.get((shard, index))
        for i in corpus:
            if i >= stop:
                break
            if isinstance(_inner(stages[i]), MinHashDedup) and row[f"key_{i}"] is None:
                called.append((i, {"not_indexed_too_short": 1}))
            if decided is not None and decided[0] == i:
                stop, reason = i, decided[1]
                break
        out.append((stop, reason, called))
    return out


def key_digest(key: bytes) -> str:
    """A short printable form of a key (for logs)."""
    return hashlib.blake2b(key, digest_size=4).hexdigest()
