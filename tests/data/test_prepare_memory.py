"""Bounded memory in `llmkit prepare` for any document size: a document longer than
--max-document-bytes (default 1 MiB) is cut into pieces at paragraph / line / sentence / word
boundaries, and a text file is cut as it is read (a line is read 1 MiB at a time), so no step
ever holds more than about that much of one document. Before, a 50 MB file with no newline
peaked at 10.4 GB (the BPE trainer, MinHash shingles and the encoder each take tens to hundreds
of times a document's size) and died under a memory limit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tracemalloc

import pytest
from conftest import shared_file

from llmkit.data.pipeline import prepare
from llmkit.data.readers import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    discover_inputs,
    read_documents,
    split_blank_lines,
    split_document,
)
from llmkit.errors import UserError


@pytest.fixture(scope="module")
def one_line(tmp_path_factory) -> tuple[str, object]:
    """8 MB of tiny Shakespeare with every line break made a space: one 8 MB line."""
    text = shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8").replace("\n", " ")
    text = (text * 8)[:8_000_000]
    path = tmp_path_factory.mktemp("mem") / "one_line.txt"
    path.write_text(text, encoding="utf-8")
    return text, path


def test_split_document_rule():
    text = "First sentence here. Second one!\n\nA new paragraph, with words.\nLast line"
    pieces = split_document(text, 40)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 40 for p in pieces)
    # Cut at the paragraph break, the best boundary in the window; the rest fits.
    assert pieces == ["First sentence here. Second one!\n\n", text[34:]]
    # Smaller windows: a sentence end in the second half of the first window; none in the
    # second half of the next one (the paragraph break lies in its first half): a space.
    assert split_document(text, 30)[:2] == [
        "First sentence here. ",
        "Second one!\n\nA new paragraph, ",
    ]
    assert split_document(text, 1000) == [text]
    with pytest.raises(ValueError):
        split_document(text, 3)


def test_split_document_sentences_words_cjk_and_no_whitespace():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    pieces = split_document(words, 20)
    assert "".join(pieces) == words and all(p.endswith(" ") for p in pieces[:-1])
    assert all(10 <= len(p.encode()) <= 20 for p in pieces[:-1])  # at least half the window
    zh = "天下大勢，分久必合，合久必分。周末七國分爭，并入於秦。及秦滅之後，楚、漢分爭。"
    pieces = split_document(zh, 48)
    assert "".join(pieces) == zh and pieces[0].endswith("。")
    assert all(len(p.encode()) <= 48 for p in pieces)
    run = "é" * 100  # 200 bytes, no boundary at all: cut between characters
    pieces = split_document(run, 25)
    assert "".join(pieces) == run and all(len(p.encode()) <= 25 for p in pieces)


def test_split_blank_lines_bounds_each_document():
    lines = ["word " * 50 + "\n"] * 10 + ["\n", "short\n"]
    docs = list(split_blank_lines(lines, max_bytes=600))
    assert docs[-1] == "short"
    assert "".join(docs[:-1]) + "\n" == "".join(lines[:10])
    assert all(len(d.encode()) <= 600 for d in docs)


def test_reading_a_huge_line_holds_about_one_piece(one_line):
    text, path = one_line
    [source] = discover_inputs([path])
    tracemalloc.start()
    sizes = []
    joined_ok = True
    offset = 0
    for piece in read_documents(source, max_document_bytes=256 * 1024):
        sizes.append(len(piece.encode()))
        joined_ok = joined_ok and text.startswith(piece, offset)
        offset += len(piece)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert joined_ok and offset == len(text)  # nothing lost, nothing reordered
    assert max(sizes) <= 256 * 1024 and len(sizes) == source.pieces >= 31
    assert source.documents_split == 1 and source.documents == len(sizes)
    # The old reader held the whole 8 MB line (bytes and str): at least 16 MB.
    assert peak < 6_000_000, f"peak {peak / 1e6:.1f} MB while reading an 8 MB line"


def test_structured_records_are_cut_too(tmp_path):
    import json

    big = "Lorem ipsum dolor sit amet. " * 200  # 5,600 bytes
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": big}) + "\n" + json.dumps({"text": "small"}) + "\n")
    [source] = discover_inputs([f])
    docs = list(read_documents(source, max_document_bytes=2048))
    assert "".join(docs[:-1]) == big and docs[-1] == "small"
    assert all(len(d) <= 2048 for d in docs)
    assert (source.documents_split, source.pieces, source.documents) == (1, len(docs) - 1, 4)
    with pytest.raises(UserError, match="--max-document-bytes 100 is too small"):
        list(read_documents(source, max_document_bytes=100))


def test_prepare_counts_the_pieces_and_every_token(tmp_path, one_line):
    text, _ = one_line
    f = tmp_path / "line.txt"
    f.write_text(text[:400_000], encoding="utf-8")
    m = prepare(
        [f],
        tmp_path / "out",
        vocab_size=300,
        block_size=64,
        val_fraction=0.0,
        plot=False,
        num_proc=1,
        max_document_bytes=64 * 1024,
        clean={"dedup": {"near": False}},
    )
    expected = split_document(text[:400_000], 64 * 1024)
    read = m["stages"]["read"]
    assert read["documents_split"] == 1 and read["pieces"] == len(expected) == 7
    assert read["documents_out"] == len(expected) and read["bytes_out"] == 400_000
    assert m["settings"]["max_document_bytes"] == 64 * 1024
    train = m["splits"]["train"]
    assert train["documents"] == len(expected)
    assert train["tokens"] == train["blocks"] * 64 + train["tail_tokens"]
    assert DEFAULT_MAX_DOCUMENT_BYTES == 1 << 20


def _limit_memory(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


@pytest.mark.slow
def test_prepare_a_huge_line_under_a_memory_limit(tmp_path, one_line):
    """8 MB on one line under a 2.5 GiB address-space limit. Measured here: the old code
    aborted (SIGABRT in the tokenizer, no error line) after 33 s at 1.04 GB resident; now
    25 s, 0.79 GB resident. Threads and malloc arenas are capped so that the virtual size does
    not grow with the number of cores."""
    _, path = one_line
    env = {
        **os.environ,
        "LLMKIT_CACHE": "off",
        "MALLOC_ARENA_MAX": "2",
        "RAYON_NUM_THREADS": "2",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "prepare", str(path), "-o", str(out), "--json"]
        + ["--num-proc", "1", "--no-plot", "--no-near-dedup", "--block-size", "128"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_memory(2500 << 20),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    m = json.loads(proc.stdout)
    read = m["stages"]["read"]
    assert read["documents_split"] == 1 and read["pieces"] == 8
    assert read["bytes_out"] == 8_000_000
    tokens = sum(s["tokens"] for s in m["splits"].values())
    blocks = sum(s["blocks"] for s in m["splits"].values())
    tails = sum(s["tail_tokens"] for s in m["splits"].values())
    assert tokens == blocks * 128 + tails and tokens > 2_000_000


def test_batches_hold_a_bounded_amount_of_text():
    from llmkit.data.pipeline import BATCH_BYTES, BATCH_DOCUMENTS, batch_rows

    assert batch_rows(100) == BATCH_DOCUMENTS == 1000  # short documents: unchanged
    assert batch_rows(DEFAULT_MAX_DOCUMENT_BYTES) == BATCH_BYTES // (1 << 20) == 4
    assert batch_rows(1 << 30) == 1 and batch_rows(0) == 1000


def test_long_lines_read_in_pieces_keep_characters_and_line_numbers(tmp_path):
    from llmkit.data.readers import _Partial, iter_lines

    zh = "天下大勢，分久必合，合久必分。" * 100  # 4,500 bytes, 3 bytes a character
    f = tmp_path / "zh.txt"
    f.write_bytes(("\ufeff" + zh + "\r\nnext line\n" + zh[:10]).encode("utf-8"))
    [source] = discover_inputs([f])
    pieces = list(iter_lines(source, chunk_bytes=1000))
    assert "".join(p for n, p in pieces if n == 1) == zh + "\n"
    assert all(isinstance(p, _Partial) for n, p in pieces if n == 1 and not p.endswith("\n"))
    assert [p for n, p in pieces if n > 1] == ["next line\n", zh[:10]]
    assert {n for n, _ in pieces} == {1, 2, 3}


def test_invalid_byte_in_a_long_line_skips_that_line_only(tmp_path):
    from llmkit.data.readers import iter_lines

    f = tmp_path / "bad.txt"
    f.write_bytes(b"a" * 3000 + b"\xff" + b"b" * 3000 + b"\nfine\n")
    [source] = discover_inputs([f])
    with pytest.raises(UserError, match=r"bad\.txt:1: invalid UTF-8 \(byte 0xff at column 3001\)"):
        list(iter_lines(source, chunk_bytes=1000))
    [source] = discover_inputs([f])
    # The pieces read before the bad one are already out (streaming); the rest of the line
    # is skipped, and the next line read.
    assert list(iter_lines(source, "skip", chunk_bytes=1000)) == [
        (1, "a" * 1000),
        (1, "a" * 1000),
        (1, "a" * 1000),
        (2, "fine\n"),
    ]
    assert source.skipped == {"invalid utf-8": 1}


def test_the_last_line_without_a_line_break_is_a_whole_line(tmp_path):
    from llmkit.data.readers import _Partial, iter_lines

    f = tmp_path / "end.txt"
    f.write_text("doc one\n\nlast words", encoding="utf-8")
    [source] = discover_inputs([f])
    lines = list(iter_lines(source, chunk_bytes=1000))
    assert lines == [(1, "doc one\n"), (2, "\n"), (3, "last words")]
    assert not any(isinstance(line, _Partial) for _, line in lines)
    f.write_text("doc one\n\n   \t", encoding="utf-8")  # a blank last line gives no document
    [source] = discover_inputs([f])
    assert list(read_documents(source)) == ["doc one"] and source.documents == 1
