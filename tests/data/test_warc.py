"""Web archives in `llmkit prepare`: WARC (.warc, .warc.gz: the main text of HTML responses
and resources) and WET (.wet, .warc.wet.gz: conversion records), one document per record with
its URL, record id and date; warcinfo/request/revisit/metadata records skipped and counted; a
truncated WARC is one error line naming the file (or skipped and counted). A WET file used to
be read as plain text (its WARC headers became documents) and a .warc.gz was refused."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from conftest import shared_file

from llmkit.data.pipeline import prepare
from llmkit.data.readers import discover_inputs, read_documents, read_warc
from llmkit.errors import UserError

pytest.importorskip("warcio")
pytest.importorskip("trafilatura")

EXAMPLE_TEXT = "This domain is established to be used for illustrative examples in documents."


def _source(path):
    [source] = discover_inputs([path])
    return source


def test_example_warc_gz_one_document_per_html_response():
    source = _source(shared_file("warc/example.warc.gz"))
    assert (source.kind, source.compression) == ("warc", ".gz")
    [doc] = list(read_warc(source))
    assert doc.url == "http://example.com/"
    assert doc.record_type == "response"
    assert doc.record_id == "<urn:uuid:a9c51e3e-0221-11e7-bf66-0242ac120005>"
    assert doc.date == "2017-03-06T04:02:06Z"
    assert doc.text.startswith(EXAMPLE_TEXT)
    assert "<" not in doc.text and "WARC/1.0" not in doc.text
    assert source.records_skipped == {"warcinfo": 2, "request": 2, "revisit": 1}
    assert source.sha256 is not None and not source.skipped


def test_chunked_response_and_resource_records():
    source = _source(shared_file("warc/example-iana.org-chunked.warc"))
    [doc] = list(read_documents(source))
    assert doc.startswith("Domain Names\nManagement of the DNS Root Zone")
    assert "\r\n" not in doc and "Transfer-Encoding" not in doc
    assert source.records_skipped == {"warcinfo": 1, "request": 1}

    source = _source(shared_file("warc/example-resource.warc.gz"))
    [doc] = list(read_warc(source))
    assert (doc.record_type, doc.url) == ("resource", "http://example.com/")
    assert doc.text.startswith(EXAMPLE_TEXT)
    assert source.records_skipped == {"warcinfo": 2}


def test_truncated_warc_is_one_error_or_skipped_and_counted(tmp_path):
    path = shared_file("warc/example-trunc.warc")
    with pytest.raises(UserError) as err:
        list(read_warc(_source(path)))
    assert err.value.message.startswith(f"{path}: record 3 (response http://example.com/")
    assert "damaged" in err.value.message and "--on-error skip" in err.value.hint
    source = _source(path)
    assert list(read_warc(source, on_error="skip")) == []
    assert source.skipped == {"damaged record": 1}
    assert source.records_skipped == {"warcinfo": 2, "request": 1}

    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "prepare", str(path), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: record 3")


def test_gzip_cut_short_names_the_file(tmp_path):
    data = shared_file("warc/example.warc.gz").read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.warc\.gz"):
        list(read_warc(_source(cut)))
    source = _source(cut)
    list(read_warc(source, on_error="skip"))
    assert source.skipped == {"damaged record": 1}


PAGES = [
    ("https://example.org/a", "The first page of the crawl.\nIt has two lines of text."),
    ("https://example.org/b", "Zweite Seite: Größe, Übung und Straße.\n\nMit einem Absatz."),
]


def _write_wet(path, gzip: bool) -> None:
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip)
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "llmkit tests"}))
        for url, text in PAGES:
            writer.write_record(
                writer.create_warc_record(
                    url,
                    "conversion",
                    payload=io.BytesIO(text.encode("utf-8")),
                    warc_content_type="text/plain",
                )
            )
        writer.write_record(
            writer.create_warc_record(
                "https://example.org/a",
                "metadata",
                payload=io.BytesIO(b"fetchTimeMs: 12\n"),
                warc_content_type="application/warc-fields",
            )
        )


@pytest.mark.parametrize("name,gzip", [("crawl.warc.wet.gz", True), ("crawl.wet", False)])
def test_wet_conversion_records(tmp_path, name, gzip):
    path = tmp_path / name
    _write_wet(path, gzip)
    source = _source(path)
    docs = list(read_warc(source))
    assert [(d.url, d.text, d.record_type) for d in docs] == [
        (url, text, "conversion") for url, text in PAGES
    ]
    assert all(d.record_id.startswith("<urn:uuid:") and d.date for d in docs)
    assert source.records_skipped == {"warcinfo": 1, "metadata": 1}


def test_prepare_reads_warc_and_wet(tmp_path):
    wet = tmp_path / "crawl.warc.wet.gz"
    _write_wet(wet, True)
    m = prepare(
        [wet, shared_file("warc/example.warc.gz"), shared_file("warc/example-resource.warc.gz")],
        tmp_path / "out",
        vocab_size=300,
        block_size=8,
        val_fraction=0.0,
        plot=False,
        num_proc=1,
        clean={"dedup": {"exact": False, "near": False}, "filters": {"length": {"min_chars": 1}}},
    )
    read = m["stages"]["read"]
    assert read["documents_out"] == 4
    assert read["records_skipped"] == {"metadata": 1, "request": 2, "revisit": 1, "warcinfo": 5}
    assert [e["documents"] for e in m["inputs"]] == [2, 1, 1]
    assert m["inputs"][1]["records_skipped"] == {"request": 2, "revisit": 1, "warcinfo": 2}
    assert m["splits"]["train"]["documents"] == 4


def test_dropped_pages_keep_their_url(tmp_path):
    import json

    m = prepare(
        [shared_file("warc/example-iana.org-chunked.warc"), shared_file("warc/example.warc.gz")],
        tmp_path / "out",
        vocab_size=300,
        block_size=8,
        val_fraction=0.0,
        plot=False,
        num_proc=1,
        keep_dropped=True,
        clean={"filters": {"length": {"min_chars": 500}}},
    )
    assert m["stages"]["read"]["documents_out"] == 2
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").open()]
    assert [(d["url"], d["stage"]) for d in dropped] == [("http://example.com/", "length")]
    assert dropped[0]["text"].startswith(EXAMPLE_TEXT)
    assert m["splits"]["train"]["documents"] == 1
    # read_documents gives the URL of each document on request.
    [source] = discover_inputs([shared_file("warc/example.warc.gz")])
    [(url, text)] = list(read_documents(source, with_url=True))
    assert url == "http://example.com/" and text.startswith(EXAMPLE_TEXT)


def test_text_named_warc_is_not_read_as_records(tmp_path):
    fake = tmp_path / "notes.warc"
    fake.write_text("Just some text.\n\nNot an archive at all.\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"notes\.warc: not a WARC file \("):
        list(read_warc(_source(fake)))
    source = _source(fake)
    assert list(read_warc(source, on_error="skip")) == [] and source.skipped == {
        "damaged record": 1
    }
