"""``llmkit prepare --executor local``: the output's train/validation rows, split counts and
stage counts equal ``llmkit prepare --num-proc 1`` for 1, 2 and 5 tasks; the settings are also
read from ``--config``; options not supported yet are refused in one line naming them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from typer.testing import CliRunner

from llmkit.cli import app

pytest.importorskip("datatrove")

COMMON = ("--vocab-size", "300", "--block-size", "32", "--no-plot", "--keep-gutenberg")


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_slice) -> Path:
    """Shakespeare's speeches, Dolma web pages (JSON lines), and a file of exact and edited
    copies of both (so duplicates fall in other shards than their first occurrence)."""
    d = tmp_path_factory.mktemp("corpus")
    speeches = shakespeare_slice.read_text(encoding="utf-8")
    (d / "a.txt").write_text(speeches, encoding="utf-8")
    src = shared_file("dolma_cc_jsonl/cc_en_head-0174.jsonl")
    (d / "b.jsonl").write_bytes(src.read_bytes())
    rng = random.Random(3)
    docs = [x for x in speeches.split("\n\n") if len(x.split()) > 30]
    copies = rng.sample(docs, 15)
    for x in rng.sample(docs, 10):
        words = x.split(" ")
        words[len(words) // 2] = "lamp"
        copies.append(" ".join(words))
    rng.shuffle(copies)
    (d / "c_copies.txt").write_text("\n\n".join(copies), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("ref") / "out"
    result = cli(str(corpus), "--output", str(out), "--num-proc", "1", "--no-cache", *COMMON)
    assert result.exit_code == 0, result.output
    return out


def _rows(out: Path) -> dict:
    from llmkit.core.prepared import load_prepared

    data = load_prepared(out)  # what `llmkit train` reads: manifest, splits, tokenizer
    return {
        "train": np.asarray(data.train["input_ids"]),
        "validation": np.asarray(data.validation["input_ids"]),
        "manifest": data.manifest.as_dict(),
    }


@pytest.mark.parametrize("tasks", [1, 2, 5])
def test_local_executor_equals_num_proc_1(tmp_path, corpus, reference, tasks):
    out = tmp_path / "out"
    result = cli(
        str(corpus),
        "--output",
        str(out),
        "--executor",
        "local",
        "--tasks",
        str(tasks),
        "--work-dir",
        str(tmp_path / "work"),
        "--num-proc",
        "1",
        *COMMON,
    )
    assert result.exit_code == 0, result.output
    got, ref = _rows(out), _rows(reference)
    for name in ("train", "validation"):
        assert got[name].shape == ref[name].shape and len(got[name]) > 5
        assert (got[name] == ref[name]).all()
        for key in ("documents", "tokens", "blocks", "tail_tokens"):
            assert got["manifest"]["splits"][name][key] == ref["manifest"]["splits"][name][key]
    assert got["manifest"]["stages"] == ref["manifest"]["stages"]
    assert got["manifest"]["inputs"] == ref["manifest"]["inputs"]
    stages = ref["manifest"]["stages"]
    assert stages["deduplicate"]["dropped"]["duplicate"] >= 15
    assert stages["near_dedup"]["dropped"]["near_duplicate"] >= 5
    assert got["manifest"]["executor"]["shards"] >= tasks + 2  # files were cut
    assert (out / "tokenizer.json").read_text() == (reference / "tokenizer.json").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]  # no temporary


def test_settings_from_config_and_rerun(tmp_path, corpus, reference):
    """executor, tasks and work_dir from prepare.yaml; a second run over the same work
    directory reruns no task and writes the same rows."""
    work = tmp_path / "work"
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(f"executor: local\ntasks: 2\nwork_dir: {work}\nnum_proc: 1\n")
    for out in (tmp_path / "one", tmp_path / "two"):
        result = cli(str(corpus), "--output", str(out), "--config", str(cfg), *COMMON)
        assert result.exit_code == 0, result.output
    runs = [p.name.rsplit("-", 1)[0] for p in (work / "runs").iterdir()]
    assert len(runs) == 2 + 2 + 1 + 2 + 1 + 2 + 2  # each task of the first run, once
    ref = _rows(reference)
    for out in (tmp_path / "one", tmp_path / "two"):
        assert (_rows(out)["train"] == ref["train"]).all()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--keep-dropped"], "--keep-dropped"),
        (["--trust-remote-code"], "--trust-remote-code"),
        (["--tokenizer", "gpt2"], "--tokenizer gpt2 (not a local directory)"),
    ],
)
def test_unsupported_options_are_refused_in_one_line(tmp_path, corpus, args, named):
    out = tmp_path / "out"
    result = cli(
        str(corpus), "--output", str(out), "--executor", "local", "--work-dir",
        str(tmp_path / "w"), *args,
    )  # fmt: skip
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert f"--executor local does not support {named} yet" in line
    assert not out.exists() and not (tmp_path / "w").exists()  # nothing ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "2"], "--tasks applies to --executor only"),
        (["--executor", "local"], "--executor local needs --work-dir"),
        (["--executor", "slurm", "--work-dir", "w"], "--executor slurm needs --slurm-partition"),
        (["--executor", "spark", "--work-dir", "w"], "--executor"),
        (["--executor", "local", "--work-dir", "w", "--tasks", "0"], "--tasks must be at least 1"),
        (  # grew memory without bound (1.9 GB in 25 s) before it was bounded
            ["--executor", "local", "--work-dir", "w", "--tasks", "99999999999"],
            "--tasks 99,999,999,999 is more than 10,000",
        ),
    ],
)
def test_bad_distributed_settings(tmp_path, corpus, args, message):
    result = cli(str(corpus), "--output", str(tmp_path / "o"), *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize("where", ["same", "inside", "file"])
def test_a_work_dir_that_is_the_output_or_a_file_is_refused(tmp_path, corpus, where):
    """--work-dir equal to --output was accepted: the output replaced the job's state (and a
    non-empty directory was replaced without --overwrite); a file was a FileExistsError
    traceback. Now one line, exit 2, and nothing is written."""
    out = tmp_path / "o"
    work = {"same": out, "inside": out / "work", "file": tmp_path / "f.txt"}[where]
    if where == "file":
        work.write_text("not a directory")
    result = cli(str(corpus), "--output", str(out), "--executor", "local", "--work-dir", str(work))
    assert result.exit_code == 2, result.output
    assert ("overlap" if where != "file" else "is a file") in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("damage", ["plan of another shape", "blocks of another shape"])
def test_work_files_of_another_shape_are_refused_in_one_line(tmp_path, corpus, damage):
    """A JSON file of the right syntax but another shape was a TypeError traceback; an array
    of the wrong shape became the train split silently (3 rows of 7 zeros, block_size 32)."""
    work = tmp_path / "w"
    args = ("--executor", "local", "--work-dir", str(work), "--no-cache", *COMMON)
    first = cli(str(corpus), "--output", str(tmp_path / "o1"), *args)
    assert first.exit_code == 0, first.output
    if damage == "plan of another shape":
        (work / "plan.json").write_text('{"shards": [{"index": "x"}]}')
    else:
        np.save(work / "blocks" / "train" / "s000000.npy", np.zeros((3, 7)))
    again = cli(str(corpus), "--output", str(tmp_path / "o2"), *args)
    assert again.exit_code == 2, again.output
    assert len(again.output.strip().splitlines()) == 1 and str(work) in again.output
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_ray_executor_equals_num_proc_1(tmp_path, corpus, reference, monkeypatch):
    """``--executor ray`` on a one-node Ray instance this test starts (about a minute)."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "out"
        args = ("--executor", "ray", "--tasks", "2", "--work-dir", str(tmp_path / "work"))
        result = cli(str(corpus), "--output", str(out), *args, *COMMON)
        assert result.exit_code == 0, result.output
    finally:
        ray.shutdown()
    got, ref = _rows(out), _rows(reference)
    for name in ("train", "validation"):
        assert (got[name] == ref[name]).all()
    assert got["manifest"]["stages"] == ref["manifest"]["stages"]
