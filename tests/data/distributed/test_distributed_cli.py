"""``llmkit prepare --executor local``: the output equals ``llmkit prepare --num-proc 1`` for 1,
2 and 5 tasks, every file byte for byte (rows, tokenizer, ``dropped.jsonl``, ``lengths.png``)
and the manifest on every key but the executor's own and the time; a rerun is up to date
whichever path wrote the output; a pretrained tokenizer directory or ``.gguf`` gives the rows
of one process; datatrove's log lines go to the work directory, not stderr; the settings are
also read from ``--config``; options not supported yet, or set for another executor, are
refused in one line naming them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, shared_file
from typer.testing import CliRunner

from llmkit.cli import app

pytest.importorskip("datatrove")

COMMON = ("--vocab-size", "300", "--block-size", "32", "--no-plot", "--keep-gutenberg")
#: What the comparison runs add: the plot and the dropped documents are part of the output.
FULL = ("--vocab-size", "300", "--block-size", "32", "--keep-gutenberg", "--keep-dropped")
#: The manifest entries a distributed run may differ in from ``--num-proc 1``: the time it
#: was written and the executor's own settings. Anything else that differs is drift.
MAY_DIFFER = {"created", "executor", "settings.executor", "settings.tasks", "settings.work_dir"}


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
    result = cli(str(corpus), "--output", str(out), "--num-proc", "1", "--no-cache", *FULL)
    assert result.exit_code == 0, result.output
    return out


def differing(a, b, prefix: str = "") -> set[str]:
    """The dotted keys at which two JSON values differ (a key in one only counts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in a.keys() | b.keys():
            if k not in a or k not in b:
                out.add(prefix + k)
            else:
                out |= differing(a[k], b[k], f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def assert_same_output(got: Path, ref: Path) -> None:
    """Every file byte for byte but the manifest, which differs only in :data:`MAY_DIFFER`."""
    a, b = files_of(got), files_of(ref)
    assert sorted(a) == sorted(b)
    assert [f for f in a if a[f] != b[f]] == ["manifest.json"]
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    assert differing(ma, mb) == MAY_DIFFER


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
        "--no-cache",
        *FULL,
    )
    assert result.exit_code == 0, result.output
    assert_same_output(out, reference)
    for name in ("dropped.jsonl", "lengths.png", "tokenizer.json"):  # the files compared
        assert (out / name).stat().st_size > 0
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    reasons = [(d["stage"], d["reason"]) for d in dropped]
    assert reasons.count(("deduplicate", "duplicate")) >= 15
    assert reasons.count(("near_dedup", "near_duplicate")) >= 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["executor"] == "local" and manifest["settings"]["tasks"] == tasks
    assert manifest["fingerprint"]["full"] and manifest["length_histogram"]["kept"]
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
        (["--trust-remote-code"], "--trust-remote-code"),
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


def test_a_rerun_is_up_to_date_whichever_path_wrote_the_output(tmp_path, corpus, reference):
    """The fingerprint of ``--executor local`` is the one of ``--num-proc 1`` (the bytes are the
    same): either path's output is up to date for the other, and nothing runs."""
    import shutil

    work = tmp_path / "work"
    dist = ("--executor", "local", "--tasks", "2", "--work-dir", str(work), "--num-proc", "1")
    one = tmp_path / "one"
    shutil.copytree(reference, one)
    again = cli(str(corpus), "--output", str(one), *dist, *FULL)
    assert again.exit_code == 0, again.output
    assert f"{one} is up to date" in again.output and "nothing to do" in again.output
    assert not work.exists() and files_of(one) == files_of(reference)  # nothing ran

    two = tmp_path / "two"
    first = cli(str(corpus), "--output", str(two), *dist, *FULL)
    assert first.exit_code == 0 and "up to date" not in first.output
    fingerprint = json.loads((two / "manifest.json").read_text())["fingerprint"]
    assert fingerprint == json.loads((reference / "manifest.json").read_text())["fingerprint"]
    written, runs = files_of(two), len(list((work / "runs").iterdir()))
    for args in (dist, ("--num-proc", "1")):
        rerun = cli(str(corpus), "--output", str(two), *args, *FULL)
        assert rerun.exit_code == 0, rerun.output
        assert f"{two} is up to date" in rerun.output
    assert files_of(two) == written and len(list((work / "runs").iterdir())) == runs


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (
            ["--executor", "local", "--slurm-partition", "cpu"],
            "",
            "--slurm-partition applies to --executor slurm only, not --executor local",
        ),
        (
            ["--executor", "local"],
            "slurm_time: '01:00:00'\n",
            "slurm_time in {cfg} applies to --executor slurm only, not --executor local",
        ),
        (
            ["--executor", "ray", "--slurm-cpus", "4"],
            "",
            "--slurm-cpus applies to --executor slurm only, not --executor ray",
        ),
        (
            ["--executor", "slurm", "--slurm-partition", "cpu", "--slurm-time", "1:00:00"],
            "ray_address: 'ray://head:10001'\n",
            "ray_address in {cfg} applies to --executor ray only, not --executor slurm",
        ),
        (
            [],
            "slurm_partition: cpu\n",
            "slurm_partition in {cfg} applies to --executor slurm only",
        ),
        (["--ray-address", "auto"], "", "--ray-address applies to "),
    ],
)
def test_an_engine_option_of_another_executor_is_refused(tmp_path, corpus, args, config, message):
    """An engine's option given with another executor, or with none, was silently ignored;
    the error names it as the user gave it (the flag, or the key in the YAML file)."""
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(config)
    message = message.format(cfg=cfg)
    out, work = tmp_path / "o", tmp_path / "w"
    wd = ["--work-dir", str(work)] if "--executor" in args else []
    result = cli(str(corpus), "--output", str(out), "--config", str(cfg), *wd, *args)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: ") and message in line
    assert not out.exists() and not work.exists()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(str(out))
    return out


def _same_as_one_process(tmp_path: Path, inputs: Path, *args: str) -> None:
    """``--executor local --tasks 2`` writes what ``--num-proc 1`` writes, with ``args``."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    common = ("--block-size", "32", "--no-cache", "--keep-gutenberg", *args)
    first = cli(str(inputs), "--output", str(ref), "--num-proc", "1", *common)
    assert first.exit_code == 0, first.output
    dist = ("--executor", "local", "--tasks", "2", "--work-dir", str(tmp_path / "work"))
    second = cli(str(inputs), "--output", str(out), "--num-proc", "1", *dist, *common)
    assert second.exit_code == 0, second.output
    assert_same_output(out, ref)
    got = _rows(out)
    assert len(got["train"]) > 10 and (got["train"] == _rows(ref)["train"]).all()


def test_a_tokenizer_directory_gives_the_rows_of_one_process(tmp_path, corpus, tokenizer_dir):
    _same_as_one_process(tmp_path, corpus, "--tokenizer", str(tokenizer_dir))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"]["path"] == str(tokenizer_dir)
    assert not manifest["tokenizer"]["trained"]
    assert (tmp_path / "work" / "tokenizer" / "tokenizer.json").is_file()  # saved once


def test_skipped_lines_give_the_warnings_of_one_process(tmp_path, shakespeare_slice):
    """Bad lines in a JSON-lines file cut into several shards (--on-error skip): the manifest's
    counts, first error and warnings are one process's (the comparison covers them)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    speeches = shakespeare_slice.read_text(encoding="utf-8").split("\n\n")
    lines = [json.dumps({"text": x}) for x in speeches]
    lines[40] = '{"text": "cut'  # malformed
    lines[300] = json.dumps({"body": "no text field"})
    (inputs / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _same_as_one_process(tmp_path, inputs, "--on-error", "skip", "--vocab-size", "300")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["executor"]["shards"] >= 3  # the file was cut
    assert manifest["inputs"][0]["first_error"].startswith(f"{inputs / 'a.jsonl'}:41: ")
    assert len(manifest["warnings"]) == 1 and "skipped" in manifest["warnings"][0]
    assert sum(manifest["stages"]["read"]["skipped"].values()) == 2


GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent (the shared GGUF model)")
def test_a_gguf_tokenizer_gives_the_rows_of_one_process(tmp_path, shakespeare_slice):
    """The GGUF's tokenizer is read once (about 20 s) and saved in the work directory; its
    corrections (SmolLM2's one-digit split) survive: numbers after runs of spaces included."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    text = shakespeare_slice.read_text(encoding="utf-8")[:20_000]
    numbers = "\n\n".join(f"In  {1990 + i} there were   {i * 137} cats." for i in range(40))
    (inputs / "a.txt").write_text(text + "\n\n" + numbers, encoding="utf-8")
    _same_as_one_process(tmp_path, inputs, "--tokenizer", str(GGUF))


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_engine_log_lines_go_to_the_work_dir(tmp_path, shakespeare_slice, workers):
    """A run printed about 150 datatrove INFO lines and object reprs on stderr; now it prints
    prepare's own lines, and datatrove's go to files under the work directory. With two
    worker processes (slow: each stage starts its pool), their stderr (file descriptor 2) is
    redirected too."""
    work, out = tmp_path / "work", tmp_path / "out"
    command = [
        sys.executable, "-m", "llmkit", "prepare", str(shakespeare_slice), "--output", str(out),
        "--executor", "local", "--tasks", "2", "--num-proc", str(workers), "--work-dir",
        str(work), "--no-cache", *COMMON,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3]), "COLUMNS": "100"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    noise = [x for x in lines if "datatrove" in x or "| INFO" in x or "PIPELINE" in x]
    assert noise == [] and len(lines) < 40, done.stderr  # prepare's lines and tables
    starts = (
        "read 1 file(s)",
        "split by document",
        "trained a byte-level",
        "train:",
        "validation:",
    )
    assert [x.split(" ")[0] for x in lines[:5]] == [s.split(" ")[0] for s in starts]
    assert lines[5].startswith("llmkit prepare -> ") and "tokens per byte" in lines[-1]
    logs = list((work / "logs").glob("console-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text(encoding="utf-8")
    # datatrove's console lines: every task's with one worker, the first worker's with two
    assert text.count("Launching pipeline for rank=") == (12 if workers == 1 else 7)
    assert len(list((work / "logs" / "signatures" / "logs").glob("task_*.log"))) == 2


def test_a_work_dir_with_a_scheme(tmp_path, corpus, reference):
    """An fsspec work directory (here ``memory://``, in this process): the same output, and
    datatrove's console lines saved there when the job ends."""
    import uuid

    import fsspec

    work = f"memory://llmkit-{uuid.uuid4().hex}"
    out = tmp_path / "out"
    args = ("--executor", "local", "--tasks", "2", "--work-dir", work, "--num-proc", "1")
    result = cli(str(corpus), "--output", str(out), *args, "--no-cache", *FULL)
    assert result.exit_code == 0, result.output
    assert_same_output(out, reference)
    fs = fsspec.filesystem("memory")
    logs = fs.glob(work.removeprefix("memory://") + "/logs/console-*.log")
    assert len(logs) == 1 and b"Launching pipeline for rank=" in fs.cat(logs[0])


@pytest.mark.parametrize("scheme", [False, True])
def test_a_failed_task_is_one_line(tmp_path, scheme):
    """datatrove's traceback goes to the work directory's log (with a scheme too: saved there
    although the job failed); the user gets one line naming it."""
    import uuid

    import fsspec

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("one document\n\nanother one\n", encoding="utf-8")
    (inputs / "b.txt").write_bytes(b"fine\n\nnot \xff\xfe UTF-8\n")
    work = f"memory://llmkit-{uuid.uuid4().hex}" if scheme else str(tmp_path / "work")
    args = ("--executor", "local", "--tasks", "2", "--work-dir", work, "--num-proc", "1")
    result = cli(str(inputs), "--output", str(tmp_path / "o"), *args, "--no-cache", *COMMON)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: signatures task "), result.output
    assert "b.txt" in lines[0] and not (tmp_path / "o").exists()
    fs, root = fsspec.core.url_to_fs(work)
    logs = fs.glob(f"{root}/logs/console-*.log")
    assert len(logs) == 1 and b"Traceback" in fs.cat(logs[0])
    named = f"{work}/logs/{logs[0].rsplit('/', 1)[1]}"
    assert lines[0].endswith(f"(datatrove's log: {named})")  # where the traceback is


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


@pytest.mark.parametrize("edit", ["same size", "other size", "same size, no cache", "added"])
def test_an_input_changed_since_the_work_dir_was_planned_is_refused(
    tmp_path, shakespeare_slice, edit
):
    """An input edited in place (same size) and a reused --work-dir gave the old text's rows,
    exit 0, the old SHA-256 in the manifest and ``"fingerprint": null``; a size change was
    refused as "other settings (target_shard_bytes)". Now one line naming the input, exit 2,
    whether prepare hashed the inputs (cache on) or not (the modification time then)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    text = shakespeare_slice.read_text(encoding="utf-8")
    (inputs / "a.txt").write_text(text, encoding="utf-8")
    work = tmp_path / "w"
    cache = ("--no-cache",) if "no cache" in edit else ()
    args = ("--executor", "local", "--tasks", "2", "--work-dir", str(work), *cache, *COMMON)
    first = cli(str(inputs), "--output", str(tmp_path / "o1"), *args)
    assert first.exit_code == 0, first.output
    target = inputs / "a.txt"
    if edit == "added":
        target = inputs / "b.txt"
        target.write_text("A new file.\n", encoding="utf-8")
    elif edit == "other size":
        target.write_text(text + "\n\nOne more line.\n", encoding="utf-8")
    else:
        assert "the" in text
        target.write_text(text.replace("the", "THE"), encoding="utf-8")
        assert target.stat().st_size == len(text.encode())
    again = cli(str(inputs), "--output", str(tmp_path / "o2"), *args)
    assert again.exit_code == 2, again.output
    line = " ".join(again.output.split())
    assert f"input {target}" in line and "--work-dir" in line, line
    assert "other settings" not in line
    assert not (tmp_path / "o2").exists()


def test_an_input_touched_but_not_changed_reuses_the_work_dir(tmp_path, shakespeare_slice):
    """With the cache on prepare hashes the inputs: a newer modification time over the same
    bytes is the same input, and the output's fingerprint is the first run's (not null)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_bytes(shakespeare_slice.read_bytes())
    args = ("--executor", "local", "--tasks", "2", "--work-dir", str(tmp_path / "w"), *COMMON)
    first = cli(str(inputs), "--output", str(tmp_path / "o1"), *args)
    assert first.exit_code == 0, first.output
    st = (inputs / "a.txt").stat()
    os.utime(inputs / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = cli(str(inputs), "--output", str(tmp_path / "o2"), *args)
    assert again.exit_code == 0, again.output
    fps = [
        json.loads((tmp_path / o / "manifest.json").read_text())["fingerprint"]
        for o in ("o1", "o2")
    ]
    assert fps[0] is not None and fps[0] == fps[1]


@pytest.mark.parametrize(
    "work",
    ["/proc/nope", "/dev/null/x", "bogus://x", "{tmp}/ro/w"],
    ids=["proc", "devnull", "scheme", "readonly"],
)
def test_a_work_dir_that_cannot_be_made_is_one_line(tmp_path, shakespeare_slice, work):
    """--work-dir /proc/nope, /dev/null/x, bogus://x were tracebacks (FileNotFoundError,
    NotADirectoryError, ValueError: Protocol not known). Now one line, exit 2, and an
    existing output is kept as it was (with --overwrite too)."""
    if work.startswith("{tmp}"):
        if os.geteuid() == 0:
            pytest.skip("root writes a read-only directory")
        (tmp_path / "ro").mkdir(mode=0o500)
        work = work.format(tmp=tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("--executor", "local", "--work-dir", work, "--overwrite", *COMMON)
    result = cli(str(shakespeare_slice), "--output", str(out), *args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    line = " ".join(result.output.split())
    assert line.startswith(f"error: cannot use --work-dir {work}"), line
    assert (out / "keep.txt").read_text() == "mine"
