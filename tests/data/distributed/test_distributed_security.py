"""Nothing the distributed job reads from its shared work directory can run code: a crafted
pickle planted there (whose ``__reduce__`` creates a marker file) is ignored where the job
never reads that name, and refused in one line where it stands in for a file the job reads;
the Slurm array tasks never unpickle datatrove's ``executor.pik``."""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datatrove")

from llmkit.data.distributed.job import (  # noqa: E402
    STAGE_CLASSES,
    STAGES,
    JobSpec,
    Work,
    assemble,
    build_executors,
    completed_tasks,
    plan_job,
    run_job,
    stage_tasks,
)
from llmkit.errors import UserError  # noqa: E402


class _Planted:
    """A pickle that, once unpickled, creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(marker: Path) -> bytes:
    return pickle.dumps(_Planted(marker))


@pytest.fixture()
def job(tmp_path, shakespeare_slice, tiny_tokenizer) -> JobSpec:
    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok))
    return JobSpec(
        work_dir=str(tmp_path / "work"),
        inputs=[str(shakespeare_slice)],
        tokenizer=str(tok),
        block_size=32,
        cleaning={"gutenberg": False},
        tasks=2,
        partitions=2,
        target_shard_bytes=20_000,
    )


def test_planted_pickles_are_never_unpickled(tmp_path, job):
    """Pickles under every name the job once used (``*.pkl``) and datatrove's
    ``executor.pik`` of every stage: the job runs to the end and never loads them."""
    marker = tmp_path / "marker"
    work = Work(job.work_dir)
    plan_job(job)
    for rel in (
        "dropped.pkl",
        "rows/s000000.pkl",
        "records/p00000/s000000.pkl",
        "groups/p00000.pkl",
        "sources/s000000.pkl",
        "stats/s000000.pkl",
        "records/p00001/s000001.parquet.pkl",
        *(f"logs/{stage}/executor.pik" for stage in STAGES),
    ):
        work.write_bytes(rel, _evil(marker))
    run_job(job, "local", workers=1)
    assemble(job, tmp_path / "out")
    assert not marker.exists()
    assert completed_tasks(job) == {
        "signatures": 2,
        "groups": 2,
        "resolve": 1,
        "admit": 2,
        "tokenizer": 1,
        "encode": 2,
        "pack": 2,
    }
    from datasets import load_from_disk

    assert load_from_disk(str(tmp_path / "out" / "train")).num_rows > 10


def test_a_pickle_in_place_of_a_job_file_is_refused_in_one_line(tmp_path, job):
    """A pickle written over a file the job reads (JSON, parquet, ``.npy``): one line naming
    the file, nothing run."""
    marker = tmp_path / "marker"
    run_job(job, "local", workers=1)
    work = Work(job.work_dir)
    for rel, what in (
        ("counts/s000000.json", "not JSON"),
        ("sources/s000001.json", "not JSON"),
        ("blocks/train/s000001.npy", "not a plain .npy array"),
    ):
        saved = work.read_bytes(rel)
        if rel.endswith(".npy"):  # an object array: numpy stores it as a pickle
            buf = io.BytesIO()
            np.save(buf, np.array([_Planted(marker)], dtype=object), allow_pickle=True)
            work.write_bytes(rel, buf.getvalue())
        else:
            work.write_bytes(rel, _evil(marker))
        with pytest.raises(UserError) as info:
            assemble(job, tmp_path / "out")
        msg = info.value.message
        assert "\n" not in msg and msg.endswith(
            f"{rel} is {what}: not written by llmkit, refused (nothing in it was run)"
        )
        assert not marker.exists()
        assert not (tmp_path / "out").exists()  # nothing half-written under the output name
        work.write_bytes(rel, saved)
    work.write_bytes("spec.json", _evil(marker))
    with pytest.raises(UserError, match=r"spec\.json is not JSON"):
        run_job(job, "local", workers=1)
    assert not marker.exists()


def test_every_job_file_replaced_by_a_pickle_runs_nothing(tmp_path, job):
    """After a run, every file of the work directory but the job's settings and datatrove's
    markers and logs replaced by the pickle: each stage run again, and assembling the output,
    fails in one line, and the pickle is never loaded."""
    marker = tmp_path / "marker"
    run_job(job, "local", workers=1)
    root = Path(job.work_dir)
    poisoned = [
        f
        for f in root.rglob("*")
        if f.is_file()
        and f.name not in ("spec.json", "plan.json")
        and f.parts[-3] != "logs"
        and "logs" not in f.relative_to(root).parts
        and "runs" not in f.relative_to(root).parts
    ]
    assert len(poisoned) > 30
    for f in poisoned:
        f.write_bytes(_evil(marker))
    for name, n in stage_tasks(job).items():
        if name in ("signatures", "tokenizer"):  # they read only the inputs and the settings
            continue  # (the job names a tokenizer)
        with pytest.raises(Exception) as info:  # noqa: PT011 - any failure, checked below
            STAGE_CLASSES[name](job.work_dir)(None, 0, n)
        assert "refused" in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(UserError, match="refused"):
        assemble(job, tmp_path / "out")
    assert not marker.exists()


def test_slurm_tasks_run_the_stage_without_the_pickle(tmp_path, job, monkeypatch):
    """The sbatch script runs ``python -m llmkit.data.distributed.launch``; run as an array
    task (``SLURM_ARRAY_TASK_ID``) with a planted ``executor.pik``, it does its rank of the
    stage and never loads the pickle."""
    import datatrove.executor.slurm as slurm

    from llmkit.data.distributed import launch

    scripts = []
    monkeypatch.setattr(
        slurm, "launch_slurm_job", lambda c, r, *a: scripts.append(c) or str(100 + len(scripts))
    )
    plan_job(job)
    executors = build_executors(
        job, "slurm", partition="cpu", time="01:00:00", slurm_logs_folder=str(tmp_path / "sl")
    )
    executors[-1].run()
    first = next(c for c in scripts if " signatures " in c)
    line = next(x for x in first.splitlines() if "llmkit.data.distributed.launch" in x)
    argv = line.split("llmkit.data.distributed.launch", 1)[1].split()
    assert argv[:4] == ["signatures", job.work_dir, "--tasks", "2"]
    marker = tmp_path / "marker"
    Work(job.work_dir).write_bytes("logs/signatures/executor.pik", _evil(marker))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # what Slurm sets in an array task
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    fake = tmp_path / "bin"  # datatrove expands the node list with `scontrol show hostnames`
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("RUN_OFFSET", raising=False)
    assert launch.main(argv) == 0
    assert not marker.exists()
    done = sorted(os.listdir(Path(job.work_dir) / "logs/signatures/completions"))
    assert done == ["00001"]  # this array task's rank, and only it
    assert re.search(r"#SBATCH --array=0-1\b", first)
