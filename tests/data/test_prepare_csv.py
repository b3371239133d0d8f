"""CSV/TSV quoting in `llmkit prepare`: a quote left open used to swallow the next rows
silently (the csv module reads a quoted field to the next quote, across line breaks). Now it
is an error naming file:line where the record began, or under --on-error skip the record is
counted and the rows it swallowed are read back."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest
from conftest import shared_file

from llmkit.data.readers import discover_inputs, read_documents
from llmkit.errors import UserError


@pytest.fixture(scope="module")
def stories() -> list[str]:
    """Six real TinyStories stories (single-paragraph, with commas and quotes inside)."""
    text = shared_file("tinystories/tinystories.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    return docs[:6]


def _write_csv(path, stories: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(["id", "text"])
    for i, story in enumerate(stories):
        writer.writerow([i, story])
    path.write_text(out.getvalue(), encoding="utf-8")
    return out.getvalue()


def _read(path, **kwargs):
    [source] = discover_inputs([path])
    return list(read_documents(source, **kwargs)), source


def test_a_valid_csv_with_multiline_fields_reads_back(tmp_path, stories):
    f = tmp_path / "stories.csv"
    multi = [stories[0], stories[1] + '\n\nA second paragraph, "quoted".', stories[2]]
    _write_csv(f, multi)
    docs, source = _read(f, max_document_bytes=None)
    assert docs == multi and not source.skipped


def test_unterminated_quote_is_reported_at_its_line(tmp_path, stories):
    f = tmp_path / "stories.csv"
    text = _write_csv(f, stories)
    lines = text.split("\n")
    # Row of story 2 (line 4): drop its closing quote, so the field runs into the next rows.
    row = 4
    assert lines[row - 1].startswith('"2","') and lines[row - 1].endswith('"')
    lines[row - 1] = lines[row - 1][:-1]
    f.write_text("\n".join(lines), encoding="utf-8")

    with pytest.raises(UserError) as err:
        _read(f)
    assert err.value.message.startswith(f"{f}:{row}: a quoted field opened on line {row}")
    assert "never closed" in err.value.message and "--on-error skip" in err.value.hint

    docs, source = _read(f, on_error="skip")
    assert docs == stories[:2] + stories[3:]  # only the broken row is lost
    assert source.skipped == {"malformed csv": 1}
    assert source.first_error.startswith(f"{f}:{row}:")


def test_quote_open_to_the_end_of_the_file(tmp_path):
    f = tmp_path / "notes.csv"
    f.write_text('id,text\n1,ok\n2,"never closed\n3,lost\n4,lost too\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"notes\.csv:3: .*runs to the end of the file"):
        _read(f)
    docs, source = _read(f, on_error="skip")
    assert docs == ["ok", "lost", "lost too"] and source.skipped == {"malformed csv": 1}


def test_tsv_and_a_stray_quote_mid_field(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text('id\ttext\n1\t"a" b\n2\tfine\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"t\.tsv:2: malformed CSV row"):
        _read(f)
    docs, source = _read(f, on_error="skip")
    assert docs == ["fine"] and source.skipped == {"malformed csv": 1}


def test_cli_one_line(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text('id,text\n1,"open\n2,"closed"\n', encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "prepare", str(f), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{f}:2: a quoted field opened on line 2" in lines[0]


def test_a_field_past_the_limit_is_a_quote_left_open(tmp_path, monkeypatch):
    import llmkit.data.readers as readers

    monkeypatch.setattr(readers, "CSV_MAX_FIELD", 1000)
    f = tmp_path / "big.csv"
    body = "".join(f"{i},a line of text that the open quote swallows\n" for i in range(3, 100))
    f.write_text('id,text\n1,ok\n2,"open\n' + body, encoding="utf-8")
    with pytest.raises(UserError, match=r"big\.csv:3: a field that begins on line 3 runs past"):
        _read(f)
    docs, source = _read(f, on_error="skip")
    assert len(docs) == 98 and docs[0] == "ok" and source.skipped == {"malformed csv": 1}
    assert docs[-1] == "a line of text that the open quote swallows"
