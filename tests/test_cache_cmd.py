"""The prepare cache is bounded (LLMKIT_CACHE_MAX_GB, least recently used entries removed after
each write) and `llmkit cache info|clear` shows and removes it; it used to grow forever. An
unusable LLMKIT_CACHE is a warning line, not only a note in the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import shared_file

from llmkit.cli.cache import parse_age
from llmkit.core.cache import (
    CleanCache,
    cache_entries,
    cache_problem,
    evict,
    max_cache_bytes,
)
from llmkit.data.pipeline import prepare
from llmkit.errors import UserError


def _fake_entry(root, key: str, size: int, age_s: float):
    """A complete entry of ``size`` bytes last used ``age_s`` seconds ago."""
    path = root / "prepare" / key
    (path / "documents").mkdir(parents=True)
    (path / "documents" / "data.arrow").write_bytes(b"x" * size)
    (path / "cleaned.json").write_text(json.dumps({"format": 1, "key": key}))
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_evict_least_recently_used_keeps_the_newest(tmp_path):
    old = _fake_entry(tmp_path, "a" * 64, 400_000, 3 * 86400)
    mid = _fake_entry(tmp_path, "b" * 64, 300_000, 2 * 86400)
    new = _fake_entry(tmp_path, "c" * 64, 500_000, 10)
    entries = cache_entries(tmp_path)
    assert [e.path for e in entries] == [old, mid, new]
    sizes = [e.size_bytes for e in entries]
    assert sizes[0] >= 400_000 and sum(sizes) < 1_250_000
    assert evict(tmp_path, None) == (0, 0)
    removed, freed = evict(tmp_path, 900_000, keep=new)
    assert (removed, freed) == (1, sizes[0])
    assert not old.exists() and mid.exists() and new.exists()
    # The entry just stored is kept even when it alone is over the bound.
    removed, _ = evict(tmp_path, 1, keep=new)
    assert removed == 1 and not mid.exists() and new.exists()


def test_max_cache_bytes_from_the_environment(monkeypatch):
    monkeypatch.delenv("LLMKIT_CACHE_MAX_GB", raising=False)
    assert max_cache_bytes() == 20_000_000_000
    monkeypatch.setenv("LLMKIT_CACHE_MAX_GB", "0.5")
    assert max_cache_bytes() == 500_000_000
    monkeypatch.setenv("LLMKIT_CACHE_MAX_GB", "off")
    assert max_cache_bytes() is None
    monkeypatch.setenv("LLMKIT_CACHE_MAX_GB", "lots")
    with pytest.raises(UserError, match="LLMKIT_CACHE_MAX_GB=lots"):
        max_cache_bytes()


def test_a_reused_entry_becomes_the_most_recent(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    corpus = shared_file("tinystories/tinystories.txt")
    kw = dict(vocab_size=300, block_size=16, plot=False, num_proc=1)
    first = prepare([corpus], tmp_path / "a", **kw)
    entry = first["cache"]["path"]
    old = _fake_entry(tmp_path / "cache", "d" * 64, 1000, 3600)
    os.utime(entry, (time.time() - 7200, time.time() - 7200))
    assert [str(e.path) for e in cache_entries(tmp_path / "cache")] == [entry, str(old)]
    second = prepare([corpus], tmp_path / "b", **{**kw, "block_size": 8})
    assert second["cache"]["used"]
    assert [str(e.path) for e in cache_entries(tmp_path / "cache")] == [str(old), entry]


def test_prepare_evicts_after_storing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMKIT_CACHE", str(cache))
    monkeypatch.setenv("LLMKIT_CACHE_MAX_GB", "0.001")  # 1 MB
    stale = _fake_entry(cache, "e" * 64, 900_000, 86400)
    m = prepare(
        [shared_file("tinystories/tinystories.txt")],
        tmp_path / "out",
        vocab_size=300,
        block_size=16,
        plot=False,
        num_proc=1,
    )
    assert m["cache"]["stored"] and not stale.exists()
    assert [str(e.path) for e in cache_entries(cache)] == [m["cache"]["path"]]


def _llmkit(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "llmkit", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cache_info_and_clear_commands(tmp_path):
    cache = tmp_path / "cache"
    old = _fake_entry(cache, "a" * 64, 2_000_000, 10 * 86400)
    new = _fake_entry(cache, "b" * 64, 1_000_000, 60)
    env = {"LLMKIT_CACHE": str(cache)}
    info = _llmkit("cache", "info", "--json", env=env)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["prepare"]["entries"] == 2
    assert [i["path"] for i in report["prepare"]["items"]] == [str(old), str(new)]
    assert report["prepare"]["bytes"] >= 3_000_000
    text = _llmkit("cache", "info", env=env).stdout
    assert f"cache: {cache}" in text and "prepare: 2 entries" in text and "bound 20 GB" in text

    cleared = _llmkit("cache", "clear", "--older-than", "7d", env=env)
    assert cleared.returncode == 0
    assert "removed 1 entry (2.0 MB)" in cleared.stdout and "1 kept" in cleared.stdout
    assert not old.exists() and new.exists()
    cleared = _llmkit("cache", "clear", env=env)
    assert "removed 1 entry" in cleared.stdout and not new.exists()

    bad = _llmkit("cache", "clear", "--older-than", "soon", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --older-than 'soon'")
    off = _llmkit("cache", "info", env={"LLMKIT_CACHE": "off"})
    assert off.returncode == 0 and "off" in off.stdout
    # LLMKIT_CACHE naming a file: one line, not "0 entries" (a new user's pass found it)
    a_file = tmp_path / "cachefile"
    a_file.write_text("mine")
    for command in (["info"], ["clear"]):
        got = _llmkit("cache", *command, env={"LLMKIT_CACHE": str(a_file)})
        assert got.returncode == 2 and got.stderr.splitlines() == [
            f"error: LLMKIT_CACHE={a_file} is a file, not a cache directory — set LLMKIT_CACHE "
            "to a directory (default ~/.cache/llmkit), or LLMKIT_CACHE=off"
        ], got.stderr
    assert a_file.read_text() == "mine"


def test_parse_age():
    assert parse_age("7") == parse_age("7d") == 7 * 86400
    assert parse_age("12h") == 43200 and parse_age("30m") == 1800


def test_cache_help_imports_nothing_heavy():
    code = (
        "import sys, llmkit.cli.cache;"
        "heavy = ('torch', 'datasets', 'transformers', 'tokenizers');"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_unusable_cache_is_a_warning(tmp_path, monkeypatch):
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    assert "is a file, not a directory" in cache_problem(afile)
    monkeypatch.setenv("LLMKIT_CACHE", str(afile))
    import io

    from rich.console import Console

    log = io.StringIO()
    m = prepare(
        [shared_file("tinystories/tinystories.txt")],
        tmp_path / "out",
        vocab_size=300,
        block_size=16,
        plot=False,
        num_proc=1,
        console=Console(file=log, width=400),
    )
    warning = f"cannot use the cache LLMKIT_CACHE={afile}: {afile} is a file, not a directory"
    assert warning in log.getvalue()
    assert any(w.startswith(warning) for w in m["warnings"])
    assert m["cache"]["stored"] is False and m["cache"]["note"].startswith(warning)
    assert CleanCache  # the class the pipeline uses is importable from the light module
