"""Cross-shard dedup of llmkit.data.distributed keeps exactly what the one-process pass keeps."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from conftest import shared_file

from llmkit.data.config import build_steps, default_config, merge
from llmkit.data.distributed.dedup import (
    collision_groups,
    decided_steps,
    resolve,
    rules_of,
    shard_records,
    signatures_needed,
    split_steps,
    tag_keys,
)
from llmkit.data.document import Document
from llmkit.data.readers import discover_inputs, read_documents
from llmkit.data.steps.base import run_chain
from llmkit.data.steps.dedup import key_name


def _edit(text: str, every: int, rng: random.Random) -> str:
    words = text.split(" ")
    for i in range(rng.randrange(every), len(words), every):
        words[i] = rng.choice(["lamp", "river", "blue", "seven", "quietly", "stone"])
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Real documents with injected exact copies, near copies and chains of near copies
    (B an edit of A, C an edit of B) spread over the corpus."""
    paths = [
        shared_file(p)
        for p in (
            "tinystories/tinystories.txt",
            "dolma_cc_jsonl/cc_en_head-0091.jsonl",
            "dolma_cc_jsonl/cc_en_head-0174.jsonl",
            "fuzzy_dup_licenses",
            "wikitext2/test.txt",
        )
    ]
    docs = [d for f in discover_inputs(paths) for d in read_documents(f)]
    rng = random.Random(0)
    out = list(docs)
    long_docs = [d for d in docs if len(d.split()) >= 120]
    for d in rng.sample(long_docs, 150):  # chains A -> B -> C at random places
        b = _edit(d, rng.choice([15, 20, 30]), rng)
        c = _edit(b, rng.choice([15, 20, 30]), rng)
        for x in (b, c):
            out.insert(rng.randrange(len(out) + 1), x)
    for d in rng.sample(docs, 150):  # exact copies (spacing changed)
        out.insert(rng.randrange(len(out) + 1), d.replace(" ", "  ", 3))
    return out


def _one_process(docs, steps):
    """The reference: the cleaning steps' ``run()`` in one process (what ``prepare`` runs with
    ``--num-proc 1``); per document, the stage that dropped it and why (None: kept), and the
    steps' statistics."""
    steps = copy.deepcopy(steps)
    fate = {}
    for step in steps:
        step.dropped_writer = _Fate(fate)
    kept = {d.id for d in run_chain(steps, [Document(t, j) for j, t in enumerate(docs)])}
    assert all(j in kept or j in fate for j in range(len(docs)))
    return fate, [s.stats.as_dict() for s in steps if s.stats is not None]


class _Fate:
    def __init__(self, fate):
        self.fate = fate

    def write(self, doc, stage, reason, rank=0):
        self.fate[doc.id] = (stage, reason)

    def close(self):
        pass


def _distributed(docs, steps, n_shards, n_partitions):
    """Shards of consecutive documents: each shard's steps before the barrier and its
    records, then each partition's groups, then the one resolve, then each shard's decided
    resolve steps and the steps after the barrier; the fates and the statistics added up."""
    steps = copy.deepcopy(steps)
    before, resolves, after = split_steps(steps)
    rules = rules_of(resolves)
    bounds = [round(k * len(docs) / n_shards) for k in range(n_shards + 1)]
    fate = {}
    reached = []
    parts = [[] for _ in range(n_partitions)]
    totals = None
    per_shard_before = []
    for s in range(n_shards):
        for step in before:
            step.reset_stats()
            step.dropped_writer = _Fate(fate)
        shard_docs = [Document(docs[j], j) for j in range(bounds[s], bounds[s + 1])]
        out = list(run_chain(before, shard_docs))
        reached.append(out)
        per_shard_before.append([st.stats for st in before if st.stats is not None])
        for p, recs in enumerate(shard_records([d.metadata for d in out], s, rules, n_partitions)):
            parts[p].extend(recs)
    groups = [g for p in parts for g in collision_groups(p)]
    sigs = {
        i: {
            (s, j): np.asarray(d.metadata[key_name(rules[i])][rules[i].bands :])
            for s, out in enumerate(reached)
            for j, d in enumerate(out)
            if d.metadata[key_name(rules[i])] is not None
        }
        for i in signatures_needed(rules)
    }
    dropped = resolve(groups, rules, sigs)
    for s, out in enumerate(reached):
        decided = decided_steps(resolves, dropped)
        for step in decided + after:
            step.reset_stats()
            step.dropped_writer = _Fate(fate)
        for j, d in enumerate(out):
            tag_keys(d.metadata, rules, (s, j))
        list(run_chain(decided + after, out))
        stats = per_shard_before[s] + [st.stats for st in decided + after if st.stats is not None]
        if totals is None:
            totals = stats
        else:
            for a, b in zip(totals, stats, strict=True):
                a.merge(b)
    return fate, [st.as_dict() for st in totals]


def _chain(**dedup):
    cfg = merge(default_config(), {"dedup": dedup}) if dedup else default_config()
    return build_steps(cfg)


@pytest.fixture(scope="module")
def default_case(corpus):
    steps = _chain()
    return steps, _one_process(corpus, steps)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_kept_set_equals_one_process(corpus, default_case, n):
    steps, (ref_fate, ref_stats) = default_case
    fate, stats = _distributed(corpus, steps, n, n)
    assert fate == ref_fate  # the stage and reason of every dropped document
    assert stats == ref_stats  # every step's documents, bytes, drops and counts
    reasons = [r for _, r in ref_fate.values()]
    assert reasons.count("duplicate") >= 150
    assert reasons.count("near_duplicate") >= 50
    assert len(corpus) - len(ref_fate) > 2000


def test_non_transitive_collisions_are_replayed(corpus, default_case):
    """The corpus holds B~A, C~B with C kept after B was dropped: 'one per cluster' would
    drop C; llmkit's greedy rule keeps it, and so does the distributed resolve."""
    steps, (ref_fate, _) = default_case
    before, resolves, _ = split_steps(copy.deepcopy(steps))
    rules = rules_of(resolves)
    near = next(i for i, r in enumerate(rules) if r.name == "near_dedup")
    docs = [Document(t, j) for j, t in enumerate(corpus)]
    reached = list(run_chain(before, docs))
    ids = [d.id for d in reached]
    recs = shard_records([d.metadata for d in reached], 0, rules, 1)[0]
    groups = [g for g in collision_groups(recs) if g[0] == near]
    dropped = {
        ids[j]
        for j, (stage, _) in ((k, ref_fate.get(ids[k], (None, None))) for k in range(len(ids)))
        if stage == "near_dedup"
    }
    kept_next_to_dropped = [
        ids[m]
        for _, members in groups
        for _, m in members
        if ids[m] not in ref_fate and any(ids[x] in dropped for _, x in members)
    ]
    assert kept_next_to_dropped  # the case exists in the corpus
    assert _distributed(corpus, steps, 3, 4)[0] == ref_fate


def test_a_wrong_rule_is_caught(corpus, default_case):
    """Resolving each partition on its own (no global order over the candidate graph) differs."""
    steps, _ = default_case
    before, resolves, _ = split_steps(copy.deepcopy(steps))
    rules = rules_of(resolves)
    reached = list(run_chain(before, [Document(t, j) for j, t in enumerate(corpus)]))
    parts = shard_records([d.metadata for d in reached], 0, rules, 4)
    local = {}
    for p in parts:
        local.update(resolve(collision_groups(p), rules))
    assert local != resolve(collision_groups([r for p in parts for r in p]), rules)


@pytest.mark.slow
def test_with_threshold_and_other_partition_counts(corpus):
    steps = _chain(threshold=0.6)
    ref = _one_process(corpus, steps)
    for shards, parts in ((2, 7), (5, 1)):
        assert _distributed(corpus, steps, shards, parts) == ref
