"""`llmkit prepare` at scale: --num-proc, the cache and its fingerprints, progress bars, Hub
dataset inputs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from conftest import shared_file
from rich.console import Console
from typer.testing import CliRunner

import llmkit
import llmkit.data.pipeline as pipeline
from llmkit.cli import app
from llmkit.core.prepared import load_prepared


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "llmkit-cache"
    monkeypatch.setenv("LLMKIT_CACHE", str(root))
    return root


def run(inputs, output, log: io.StringIO | None = None, **kwargs) -> dict:
    console = Console(file=log if log is not None else io.StringIO(), width=400)
    kwargs.setdefault("plot", False)
    return pipeline.prepare([str(p) for p in inputs], output, console=console, **kwargs)


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", "--no-plot", *args])


def rows(path: Path, split: str) -> list[list[int]]:
    return getattr(load_prepared(path), split)["input_ids"]


# ---------------------------------------------------------------------------------------------
# --num-proc: the same output as one process, on real text, every default stage doing work.


@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory) -> list[Path]:
    """Shared corpora: dolma CC (the .jsonl and its .gz: exact duplicates), dolma docs
    (e-mails and phone numbers), the first 40 kB of TinyStories, and the three licenses as one
    JSON-lines file (two MIT near-duplicates)."""
    tmp = tmp_path_factory.mktemp("real")
    stories = tmp / "tinystories_40k.txt"
    text = shared_file("tinystories/tinystories.txt").read_text(encoding="utf-8")
    stories.write_text(text[: text.index("\n\n", 40_000)], encoding="utf-8")
    licenses = tmp / "licenses.jsonl"
    names = ["rails_mit_license.txt", "react_mit_license.txt", "pytorch_license.txt"]
    texts = [shared_file(f"fuzzy_dup_licenses/{n}").read_text(encoding="utf-8") for n in names]
    licenses.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return [
        shared_file("dolma_cc_jsonl/cc_en_head-0091.jsonl"),
        shared_file("dolma_cc_jsonl/cc_en_head-0091.jsonl.gz"),
        shared_file("dolma_docs/000.json.gz"),
        licenses,
        stories,
    ]


def test_num_proc_2_gives_the_same_documents_blocks_and_counts(real_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)  # parallel even on 0.5 MB
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES_ENCODE", 1)
    kw = dict(vocab_size=300, block_size=64, keep_dropped=True, cache=False)
    logs = {1: io.StringIO(), 2: io.StringIO()}
    one = run(real_corpus, tmp_path / "one", logs[1], num_proc=1, **kw)
    two = run(real_corpus, tmp_path / "two", logs[2], num_proc=2, **kw)
    assert "cleaned in 1 process" in logs[1].getvalue()
    assert "cleaned in 2 processes" in logs[2].getvalue()
    # every default stage did something, so the comparison covers it
    st = one["stages"]
    assert st["deduplicate"]["dropped"]["duplicate"] >= 10  # the .gz copy, and more
    assert st["near_dedup"]["dropped"] == {"near_duplicate": 1}  # the React MIT license
    assert st["pii"]["replaced"]["email"] == 3 and st["pii"]["documents_changed"] >= 3
    assert st["read"]["documents_out"] > 200
    # the manifests differ in the num_proc setting and the time only
    assert (one["settings"]["num_proc"], two["settings"]["num_proc"]) == (1, 2)
    for m in (one, two):
        del m["settings"]["num_proc"], m["created"]
    assert one == two
    for split in ("train", "validation"):
        a, b = rows(tmp_path / "one", split), rows(tmp_path / "two", split)
        assert len(a) == one["splits"][split]["blocks"] > 0
        assert a == b
    dropped = (tmp_path / "one" / "dropped.jsonl").read_text(encoding="utf-8")
    assert dropped == (tmp_path / "two" / "dropped.jsonl").read_text(encoding="utf-8")
    reasons = [json.loads(line)["reason"] for line in dropped.splitlines()]
    assert sorted(set(reasons)) == ["duplicate", "near_duplicate"]
    assert len(reasons) == st["deduplicate"]["dropped"]["duplicate"] + 1


def test_default_num_proc_is_every_usable_core(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\n".join(f"document {i} says hello" for i in range(30)), encoding="utf-8")
    m = run([f], tmp_path / "out", vocab_size=300, block_size=8)
    assert m["settings"]["num_proc"] == len(os.sched_getaffinity(0))


def test_every_stage_has_a_progress_bar_and_workers_report_progress(
    real_corpus, tmp_path, monkeypatch
):
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)
    tasks: dict[str, list] = {}
    task = pipeline._Report.task

    def spy(self, description, total=None):
        advanced = tasks.setdefault(description, [total, 0])
        cm = task(self, description, total)

        class Wrapped:
            def __enter__(self):
                advance = cm.__enter__()

                def counting(n=1):
                    advanced[1] += n
                    advance(n)

                return counting

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(pipeline._Report, "task", spy)
    m = run(real_corpus[:3], tmp_path / "out", vocab_size=300, block_size=64, num_proc=2)
    n_read = m["stages"]["read"]["documents_out"]
    # the cleaning steps' three groups (llmkit.data.executor): per-document steps on the
    # workers, de-duplication's resolve in order, PII on the workers
    clean = [d for d in tasks if d.startswith("clean: normalize, length, ")]
    assert len(clean) == 1
    resolve = "deduplicate: deduplicate, near_dedup (documents)"
    pii = "clean: pii (documents)"
    expected = {
        "hash inputs (bytes)",
        "read (bytes)",
        clean[0],
        resolve,
        pii,
        "save the cleaned documents",
        "train tokenizer (documents)",
        "tokenize train (documents)",
        "pack train (documents)",
        "tokenize validation (documents)",
        "pack validation (documents)",
    }
    assert set(tasks) == expected
    # the two worker processes' documents reach the bar through shared memory
    assert tasks[clean[0]] == [n_read, n_read]
    n_deduplicated = m["stages"]["deduplicate"]["documents_in"]
    assert tasks[resolve] == [n_deduplicated, n_deduplicated]
    n_pii = m["stages"]["pii"]["documents_in"]
    assert tasks[pii] == [n_pii, n_pii] and 0 < n_pii < n_read
    assert tasks["read (bytes)"][1] == m["stages"]["read"]["bytes_out"]
    assert tasks["hash inputs (bytes)"] == [m["stages"]["read"]["bytes_in"]] * 2


# ---------------------------------------------------------------------------------------------
# The cache: reuse, and what invalidates it.


@pytest.fixture
def small(tmp_path) -> Path:
    f = tmp_path / "input" / "corpus.jsonl"
    f.parent.mkdir()
    texts = [f"Document number {i} talks about item {i * 7} and nothing else." for i in range(60)]
    texts += ["short", "write to jane@example.com today, or call (555) 123-4567 soon."]
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return f


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_rerun_is_up_to_date_and_does_nothing(small, tmp_path, cache_in_tmp):
    out = tmp_path / "out"
    first = cli(str(small), "-o", str(out), "--vocab-size", "300", "--block-size", "16")
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cache"] == {
        "used": False,
        "stored": True,
        "path": str(cache_in_tmp / "prepare" / manifest["fingerprint"]["cleaning"]),
    }
    before = snapshot(out)
    again = cli(str(small), "-o", str(out), "--vocab-size", "300", "--block-size", "16", "--json")
    assert again.exit_code == 0, again.output
    assert "is up to date" in again.stderr
    assert json.loads(again.stdout) == manifest
    assert snapshot(out) == before  # nothing rewritten
    # a different setting after cleaning is not up to date (and needs --overwrite)
    other = cli(str(small), "-o", str(out), "--vocab-size", "300", "--block-size", "8")
    assert other.exit_code == 2 and "--overwrite" in other.stderr
    # --no-cache does not skip: the existing output needs --overwrite
    forced = cli(
        str(small), "-o", str(out), "--vocab-size", "300", "--block-size", "16", "--no-cache"
    )
    assert forced.exit_code == 2 and "already exists" in forced.stderr


@pytest.mark.parametrize("damage", ["truncated arrow", "pickle info"])
def test_a_damaged_cache_entry_is_cleaned_again_and_replaced(small, tmp_path, cache_in_tmp, damage):
    """A cache entry damaged by hand was a TypeError traceback on every later run (it was
    cleaned again, then the damaged entry kept as 'stored by another run' and read back as
    None). Now the documents are cleaned again, the entry replaced, and the rows are the
    same; a pickle put in the entry is never loaded."""
    import pickle

    first = run([small], tmp_path / "a", vocab_size=300, block_size=16)
    entry = Path(first["cache"]["path"])
    marker = tmp_path / "pwned"
    if damage == "truncated arrow":
        arrow = next((entry / "documents").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:

        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        (entry / "cleaned.json").write_bytes(pickle.dumps(Evil()))
    again = cli(str(small), "-o", str(tmp_path / "b"), "--vocab-size", "300", "--block-size", "16")
    assert again.exit_code == 0, again.output
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert second["cache"] == {"used": False, "stored": True, "path": str(entry)}
    assert second["splits"] == first["splits"] and not marker.exists()
    third = run([small], tmp_path / "c", vocab_size=300, block_size=16)
    assert third["cache"]["used"]  # the replaced entry is whole


def test_changing_only_the_tokenizer_or_blocks_reuses_the_cleaned_documents(
    small, tmp_path, cache_in_tmp
):
    first = run([small], tmp_path / "a", vocab_size=300, block_size=16, keep_dropped=True)
    assert first["cache"]["stored"] and not first["cache"]["used"]
    entry = Path(first["cache"]["path"])
    assert entry.parent == cache_in_tmp / "prepare"
    before = snapshot(cache_in_tmp)
    log = io.StringIO()
    second = run([small], tmp_path / "b", log, vocab_size=320, block_size=8, keep_dropped=True)
    assert second["cache"] == {"used": True, "stored": False, "path": str(entry)}
    assert "reused from the cache" in log.getvalue() and "cleaned in" not in log.getvalue()
    assert second["fingerprint"]["cleaning"] == first["fingerprint"]["cleaning"]
    assert second["fingerprint"]["full"] != first["fingerprint"]["full"]
    for key in ("stages", "length_histogram", "inputs"):
        assert second[key] == first[key]
    assert second["splits"]["train"]["documents"] == first["splits"]["train"]["documents"]
    assert (tmp_path / "b" / "dropped.jsonl").read_text() == (
        tmp_path / "a" / "dropped.jsonl"
    ).read_text()
    assert snapshot(cache_in_tmp) == before  # nothing written into the cache entry
    assert sorted(p.name for p in small.parent.iterdir()) == ["corpus.jsonl"]
    # --no-cache reads and cleans again, to the same result
    third = run(
        [small], tmp_path / "c", vocab_size=300, block_size=16, keep_dropped=True, cache=False
    )
    assert third["cache"] == {
        "used": False,
        "stored": False,
        "path": None,
        "note": "off (--no-cache)",
    }
    assert third["stages"] == first["stages"] and third["fingerprint"] == first["fingerprint"]


def _changed_threshold(small, monkeypatch):
    return {"clean": {"filters": {"length": {"min_chars": 6}}}}


def _changed_input(small, monkeypatch):
    text = small.read_text(encoding="utf-8")
    small.write_text(text.replace("item 7 ", "item 8 "), encoding="utf-8")  # same size
    return {}


def _changed_version(small, monkeypatch):
    monkeypatch.setattr(llmkit, "__version__", llmkit.__version__ + ".post1")
    return {}


@pytest.mark.parametrize("change", [_changed_threshold, _changed_input, _changed_version])
def test_a_changed_threshold_input_or_version_invalidates(small, tmp_path, monkeypatch, change):
    size = small.stat().st_size
    first = run([small], tmp_path / "a", vocab_size=300, block_size=16)
    kwargs = change(small, monkeypatch)
    assert small.stat().st_size == size
    second = run([small], tmp_path / "a", vocab_size=300, block_size=16, overwrite=True, **kwargs)
    assert second["cache"]["used"] is False and second["cache"]["stored"] is True
    assert second["fingerprint"]["cleaning"] != first["fingerprint"]["cleaning"]
    assert second["created"] >= first["created"]
    if change is _changed_threshold:
        assert second["stages"]["length"]["dropped"] == {"too_short": 1}
        assert first["stages"]["length"]["dropped"] == {}
    if change is _changed_input:
        assert second["inputs"][0]["sha256"] != first["inputs"][0]["sha256"]
    if change is _changed_version:
        assert second["llmkit_version"].endswith(".post1")
    # and the new settings are up to date in turn
    log = io.StringIO()
    run([small], tmp_path / "a", log, vocab_size=300, block_size=16, **kwargs)
    assert "is up to date" in log.getvalue()


def test_llmkit_cache_off_still_fingerprints(small, tmp_path, monkeypatch, cache_in_tmp):
    monkeypatch.setenv("LLMKIT_CACHE", "off")
    m = run([small], tmp_path / "a", vocab_size=300, block_size=16)
    assert m["cache"]["note"] == "off (LLMKIT_CACHE=off)" and not cache_in_tmp.exists()
    log = io.StringIO()
    run([small], tmp_path / "a", log, vocab_size=300, block_size=16)
    assert "is up to date" in log.getvalue()


# ---------------------------------------------------------------------------------------------
# Hub dataset ids.


class FakeStream:
    """What load_dataset(..., streaming=True) returns: an iterable of records."""

    def __init__(self, records):
        self.records = records

    def __iter__(self):
        return iter(self.records)


def test_hub_dataset_id_is_streamed_with_the_text_field(tmp_path, monkeypatch):
    import datasets

    import llmkit.data.readers as readers

    records = [
        {"id": i, "story": {"body": f"Story {i}: the cat sat on mat {i}."}} for i in range(40)
    ]
    calls = []

    def fake_load_dataset(path, name=None, *, split=None, streaming=False, **kw):
        calls.append((path, name, split, streaming))
        return FakeStream(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(readers, "hub_unreachable", lambda: None)
    result = cli(
        "someone/stories:tiny",
        "-o",
        str(tmp_path / "out"),
        "--split",
        "validation",
        "--text-field",
        "story.body",
        "--vocab-size",
        "300",
        "--block-size",
        "8",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert calls == [("someone/stories", "tiny", "validation", True)]
    m = json.loads(result.stdout)
    [entry] = m["inputs"]
    assert entry["path"] == "someone/stories" and entry["hub"] is True
    assert (entry["config"], entry["split"], entry["documents"]) == ("tiny", "validation", 40)
    assert entry["fields"] == {"id": 40, "story": 40}
    assert m["stages"]["read"]["documents_out"] == 40
    assert m["settings"]["hub_split"] == "validation"
    assert m["cache"]["note"] == "Hub datasets are not cached" and m["fingerprint"] is None
    text = load_prepared(tmp_path / "out").tokenizer.decode(rows(tmp_path / "out", "train")[0])
    assert text.startswith("Story ")


def test_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("someone/stories", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "someone/stories is not a local path" in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "out").exists()


def test_hub_dataset_without_network_is_one_line(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    result = cli("someone/stories:cfg", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "the Hub dataset someone/stories cannot be loaded: no network (127.0.0.1:9" in line
    # a missing file with an extension is a missing file, not a dataset
    missing = cli("data/corpus.txt", "-o", str(tmp_path / "out"))
    assert missing.exit_code == 2 and "data/corpus.txt does not exist" in missing.stderr
