"""The distributed prepare job under datatrove's LocalPipelineExecutor: the same blocks as
``llmkit prepare --num-proc 1`` for 1, 2 and 5 tasks; reruns skip finished tasks; a failing
task is one line naming the task and the shard; the Slurm submission."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file

pytest.importorskip("datatrove")

from llmkit.data.distributed.job import (  # noqa: E402
    ENV_HANG,
    JobSpec,
    Work,
    assemble,
    build_executors,
    completed_tasks,
    run_job,
)
from llmkit.errors import UserError  # noqa: E402

BLOCK = 64
SPLITS = ("train", "validation")
CLEAN = {"gutenberg": False}


def _edit(text: str, every: int, rng: random.Random) -> str:
    words = text.split(" ")
    for i in range(rng.randrange(every), len(words), every):
        words[i] = rng.choice(["lamp", "river", "blue", "seven"])
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real text with exact and near copies of its documents placed in other files (so in
    other shards): tiny stories, Dolma JSON lines (plain and gzipped), WikiText."""
    d = tmp_path_factory.mktemp("corpus")
    stories = shared_file("tinystories/tinystories.txt").read_text(encoding="utf-8")
    docs = stories.split("\n\n")
    rng = random.Random(1)
    copies = [rng.choice(docs) for _ in range(40)] + [
        _edit(x, 30, rng) for x in rng.sample([x for x in docs if len(x.split()) > 40], 30)
    ]
    rng.shuffle(copies)
    (d / "a_stories.txt").write_text(stories, encoding="utf-8")
    (d / "b_copies.txt").write_text("\n\n".join(copies), encoding="utf-8")
    for rel in ("dolma_cc_jsonl/cc_en_head-0091.jsonl.gz", "dolma_cc_jsonl/cc_en_head-0174.jsonl"):
        src = shared_file(rel)
        (d / f"c_{src.name}").write_bytes(src.read_bytes())
    wiki = shared_file("wikitext2/test.txt").read_text(encoding="utf-8")[:80_000]
    (d / "d_wiki.txt").write_text(wiki, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokenizer_dir):
    """``llmkit prepare --num-proc 1`` with the same tokenizer: train/validation rows."""
    from llmkit.data.pipeline import prepare

    out = tmp_path_factory.mktemp("ref") / "out"
    manifest = prepare(
        [str(corpus)],
        out,
        tokenizer=str(tokenizer_dir),
        block_size=BLOCK,
        num_proc=1,
        clean=CLEAN,
        plot=False,
        cache=False,
    )
    return manifest, _rows(out)


def _spec(work: Path, corpus: Path, tokenizer_dir: Path | None, tasks: int) -> JobSpec:
    return JobSpec(
        work_dir=str(work),
        inputs=[str(corpus)],
        tokenizer=None if tokenizer_dir is None else str(tokenizer_dir),
        block_size=BLOCK,
        cleaning=CLEAN,
        tasks=tasks,
        partitions=tasks,
        target_shard_bytes=40_000,
    )


def _rows(out: Path):
    from datasets import load_from_disk

    return {
        s: np.asarray(load_from_disk(str(out / s))["input_ids"]) for s in ("train", "validation")
    }


@pytest.mark.parametrize(
    ("tasks", "workers"),
    [
        (1, 1),
        (5, 1),
        pytest.param(2, 2, marks=pytest.mark.slow),
        pytest.param(5, 3, marks=pytest.mark.slow),
    ],
)
def test_local_executor_equals_prepare(tmp_path, corpus, tokenizer_dir, reference, tasks, workers):
    """workers=1 runs the tasks one after the other in this process; more start datatrove's
    process pool (slow: each worker imports llmkit)."""
    ref_manifest, ref_rows = reference
    spec = _spec(tmp_path / "work", corpus, tokenizer_dir, tasks)
    run_job(spec, "local", workers=workers)
    manifest = assemble(spec, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    for name in ("train", "validation"):
        assert rows[name].shape == ref_rows[name].shape and len(rows[name]) > 10
        assert (rows[name] == ref_rows[name]).all()
        for key in ("documents", "tokens", "blocks", "tail_tokens"):
            assert manifest["splits"][name][key] == ref_manifest["splits"][name][key]
    assert manifest["executor"]["shards"] > 5  # files were cut, copies sit in other shards
    assert manifest["stages"] == ref_manifest["stages"]  # read, every stage: in, out, drops
    assert manifest["inputs"] == ref_manifest["inputs"]  # documents, sha256, fields per file
    dropped = ref_manifest["stages"]
    assert dropped["deduplicate"]["dropped"].get("duplicate", 0) >= 30
    assert dropped["near_dedup"]["dropped"].get("near_duplicate", 0) >= 10
    assert completed_tasks(spec) == {
        "signatures": tasks,
        "groups": tasks,
        "resolve": 1,
        "admit": tasks,
        "tokenizer": 1,
        "encode": tasks,
        "pack": tasks,
    }


@pytest.mark.slow
def test_two_machines_share_the_work_dir(tmp_path, corpus, tokenizer_dir, reference):
    """Two separate processes, each running half of every stage's tasks over one work
    directory (as two machines would), give the same output."""
    _, ref_rows = reference
    spec = _spec(tmp_path / "work", corpus, tokenizer_dir, 4)
    script = (
        "import sys, json; from llmkit.data.distributed.job import JobSpec, run_job; "
        "spec = JobSpec(**json.loads(sys.argv[1])); m = int(sys.argv[2]); "
        "run_job(spec, 'local', workers=1, machine=m, machines=2)"
    )
    import dataclasses
    import json

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(dataclasses.asdict(spec)), str(h)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for h in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assemble(spec, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    for name in ("train", "validation"):
        assert (rows[name] == ref_rows[name]).all()


def test_kill_9_then_rerun_skips_finished_tasks(tmp_path, corpus, tokenizer_dir, reference):
    _, ref_rows = reference
    spec = _spec(tmp_path / "work", corpus, tokenizer_dir, 3)
    import dataclasses
    import json

    script = (
        "import sys, json; from llmkit.data.distributed.job import JobSpec, run_job; "
        "run_job(JobSpec(**json.loads(sys.argv[1])), 'local', workers=1)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), ENV_HANG: "encode:1"}
    p = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(dataclasses.asdict(spec))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = Work(spec.work_dir)
    deadline = time.time() + 240
    while not work.exists("hang/encode-00001") and time.time() < deadline:
        assert p.poll() is None
        time.sleep(0.5)
    pid = int(work.read_bytes("hang/encode-00001"))
    assert pid == p.pid  # workers=1: the task runs in the job's own process
    os.kill(pid, signal.SIGKILL)
    p.wait(timeout=30)
    before = completed_tasks(spec)
    assert before == {
        "signatures": 3,
        "groups": 3,
        "resolve": 1,
        "admit": 3,
        "tokenizer": 1,
        "encode": 1,
        "pack": 0,
    }
    runs_before = len(work.listdir("runs"))
    run_job(spec, "local", workers=1)
    after = completed_tasks(spec)
    assert after == {
        "signatures": 3,
        "groups": 3,
        "resolve": 1,
        "admit": 3,
        "tokenizer": 1,
        "encode": 3,
        "pack": 3,
    }
    # only the unfinished tasks ran again: encode 1 and 2, pack 0-2
    reran = [n.rsplit("-", 2)[0] + "-" + n.rsplit("-", 2)[1] for n in work.listdir("runs")]
    new = len(work.listdir("runs")) - runs_before
    assert new == 5 and reran.count("signatures-00000") == 1
    assemble(spec, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    for name in ("train", "validation"):
        assert (rows[name] == ref_rows[name]).all()


def test_failing_task_is_one_line_naming_task_and_shard(tmp_path, corpus, tokenizer_dir):
    bad = tmp_path / "in"
    bad.mkdir()
    text = (corpus / "a_stories.txt").read_bytes()
    cut = text.index(b"\n\n", 100_000)
    (bad / "x.txt").write_bytes(text[:cut] + b"\n\nbad \xff byte\n\n" + text[cut:])
    spec = _spec(tmp_path / "work", bad, tokenizer_dir, 2)
    spec.inputs = [str(bad)]
    with pytest.raises(UserError) as info:
        run_job(spec, "local", workers=1)
    msg = info.value.message
    assert "\n" not in msg
    assert msg.startswith("signatures task ")
    assert "shard " in msg and "x.txt, bytes " in msg and "invalid UTF-8 (byte 0xff" in msg
    line = text[:cut].count(b"\n") + 3
    assert f"x.txt:{line}:" in msg


def test_slurm_submission(tmp_path, corpus, tokenizer_dir, monkeypatch):
    """The sbatch scripts datatrove writes for the job: one array per stage with its task
    count, each depending on the one before, with the resources asked."""
    import datatrove.executor.slurm as slurm

    submitted = []

    def fake_launch(contents, retriever, *args):
        submitted.append((contents, args))
        return str(1000 + len(submitted))

    monkeypatch.setattr(slurm, "launch_slurm_job", fake_launch)
    spec = _spec(tmp_path / "work", corpus, tokenizer_dir, 8)
    spec.partitions = 3
    from llmkit.data.distributed.job import plan_job

    plan_job(spec)
    executors = build_executors(
        spec,
        "slurm",
        partition="cpu",
        time="02:00:00",
        cpus_per_task=2,
        mem_per_cpu_gb=3,
        slurm_logs_folder=str(tmp_path / "slurm_logs"),
    )
    executors[-1].run()
    jobs = [(c, a) for c, a in submitted if "llmkit.data.distributed.launch" in c]
    assert len(jobs) == 7
    assert not any("launch_pickled_pipeline" in c for c, _ in submitted)  # no unpickling
    arrays = [next(x for x in c.splitlines() if "--array" in x) for c, _ in jobs]
    assert arrays == [f"#SBATCH --array=0-{n - 1}" for n in (8, 3, 1, 8, 1, 8, 8)]
    for c, _ in jobs:
        assert "#SBATCH --partition=cpu" in c and "#SBATCH --time=02:00:00" in c
        assert "#SBATCH --cpus-per-task=2" in c and "#SBATCH --mem-per-cpu=3G" in c
    ids = [str(1001 + submitted.index(j)) for j in jobs]
    assert not any("--dependency" in x for x in jobs[0][1])
    for prev, (_, args) in zip(ids, jobs[1:], strict=False):
        assert f"--dependency=afterok:{prev}" in args


@pytest.mark.slow
def test_ray_executor_equals_prepare(tmp_path, corpus, tokenizer_dir, reference, monkeypatch):
    """A local one-node Ray instance (ray.init) running the job: the same rows (about 80 s)."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _, ref_rows = reference
    spec = _spec(tmp_path / "work", corpus, tokenizer_dir, 2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_job(spec, "ray", mem_per_cpu_gb=0.5)
    finally:
        ray.shutdown()
    assert completed_tasks(spec) == {
        "signatures": 2,
        "groups": 2,
        "resolve": 1,
        "admit": 2,
        "tokenizer": 1,
        "encode": 2,
        "pack": 2,
    }
    assemble(spec, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    for name in SPLITS:
        assert (rows[name] == ref_rows[name]).all()


def test_work_dir_of_another_job_is_refused(tmp_path, corpus, tokenizer_dir):
    from llmkit.data.distributed.job import plan_job

    spec = _spec(tmp_path / "work", corpus, tokenizer_dir, 2)
    first = plan_job(spec)
    assert plan_job(spec) == first  # the same job: the first plan, shard ids kept
    spec.tasks = 3
    with pytest.raises(UserError, match=r"holds a job with other settings \(tasks\)"):
        plan_job(spec)


def test_trained_tokenizer_equals_prepare(tmp_path, corpus):
    """Without --tokenizer: the BPE trained on the train documents in global order is
    prepare's (the same vocabulary and merges), and so are the blocks."""
    from llmkit.data.pipeline import prepare

    ref = prepare(
        [str(corpus)],
        tmp_path / "ref",
        vocab_size=400,
        block_size=BLOCK,
        num_proc=1,
        clean=CLEAN,
        plot=False,
        cache=False,
    )
    spec = _spec(tmp_path / "work", corpus, None, 3)
    spec.vocab_size = 400
    run_job(spec, "local", workers=1)
    manifest = assemble(spec, tmp_path / "out")
    for name in ("tokenizer.json",):
        mine = (tmp_path / "out" / name).read_text(encoding="utf-8")
        assert mine == (tmp_path / "ref" / name).read_text(encoding="utf-8")
    rows, ref_rows = _rows(tmp_path / "out"), _rows(tmp_path / "ref")
    from datasets import load_from_disk

    from llmkit.core.prepared import is_prepared

    assert is_prepared(tmp_path / "out")
    assert load_from_disk(str(tmp_path / "out"))["train"].num_rows == len(ref_rows["train"])
    for name in SPLITS:
        assert rows[name].shape == ref_rows[name].shape
        assert (rows[name] == ref_rows[name]).all()
        assert manifest["splits"][name]["tokens"] == ref["splits"][name]["tokens"]


def test_failing_stage_wide_task_is_one_line(tmp_path, corpus):
    """A tokenizer that cannot be loaded: the tokenizer stage (which puts a given tokenizer in
    the work directory when the driver has not) fails in one line; nothing is encoded."""
    spec = _spec(tmp_path / "work", corpus, tmp_path / "no-such-tokenizer", 2)
    with pytest.raises(UserError) as info:
        run_job(spec, "local", workers=1)
    msg = info.value.message
    assert msg.startswith("tokenizer task 0 of 1: ") and "\n" not in msg
    assert "no-such-tokenizer" in msg
    assert completed_tasks(spec)["admit"] == 2 and completed_tasks(spec)["tokenizer"] == 0
