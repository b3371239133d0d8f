"""Shards of llmkit.data.distributed read, in order, exactly what the one-process reader reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import shared_file

from llmkit.data.distributed.shards import merge_file_stats, plan_shards, read_shard, shard_source
from llmkit.data.readers import discover_inputs, read_documents
from llmkit.errors import UserError

CORPORA = [
    "tinyshakespeare/input.txt",
    "tinystories/tinystories.txt",
    "gutenberg_en/pg1342.txt",  # BOM, CRLF line ends
    "gutenberg_zh/23950-0.txt",  # multi-byte UTF-8
    "wikitext2/test.txt",
    "dolma_cc_jsonl/cc_en_head-0091.jsonl",
    "dolma_cc_jsonl/cc_en_head-0091.jsonl.gz",  # compressed: one shard
    "dolma_docs/000.json.gz",
]


def _one_process(paths, **kw):
    files = discover_inputs(paths)
    docs = [d for f in files for d in read_documents(f, **kw)]
    return files, docs


def _sharded(paths, target, **kw):
    files = discover_inputs(paths)
    shards = plan_shards(files, target_bytes=target, **kw_plan(kw))
    sources, docs = [], []
    for sh in shards:
        src = shard_source(files, sh)
        docs.extend(read_shard(files, sh, source=src, **kw))
        sources.append(src)
    merge_file_stats(files, shards, sources)
    return files, shards, docs


def kw_plan(kw):
    return {k: v for k, v in kw.items() if k in ("split_on", "line_filter", "encoding")}


@pytest.mark.parametrize("target", [20_000, 300_000])
@pytest.mark.parametrize("max_document_bytes", [1 << 20, 2048])
def test_shards_in_order_equal_the_one_process_reader(target, max_document_bytes):
    paths = [shared_file(c) for c in CORPORA]
    kw = {"max_document_bytes": max_document_bytes}
    ref_files, ref = _one_process(paths, **kw)
    files, shards, docs = _sharded(paths, target, **kw)
    assert [s.index for s in shards] == list(range(len(shards)))
    # the big plain files were cut; the compressed ones were not
    per_file = [sum(s.file == i for s in shards) for i in range(len(files))]
    assert per_file[0] >= 1_115_394 // target // 2 and per_file[0] > 1
    assert per_file[6] == per_file[7] == 1
    assert len(docs) == len(ref)
    assert docs == ref
    for a, b in zip(files, ref_files, strict=True):
        assert a.as_dict() == b.as_dict()  # documents, sha256, pieces, fields per file


def test_shard_ids_are_stable():
    paths = [shared_file("tinyshakespeare/input.txt"), shared_file("wikitext2/test.txt")]
    a = plan_shards(discover_inputs(paths), target_bytes=100_000)
    b = plan_shards(discover_inputs(paths), target_bytes=100_000)
    assert a == b and len({s.id for s in a}) == len(a)
    assert a[-1].end == Path(paths[1]).stat().st_size
    # the ranges of a file tile it without a gap
    for prev, cur in zip(a, a[1:], strict=False):
        if prev.file == cur.file:
            assert prev.end == cur.start


def test_parquet_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, stories = _one_process([shared_file("tinystories/tinystories.txt")])
    texts = stories[:950] + [None] + stories[950:]
    path = tmp_path / "stories.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)
    ref_files, ref = _one_process([path], on_error="skip")
    files, shards, docs = _sharded([path], 1 << 30, on_error="skip")
    assert len(shards) == 13 and all(s.row_group == i for i, s in enumerate(shards))
    assert docs == ref and len(docs) == len(stories)
    assert files[0].as_dict() == ref_files[0].as_dict()
    assert files[0].skipped == {"missing field": 1}


def test_bad_line_in_a_range_names_the_file_line(tmp_path):
    text = shared_file("tinystories/tinystories.txt").read_bytes()
    cut = text.index(b"\n\n", 150_000)
    path = tmp_path / "bad.txt"
    path.write_bytes(text[:cut] + b"\n\nbad \xff byte\n\n" + text[cut:])
    line = text[:cut].count(b"\n") + 3
    files = discover_inputs([path])
    shards = plan_shards(files, target_bytes=50_000)
    assert len(shards) > 2
    with pytest.raises(UserError, match=rf"bad.txt:{line}: invalid UTF-8 \(byte 0xff"):
        for sh in shards:
            list(read_shard(files, sh))
    with pytest.raises(UserError, match=rf"bad.txt:{line}: invalid UTF-8"):
        list(read_documents(discover_inputs([path])[0]))
    ref_files, ref = _one_process([path], on_error="skip")
    files, _, docs = _sharded([path], 50_000, on_error="skip")
    assert docs == ref
    assert files[0].as_dict() == ref_files[0].as_dict()


def test_file_with_nul_byte_is_not_cut(tmp_path):
    text = shared_file("tinystories/tinystories.txt").read_bytes()
    path = tmp_path / "nul.txt"
    path.write_bytes(text[:120_000] + b"\x00" + text[120_000:])
    files = discover_inputs([path])
    assert len(plan_shards(files, target_bytes=20_000)) == 1
    ref_files, ref = _one_process([path], on_error="skip")
    files, _, docs = _sharded([path], 20_000, on_error="skip")
    assert docs == ref and files[0].as_dict() == ref_files[0].as_dict()
