"""Exact and MinHash de-duplication across shards, with llmkit's greedy rule, for any number of
tasks.

The cleaning steps (:func:`llmkit.data.config.build_steps`) put every de-duplication rule in
two steps (:mod:`llmkit.data.steps.dedup`): a per-document :class:`~llmkit.data.steps.dedup.
SignatureStep` (``metadata["key_<name>"] = rule.key(text)``), run on any rank, and a
:class:`~llmkit.data.steps.dedup.ResolveStep` that calls the rule's sequential ``admit`` over
every document in corpus order: a document is dropped when it collides with an earlier
document that was *kept*. With MinHash, collisions are not transitive (A~B, B~C, not A~C:
one process keeps A, drops B, and keeps C, since B was not kept), so "one per cluster"
(union-find, as datatrove's and NeMo Curator's MinHash pipelines do) is another rule. Here
the resolve steps are replayed exactly, in three steps:

1. **records** (:func:`shard_records`, per shard): each document's signature keys, as the
   signature steps left them, each record ``(rule, key, shard, index)`` sent to partition
   ``hash(key) % partitions`` (:func:`partition_of`);
2. **collision groups** (:func:`collision_groups`, one task per partition): the records of a
   partition grouped by ``(rule, key)``; only groups of two documents or more are kept;
3. **resolve** (:func:`resolve`, one task): over the colliding documents only, in global
   position order, rule after rule: a document is dropped by a rule when one of its groups
   already holds a kept document (with a MinHash ``threshold``: a kept document of its groups
   whose signature agrees on at least ``threshold`` of its values), else it is kept and marks
   its groups. A document no group holds collides with nothing and is kept. This is the
   one-process pass restricted to the documents whose decision can differ from "keep", so the
   kept set is the same for any number of shards and partitions.

Each shard then runs the real :class:`~llmkit.data.steps.dedup.ResolveStep` s over its own
documents with the decisions taken here (:class:`Decided`, which stands in for the rule), so
the statistics, drop reasons and counts are the steps' own, added up over shards.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from llmkit.data.clean import ExactDedup
from llmkit.data.dedup import MinHashDedup
from llmkit.data.steps.dedup import ResolveStep, SignatureStep, key_name

#: A document's global position: (shard index, index within the shard).
Position = tuple[int, int]

#: Drop reasons of the de-duplication rules (the strings their ``admit`` returns).
REASONS = {ExactDedup: "duplicate", MinHashDedup: "near_duplicate"}


def split_steps(steps: Sequence) -> tuple[list, list, list]:
    """``steps`` (:func:`llmkit.data.config.build_steps`) cut at the barrier: the steps that
    run per shard before it (normalize, filters, signatures), the resolve steps, and the
    per-shard steps after it (PII).

    Raises:
        ValueError: more than one barrier, or a global step other than an exact or MinHash
            resolve (this module cannot replay it).
    """
    first = next((i for i, s in enumerate(steps) if s.global_order), len(steps))
    end = first
    while end < len(steps) and steps[end].global_order:
        end += 1
    before, resolves, after = list(steps[:first]), list(steps[first:end]), list(steps[end:])
    if any(s.global_order for s in after):
        raise ValueError("cannot distribute two de-duplication barriers")
    for step in resolves:
        if not isinstance(step, ResolveStep) or type(step.rule) not in REASONS:
            raise ValueError(f"cannot distribute the global step {step.name!r}")
    return before, resolves, after


def rules_of(resolves: Sequence[ResolveStep]) -> list:
    """The de-duplication rules of the resolve steps, in order."""
    return [step.rule for step in resolves]


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a key: its first 8 bytes (little-endian) modulo ``partitions``.

    Keys are already uniform hashes (BLAKE2b), so this spreads them evenly.
    """
    return int.from_bytes(key[:8], "little") % partitions


def group_keys(rule, key) -> list[bytes]:
    """The group keys of one document under one rule (empty: it can collide with nothing):
    the exact key, or a MinHash key's band hashes as 8 bytes each."""
    if key is None:
        return []
    if isinstance(rule, ExactDedup):
        return [bytes(key)]
    return [int(h).to_bytes(8, "little", signed=True) for h in key[: rule.bands]]


def shard_records(
    keys: Iterable[Mapping], shard: int, rules: Sequence, partitions: int
) -> list[list[tuple[int, bytes, int, int]]]:
    """Step 1 for one shard: the records of its documents, by partition.

    Args:
        keys: per document of the shard that reached the barrier, in order, its signature
            keys (``{"key_<name>": key}``, as the signature steps leave them in metadata).
        shard: the shard's index.
        rules: the de-duplication rules (:func:`rules_of`).
        partitions: number of partitions.

    Returns:
        ``out[p]`` = ``[(rule_index, key, shard, index), ...]`` for partition ``p``.
    """
    out: list[list[tuple[int, bytes, int, int]]] = [[] for _ in range(partitions)]
    names = [key_name(rule) for rule in rules]
    for index, doc_keys in enumerate(keys):
        for i, rule in enumerate(rules):
            for k in group_keys(rule, doc_keys[names[i]]):
                out[partition_of(k, partitions)].append((i, k, shard, index))
    return out


def collision_groups(records: Iterable[tuple[int, bytes, int, int]]) -> list[tuple[int, list]]:
    """Step 2 for one partition: ``[(rule_index, sorted positions), ...]`` for each key held
    by two documents or more, in a deterministic order (by rule, then key)."""
    groups: dict[tuple[int, bytes], set[Position]] = defaultdict(set)
    for rule, key, shard, index in records:
        groups[(rule, key)].add((shard, index))
    return [
        (rule, sorted(members)) for (rule, _), members in sorted(groups.items()) if len(members) > 1
    ]


def signatures_needed(rules: Sequence) -> set[int]:
    """Rules whose resolve needs the MinHash signatures (those with a threshold)."""
    return {
        i
        for i, rule in enumerate(rules)
        if isinstance(rule, MinHashDedup) and rule.threshold is not None
    }


def resolve(
    groups: Iterable[tuple[int, Sequence[Position]]],
    rules: Sequence,
    signatures: Mapping[int, Mapping[Position, np.ndarray]] | None = None,
) -> dict[Position, tuple[int, str]]:
    """Step 3: the documents dropped by the rules, ``{position: (rule_index, reason)}``.

    Args:
        groups: every partition's :func:`collision_groups` (in any order).
        rules: the de-duplication rules (:func:`rules_of`).
        signatures: for a MinHash rule with a ``threshold``, ``{rule: {position:
            signature}}`` of the colliding documents (the values after the band hashes in
            its key).

    Memory: one entry per colliding document and group membership.
    """
    by_rule: dict[int, list[Sequence[Position]]] = defaultdict(list)
    for rule, members in groups:
        by_rule[rule].append(members)
    dropped: dict[Position, tuple[int, str]] = {}
    for i, rule in enumerate(rules):
        reason = REASONS[type(rule)]
        member_of: dict[Position, list[int]] = defaultdict(list)
        for g, members in enumerate(by_rule.get(i, ())):
            for m in members:
                if m not in dropped:
                    member_of[m].append(g)
        threshold = getattr(rule, "threshold", None)
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


class Decided:
    """Stands in for a de-duplication rule in a shard's :class:`ResolveStep`: ``admit`` gives
    the decision :func:`resolve` took for the document. The step's signature metadata is then
    ``(position, key)``; a key of None (a document too short to index) goes to the real rule,
    whose ``admit(None)`` only counts it."""

    def __init__(self, rule, index: int, dropped: Mapping[Position, tuple[int, str]]):
        self.rule, self.index, self.dropped = rule, index, dropped
        self.name = rule.name
        self.count_template = dict(getattr(rule, "count_template", {}))

    def admit(self, tagged) -> tuple[str | None, dict[str, int] | None]:
        position, key = tagged
        if key is None:
            return self.rule.admit(None)
        decided = self.dropped.get(position)
        if decided is not None and decided[0] == self.index:
            return decided[1], None
        return None, None


def decided_steps(
    resolves: Sequence[ResolveStep], dropped: Mapping[Position, tuple[int, str]]
) -> list[ResolveStep]:
    """Fresh resolve steps (statistics at zero) that apply :func:`resolve`'s decisions; a
    document's metadata must hold ``(position, key)`` under each step's key
    (:func:`tag_keys`)."""
    out = []
    for i, step in enumerate(resolves):
        fresh = ResolveStep(Decided(step.rule, i, dropped))
        fresh.dropped_writer = step.dropped_writer
        out.append(fresh)
    return out


def tag_keys(metadata: dict, rules: Sequence, position: Position) -> None:
    """Pair each signature key in ``metadata`` with the document's global position."""
    for rule in rules:
        name = key_name(rule)
        metadata[name] = (position, metadata.get(name))


def signature_steps(steps: Sequence) -> list[SignatureStep]:
    """The signature steps of ``steps``."""
    return [s for s in steps if isinstance(s, SignatureStep)]
