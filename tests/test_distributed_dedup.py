"""Cross-shard dedup of llmkit.data.distributed keeps exactly what the one-process pass keeps."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from conftest import shared_file

from llmkit.data.clean import admit_document, process_document
from llmkit.data.config import build_stages, default_config, merge
from llmkit.data.distributed.dedup import (
    admit_rows,
    collision_groups,
    resolve,
    shard_records,
    signatures_needed,
)
from llmkit.data.readers import discover_inputs, read_documents


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


def _rows(docs, stages):
    """The per-document part (pure: each row depends on its document only)."""
    stages = copy.deepcopy(stages)
    return [process_document(d, stages) for d in docs]


def _one_process(rows, stages):
    stages = copy.deepcopy(stages)  # fresh indexes
    return [admit_document(row, stages) for row in rows]


def _distributed(rows, stages, n_shards, n_partitions):
    """Shards of consecutive documents; each shard's records, then each partition's groups,
    then the one resolve; then each shard's admissions."""
    bounds = [round(k * len(rows) / n_shards) for k in range(n_shards + 1)]
    shards = [rows[bounds[k] : bounds[k + 1]] for k in range(n_shards)]
    parts = [[] for _ in range(n_partitions)]
    for s, r in enumerate(shards):
        for p, recs in enumerate(shard_records(r, s, stages, n_partitions)):
            parts[p].extend(recs)
    groups = [g for p in parts for g in collision_groups(p)]
    sigs = {
        i: {
            (s, j): np.asarray(row[f"key_{i}"][stages[i].bands :])
            for s, r in enumerate(shards)
            for j, row in enumerate(r)
            if row.get(f"key_{i}") is not None
        }
        for i in signatures_needed(stages)
    }
    dropped = resolve(groups, stages, sigs)
    return [a for s, r in enumerate(shards) for a in admit_rows(r, s, stages, dropped)]


def _chain(**dedup):
    cfg = merge(default_config(), {"dedup": dedup}) if dedup else default_config()
    return build_stages(cfg)


@pytest.fixture(scope="module")
def default_case(corpus):
    stages = _chain()
    rows = _rows(corpus, stages)
    return stages, rows, _one_process(rows, stages)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_kept_set_equals_one_process(default_case, n):
    stages, rows, ref = default_case
    got = _distributed(rows, stages, n, n)
    assert got == ref  # (stop, reason, counts) per document
    reasons = [r for _, r, _ in ref]
    assert reasons.count("duplicate") >= 150
    assert reasons.count("near_duplicate") >= 50
    assert sum(stop == len(stages) for stop, _, _ in ref) > 2000


def test_non_transitive_collisions_are_replayed(default_case):
    """The corpus holds B~A, C~B with C kept after B was dropped: 'one per cluster' would
    drop C; llmkit's greedy rule keeps it, and so does the distributed resolve."""
    stages, rows, ref = default_case
    near = next(i for i, s in enumerate(stages) if type(s).__name__ == "MinHashDedup")
    groups = [g for g in collision_groups(shard_records(rows, 0, stages, 1)[0]) if g[0] == near]
    dropped = {j for j, (stop, _, _) in enumerate(ref) if stop == near}
    kept_next_to_dropped = [
        m
        for _, members in groups
        for _, m in members
        if ref[m][0] == len(stages) and any(x in dropped for _, x in members)
    ]
    assert kept_next_to_dropped  # the case exists in the corpus
    assert _distributed(rows, stages, 3, 4) == ref


def test_a_wrong_rule_is_caught(default_case):
    """Resolving each partition on its own (no global order over the candidate graph) differs."""
    stages, rows, ref = default_case
    parts = shard_records(rows, 0, stages, 4)
    local = {}
    for p in parts:
        local.update(resolve(collision_groups(p), stages))
    assert local != resolve(collision_groups([r for p in parts for r in p]), stages)


@pytest.mark.slow
def test_with_threshold_and_other_partition_counts(corpus):
    stages = _chain(threshold=0.6)
    rows = _rows(corpus, stages)
    ref = _one_process(rows, stages)
    for shards, parts in ((2, 7), (5, 1)):
        assert _distributed(rows, stages, shards, parts) == ref
