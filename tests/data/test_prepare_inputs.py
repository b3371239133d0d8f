"""`llmkit prepare` inputs: every format, dotted fields, compression, BOM, --on-error."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from pathlib import Path

import pytest
from conftest import shared_file
from rich.console import Console
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.pipeline import prepare
from llmkit.data.readers import discover_inputs, read_documents
from llmkit.errors import UserError

ROWS = [
    {"id": 1, "meta": {"body": "first, with a comma"}, "text": "one"},
    {"id": 2, "meta": {"body": 'second "quoted"\nover two lines'}, "text": "two"},
    {"id": 3, "meta": {"body": "thr\u00e9e"}, "text": "three"},
]
BODIES = [r["meta"]["body"] for r in ROWS]


def docs_of(path: Path, **kwargs) -> list[str]:
    [source] = discover_inputs([path])
    return list(read_documents(source, **kwargs))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_dolma_jsonl_and_gz_load_to_identical_documents():
    plain = shared_file("dolma_cc_jsonl/cc_en_head-0091.jsonl")
    packed = shared_file("dolma_cc_jsonl/cc_en_head-0091.jsonl.gz")
    a, b = docs_of(plain), docs_of(packed)
    assert len(a) == 10 and a == b
    assert sum(len(d) for d in a) > 90_000
    [source] = discover_inputs([plain])
    list(read_documents(source))
    # metadata fields are counted per input file (10 records each)
    assert source.fields["metadata"] == 10 and source.fields["text"] == 10


def test_dolma_directory_of_several_files_and_nested_metadata_field():
    folder = shared_file("dolma_cc_jsonl/cc_en_head-0174.jsonl").parent
    files = discover_inputs([folder])
    assert [f.path.name for f in files] == [
        "cc_en_head-0091.jsonl",
        "cc_en_head-0091.jsonl.gz",
        "cc_en_head-0174.jsonl",
    ]
    urls = docs_of(folder / "cc_en_head-0174.jsonl", text_field="metadata.url")
    assert len(urls) == 10 and all(u.startswith("http") for u in urls)


def test_dolma_docs_json_gz_is_json_lines():
    docs = docs_of(shared_file("dolma_docs/000.json.gz"))
    assert len(docs) == 10


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz", ".zst"])
def test_jsonl_every_compression_and_dotted_field(tmp_path, suffix):
    import zstandard

    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS).encode()
    pack = {
        "": lambda b: b,
        ".gz": gzip.compress,
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
        ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
    }[suffix]
    f = tmp_path / f"c.jsonl{suffix}"
    f.write_bytes(pack(raw))
    assert docs_of(f, text_field="meta.body") == BODIES
    assert docs_of(f) == ["one", "two", "three"]


def test_json_array(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert docs_of(f, text_field="meta.body") == BODIES
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"},\n {"text": ]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json:2: malformed JSON"):
        docs_of(bad)


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_csv_and_tsv_with_bom_and_quoted_multiline_fields(tmp_path, delimiter):
    f = tmp_path / ("c.csv" if delimiter == "," else "c.tsv")
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter)
    w.writerow(["id", "body"])
    for r in ROWS:
        w.writerow([r["id"], r["meta"]["body"]])
    f.write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
    assert docs_of(f, text_field="body") == BODIES
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, body\)"):
        docs_of(f)


def test_parquet_flat_nested_and_compressed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), f)
    assert docs_of(f) == ["one", "two", "three"]
    assert docs_of(f, text_field="meta.body") == BODIES
    g = tmp_path / "c.parquet.gz"
    g.write_bytes(gzip.compress(f.read_bytes()))
    [source] = discover_inputs([g])
    assert list(read_documents(source)) == ["one", "two", "three"]
    import hashlib

    assert source.sha256 == hashlib.sha256(g.read_bytes()).hexdigest()


def test_gutenberg_bom_header_and_footer_are_removed(tmp_path):
    book = shared_file("gutenberg_en/pg11.txt")
    m = prepare(
        [str(book)],
        tmp_path / "out",
        split_on="none",
        vocab_size=300,
        block_size=64,
        val_fraction=0.0,
        console=quiet(),
        keep_dropped=True,
    )
    [entry] = m["inputs"]
    # 22 header lines + the START line; the END line and the 18.5 KB license after it
    assert entry["gutenberg_lines_removed"] > 300
    kept = m["stages"]["read"]["bytes_out"]
    assert 140_000 < kept < 170_596 - 18_000
    from llmkit.core.prepared import load_prepared

    data = load_prepared(tmp_path / "out")
    import pyarrow.compute as pc

    ids = pc.list_flatten(data.train.with_format("arrow")["input_ids"]).to_pylist()
    text = data.tokenizer.decode(ids)
    assert not text.startswith("\ufeff") and "\ufeff" not in text
    assert "Project Gutenberg" not in text and "START OF THE PROJECT" not in text
    assert text.startswith("[Illustration]")
    assert "their simple joys," in text  # the last paragraph (THE END falls in the tail)


def test_gutenberg_rule_can_be_turned_off(tmp_path):
    book = shared_file("gutenberg_en/pg11.txt")
    from llmkit.data.boilerplate import strip_gutenberg

    [source] = discover_inputs([book])
    kept = list(read_documents(source, split_on="none", line_filter=strip_gutenberg))[0]
    whole = list(read_documents(source, split_on="none"))[0]
    assert whole.startswith("The Project Gutenberg eBook of Alice")  # BOM gone
    assert len(whole) - len(kept) > 18_000
    assert source.removed_lines["gutenberg"] > 300


# ---------------------------------------------------------------------------------------------
# --on-error


def _bad_jsonl(tmp: Path) -> Path:
    f = tmp / "mixed.jsonl"
    f.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "broken"\n'
        b'{"body": "no text field"}\n'
        b'{"text": "caf\xe9 in latin-1"}\n'
        b'{"text": "good two"}\n'
    )
    return f


def test_on_error_fail_names_file_and_line(tmp_path):
    f = _bad_jsonl(tmp_path)
    with pytest.raises(UserError, match=r"mixed\.jsonl:2: malformed JSON"):
        docs_of(f)


def test_on_error_skip_counts_by_reason(tmp_path):
    f = _bad_jsonl(tmp_path)
    [source] = discover_inputs([f])
    assert list(read_documents(source, on_error="skip")) == ["good one", "good two"]
    assert source.skipped == {"malformed json": 1, "missing field": 1, "invalid utf-8": 1}
    assert source.first_error.endswith(
        "mixed.jsonl:2: malformed JSON (Expecting ',' delimiter at column 18)"
    ), source.first_error


def test_binary_file_is_skipped_whole(tmp_path):
    (tmp_path / "ok.txt").write_text("fine text\n\nmore fine text\n")
    (tmp_path / "blob.txt").write_bytes(b"header\n\x00\x01\x02binary\nmore\n")
    files = discover_inputs([tmp_path])
    docs = [d for f in files for d in read_documents(f, on_error="skip")]
    assert docs == ["header", "fine text", "more fine text"]
    assert files[0].skipped == {"binary": 1}


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


def test_cli_on_error_skip_writes_counts_in_the_manifest(tmp_path):
    f = _bad_jsonl(tmp_path)
    extra = tmp_path / "more.jsonl"
    extra.write_text(
        "".join(json.dumps({"text": f"document number {i} is here"}) + "\n" for i in range(40))
    )
    out = tmp_path / "out"
    failed = cli(str(f), str(extra), "-o", str(out), "--vocab-size", "300", "--block-size", "8")
    assert failed.exit_code == 2 and len(failed.stderr.splitlines()) == 1
    assert "mixed.jsonl:2: malformed JSON" in failed.stderr
    assert not out.exists()
    ok = cli(
        str(f),
        str(extra),
        "-o",
        str(out),
        "--vocab-size",
        "300",
        "--block-size",
        "8",
        "--on-error",
        "skip",
        "--json",
    )
    assert ok.exit_code == 0, ok.output
    m = json.loads(ok.stdout)
    assert m["stages"]["read"]["skipped"] == {
        "invalid utf-8": 1,
        "malformed json": 1,
        "missing field": 1,
    }
    assert m["inputs"][0]["skipped"] == m["stages"]["read"]["skipped"]
    assert m["stages"]["read"]["documents_out"] == 42
    assert m["settings"]["on_error"] == "skip"


def test_cli_empty_after_filtering_is_one_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("short one\n\nshort two\n\nshort three\n")
    result = cli(str(f), "-o", str(tmp_path / "new" / "out"), "--filter", "gopher_quality")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(
        "error: no documents left after cleaning (3 read; dropped: 3 gopher_min_words"
    )
    assert not (tmp_path / "new").exists()


def test_glob_of_real_files_and_metadata_field_counts_in_the_manifest(tmp_path):
    folder = shared_file("dolma_cc_jsonl/cc_en_head-0091.jsonl").parent
    m = prepare(
        [str(folder / "*.jsonl")],  # the .jsonl.gz does not match
        tmp_path / "out",
        vocab_size=300,
        block_size=64,
        plot=False,
        console=quiet(),
    )
    names = [Path(e["path"]).name for e in m["inputs"]]
    assert names == ["cc_en_head-0091.jsonl", "cc_en_head-0174.jsonl"]
    for entry in m["inputs"]:
        assert entry["documents"] == 10
        # every top-level field of the records, with the number of records holding it
        assert entry["fields"]["text"] == 10 and entry["fields"]["metadata"] == 10
        assert set(entry["fields"]) >= {"id", "metadata", "source", "text"}
    assert m["stages"]["read"]["documents_out"] == 20


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "bad.jsonl",
            '{"text": "abc}\n',
            ":1: malformed JSON (Unterminated string starting at column 10)",
        ),
        (
            "chat.jsonl",
            '{"messages": "abc}\n',
            ":1: malformed JSON (Unterminated string starting at column 14)",
        ),
        (
            "bad.json",
            '[{"text": "a\x01"}]\n',
            ":1: malformed JSON (Invalid control character at column 13)",
        ),
    ],
)
def test_malformed_json_names_its_position_with_one_at(tmp_path, name, content, expected):
    from llmkit.data.pipeline import prepare

    (tmp_path / name).write_text(content, encoding="utf-8")
    kwargs = {"format": "chat"} if name.startswith("chat") else {}
    with pytest.raises(UserError) as info:
        prepare([tmp_path / name], tmp_path / "out", cache=False, **kwargs)
    assert str(info.value).split(" — ")[0].endswith(name + expected)


DEEP = "[" * 100_000


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("deep.jsonl", '{"text": ' + DEEP + "}\n", "deep.jsonl:1: malformed JSON"),
        ("deep.json", "[" + DEEP + "]\n", "deep.json: malformed JSON"),
    ],
)
def test_json_nested_past_the_recursion_limit_is_malformed(tmp_path, name, content, expected):
    """json.loads raises RecursionError, not a JSONDecodeError, for such nesting: it was a
    traceback."""
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        prepare([tmp_path / name], tmp_path / "out", cache=False)
    assert info.value.message == (
        f"{tmp_path / expected} (nested more deeply than the JSON reader allows)"
    )
    if name.endswith(".jsonl"):  # skipped and counted like any malformed line
        (tmp_path / "ok.jsonl").write_text('{"text": "one document of text"}\n')
        m = prepare(
            [tmp_path / name, tmp_path / "ok.jsonl"],
            tmp_path / "out2",
            cache=False,
            on_error="skip",
            block_size=2,
            vocab_size=257,
            val_fraction=0,
            plot=False,
        )
        skipped = [f.get("skipped") for f in m["inputs"] if f["path"].endswith(name)]
        assert skipped == [{"malformed json": 1}], m["inputs"]
