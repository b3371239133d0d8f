"""llmkit.core.atomic: build under a temporary name, rename into place, clean dead temporaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmkit.core import atomic


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_directory_replaces_the_old_one_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic.atomic_output(target, directory=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        assert not (tmp / "old.txt").exists()
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # untouched until the block ends
    assert _listing(target) == ["new.txt"]
    assert _listing(tmp_path) == ["out"]  # no temporary, no aside copy


def test_a_failure_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["out.txt"]


def test_write_text_replaces_a_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("1")
    atomic.write_text(target, "2\n")
    assert target.read_text() == "2\n" and _listing(tmp_path) == ["a.json"]


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path):
    dead = tmp_path / f".out.tmp-{_dead_pid()}-0000abcd"
    mine = tmp_path / f".out.tmp-{os.getpid()}-0000abcd"
    alive = tmp_path / f".out.tmp-{os.getppid()}-0000abcd"
    other = tmp_path / f".other.tmp-{_dead_pid()}-0000abcd"  # another target's
    odd = tmp_path / ".out.tmp-notapid-1"
    for p in (dead, mine, alive, other, odd):
        p.mkdir()
    with atomic.atomic_output(tmp_path / "out", directory=True):
        pass
    assert not dead.exists()
    assert mine.exists() and alive.exists() and other.exists() and odd.exists()


def test_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # tmp -> target, after target was moved aside
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError):
        with atomic.atomic_output(target, directory=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _listing(target) == ["old.txt"]
    assert _listing(tmp_path) == ["out"]


def test_atomic_files_move_into_an_existing_directory_or_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "config.json").write_text("old")
    with atomic.atomic_files(run, "final") as tmp:
        assert tmp.parent == run and tmp.name.startswith(".final.tmp-")
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("w")
    assert _listing(run) == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert (run / "config.json").read_text() == "new"
    with pytest.raises(OSError):
        with atomic.atomic_files(run, "final") as tmp:
            (tmp / "config.json").write_text("newer")
            raise OSError(28, "No space left on device")
    assert (run / "config.json").read_text() == "new"
    assert _listing(run) == ["config.json", "metrics.jsonl", "model.safetensors"]


@pytest.mark.parametrize("points_to", ["directory", "file", "nothing"])
def test_a_symbolic_link_is_replaced_and_what_it_points_to_is_left_alone(tmp_path, points_to):
    """``--output LINK --overwrite``: the new directory takes the link's place, the link's
    target is untouched and nothing is left beside it (a directory over a link failed with
    'Not a directory'; before that, prepare left a dangling ``.old`` link)."""
    pointed = tmp_path / "v3"
    if points_to == "directory":
        pointed.mkdir()
        (pointed / "keep.txt").write_text("v3")
    elif points_to == "file":
        pointed.write_text("v3")
    link = tmp_path / "current"
    link.symlink_to(pointed)
    with atomic.atomic_output(link, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").read_text() == "new"
    if points_to == "directory":
        assert (pointed / "keep.txt").read_text() == "v3"
    elif points_to == "file":
        assert pointed.read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["current"] + (["v3"] if points_to != "nothing" else [])
    )
