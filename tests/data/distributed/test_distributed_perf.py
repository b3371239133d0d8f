"""Performance rules of the distributed job's stages that keep the bytes: the encode stage
encodes a shard in bounded batches (memory per task does not grow with the shard's tokens as
Python lists), and every finished task records its seconds and peak RSS."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_file

pytest.importorskip("datatrove")

import llmkit.data.encode as encode_mod  # noqa: E402
from llmkit.data.distributed import job  # noqa: E402


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = shared_file("tinystories/tinystories.txt").read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d.strip()][:200]


def test_encode_flat_batches_and_equals_one_batch(monkeypatch, tiny_tokenizer, stories):
    """Batches of at most BATCH_DOCUMENTS documents and about BATCH_BYTES of text; the ids
    are those of encoding every document at once, one EOS each, int32."""
    tok = tiny_tokenizer
    whole = encode_mod.encode_batch(stories, tok, eos_token_id=tok.eos_token_id)
    expected = np.array([i for ids in whole for i in ids], dtype=np.int32)
    sizes: list[int] = []
    real = encode_mod.encode_batch

    def spy(texts, *a, **k):
        sizes.append(len(texts))
        return real(texts, *a, **k)

    monkeypatch.setattr(encode_mod, "encode_batch", spy)
    monkeypatch.setattr(encode_mod, "BATCH_DOCUMENTS", 7)
    flat = job._encode_flat(stories, tok, True)
    assert flat.dtype == np.int32 and flat.ndim == 1
    assert np.array_equal(flat, expected)
    assert sizes == [7] * (len(stories) // 7) + [len(stories) % 7]
    assert int((flat == tok.eos_token_id).sum()) == len(stories)

    sizes.clear()
    monkeypatch.setattr(encode_mod, "BATCH_DOCUMENTS", 1000)
    monkeypatch.setattr(encode_mod, "BATCH_BYTES", 2000)  # a batch closes once past 2000 bytes
    flat = job._encode_flat(stories, tok, True)
    assert np.array_equal(flat, expected)
    assert sum(sizes) == len(stories) and len(sizes) > 10
    start = 0
    for n in sizes[:-1]:
        batch = [s.encode() for s in stories[start : start + n]]
        assert sum(map(len, batch)) >= 2000 > sum(map(len, batch[:-1]))
        start += n
    assert job._encode_flat([], tok, True).shape == (0,)


@pytest.fixture(scope="module")
def small_job(tmp_path_factory, tiny_tokenizer, stories):
    """A 2-task job run in this process (one worker), counting the calls of split_indices."""
    import llmkit.data.pipeline as pipeline

    tmp = tmp_path_factory.mktemp("job")
    (tmp / "in").mkdir()
    (tmp / "in" / "a.txt").write_text("\n\n".join(stories[:100]), encoding="utf-8")
    (tmp / "in" / "b.txt").write_text("\n\n".join(stories[100:]), encoding="utf-8")
    tiny_tokenizer.save_pretrained(str(tmp / "tok"))
    spec = job.JobSpec(
        work_dir=str(tmp / "work"),
        inputs=[str(tmp / "in")],
        tokenizer=str(tmp / "tok"),
        block_size=32,
        tasks=2,
        partitions=2,
        cleaning={"gutenberg": False},
        target_shard_bytes=20_000,
    )
    calls = []
    real = pipeline.split_indices
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "split_indices", lambda *a: calls.append(a) or real(*a))
        job.run_job(spec, "local", workers=1)
    return spec, tmp / "work", calls


def test_every_task_records_seconds_and_peak_rss(small_job):
    """``taskstats/<stage>-<rank>.json`` for each task of each stage, once it has finished."""
    spec, work, _ = small_job
    recs = {p.stem: json.loads(p.read_text()) for p in (work / "taskstats").iterdir()}
    expected = {f"{s}-{r:05d}" for s, n in job.stage_tasks(spec).items() for r in range(n)}
    assert set(recs) == expected
    for name, rec in recs.items():
        assert rec["stage"] == name.split("-")[0]
        assert 0 <= rec["end"] - rec["start"] < 600
        assert 20 << 20 < rec["max_rss"] < 64 << 30  # bytes: a Python process with numpy


def test_split_drawn_once_and_written_per_shard(small_job):
    """One task draws the split (one permutation of every kept document); each shard's
    validation positions are written for the encode tasks, which no longer draw it."""
    from llmkit.data.pipeline import split_indices

    spec, work, calls = small_job
    plan = json.loads((work / "plan.json").read_text())
    kept = [
        json.loads((work / f"admitted/s{s['index']:06d}.json").read_text())["kept"]
        for s in plan["shards"]
    ]
    assert len(kept) >= 3 and len(calls) == 1  # encode (2 tasks) drew it too before
    assert calls[0] == (sum(kept), spec.val_fraction, spec.seed)
    _, val = split_indices(sum(kept), spec.val_fraction, spec.seed)
    got, first = [], 0
    for i, n in enumerate(kept):
        local = np.load(work / f"split/s{i:06d}.npy")
        assert ((local >= 0) & (local < n)).all()
        got += (local + first).tolist()
        first += n
    assert got == val.tolist() and len(got) > 5
    counts = [json.loads((work / f"counts/s{i:06d}.json").read_text()) for i in range(len(kept))]
    assert sum(c["validation"]["documents"] for c in counts) == len(val)


def test_groups_read_only_repeated_keys_and_equal_all_records(tmp_path):
    """The groups stage turns into Python only the records whose (rule, key) repeats; the
    collision groups are those of every record."""
    import pyarrow as pa

    from llmkit.data.distributed.dedup import collision_groups

    rng = np.random.default_rng(0)
    work = job.Work(str(tmp_path))
    every = []
    for shard in range(3):
        keys = [int(k).to_bytes(8, "little") for k in rng.integers(0, 2**62, 300)]
        keys[:5] = [b"shared%02d" % i for i in range(5)]  # in every shard: groups of 3
        keys[5] = keys[6] = b"same-d%02d" % shard  # twice in one document: one member
        index = [0, 0, 0, 0, 0, 7, 7] + list(range(8, 301))
        rule = [shard % 2] * 300  # shards 0 and 2 under rule 0, shard 1 under rule 1
        recs = list(zip(rule, keys, [shard] * 300, index[:300], strict=True))
        every += recs
        cols = list(zip(*recs, strict=True))
        work.put_table(
            f"records/p00003/s{shard:06d}.parquet",
            pa.table(
                {
                    "rule": pa.array(cols[0], pa.int32()),
                    "key": pa.array(cols[1], pa.binary()),
                    "shard": pa.array(cols[2], pa.int64()),
                    "index": pa.array(cols[3], pa.int64()),
                }
            ),
        )
    got = job._repeated_records(work, 3)
    assert collision_groups(got) == collision_groups(every)
    assert collision_groups(got) == [
        (0, [(0, 0), (2, 0)]) for _ in range(5)
    ]  # shard 1 holds the shared keys under rule 1 alone
    # 5 shared keys x 3 shards, plus "same-d.." twice in each shard (repeated, then dropped
    # by collision_groups as one member), and nothing of the 3 x 293 unique keys
    assert len(got) == 15 + 6
    assert job._repeated_records(work, 0) == []


def test_local_workers_preload_the_job_in_the_forkserver(tmp_path, monkeypatch):
    """With more than one local worker, the forkserver imports the job, its steps and the
    tokenizer classes once (each stage's workers are forked from it); one worker (the
    tasks run in this process) leaves the forkserver as it is."""
    from multiprocess import forkserver

    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__"])
    spec = job.JobSpec(work_dir=str(tmp_path / "w"), inputs=[str(tmp_path)], tasks=2)
    job.build_executors(spec, "local", workers=1)
    assert forkserver._forkserver._preload_modules == ["__main__"]
    job.build_executors(spec, "local", workers=2)
    preload = forkserver._forkserver._preload_modules
    assert preload[0] == "__main__"
    assert {"llmkit.data.distributed.job", "transformers.tokenization_utils_fast"} <= set(preload)
    for name in preload[1:]:  # each importable here (a typo would silently cost the time)
        __import__(name)
