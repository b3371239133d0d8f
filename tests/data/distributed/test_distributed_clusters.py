"""``llmkit prepare --executor ray|slurm`` on real clusters that the tests start on this machine
and stop by process id: a 2-node Ray cluster (``ray start --head`` plus ``ray start
--address``) inside a network namespace that has only loopback, and a one-node Slurm
(munged + slurmctld + slurmd from Debian's ``slurm-wlm``) with its configuration, state and
sockets in a temporary directory. Each run's output equals ``llmkit prepare --num-proc 1``
row by row, and its manifest apart from the timing and executor fields.

Both are slow (a minute or more each) and skip, saying why, where ``unshare``, Ray or Slurm's
daemons are not available (``make install`` installs ``slurm-wlm`` when it can).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file

pytest.importorskip("datatrove")

COMMON = ("--vocab-size", "300", "--block-size", "32", "--no-plot", "--keep-gutenberg")
#: Manifest fields that depend on when, where and how the job ran, not on its output.
RUN_FIELDS = {"created", "executor", "cache"}
RUN_SETTINGS = {"executor", "tasks", "work_dir", "num_proc"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_slice) -> Path:
    """Shakespeare's speeches, Dolma web pages (JSON lines), and a file of exact and edited
    copies of the speeches (so duplicates fall in other shards than their first occurrence)."""
    d = tmp_path_factory.mktemp("corpus")
    speeches = shakespeare_slice.read_text(encoding="utf-8")
    (d / "a.txt").write_text(speeches, encoding="utf-8")
    (d / "b.jsonl").write_bytes(shared_file("dolma_cc_jsonl/cc_en_head-0174.jsonl").read_bytes())
    rng = random.Random(5)
    docs = [x for x in speeches.split("\n\n") if len(x.split()) > 30]
    copies = rng.sample(docs, 15)
    for x in rng.sample(docs, 10):
        words = x.split(" ")
        words[len(words) // 2] = "lamp"
        copies.append(" ".join(words))
    rng.shuffle(copies)
    (d / "c_copies.txt").write_text("\n\n".join(copies), encoding="utf-8")
    return d


def _env(**extra: str) -> dict:
    """This process's environment with this worktree's llmkit first on the path."""
    root = str(Path(__file__).resolve().parents[3])
    path = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _llmkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmkit", "prepare", *args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    """``llmkit prepare --num-proc 1``: the output every executor must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "out"
    args = (str(corpus), "--output", str(out), "--num-proc", "1", "--no-cache", *COMMON)
    done = subprocess.run(_llmkit(*args), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def assert_same_output(out: Path, ref: Path) -> dict:
    """``out`` holds ``ref``'s train/validation rows and tokenizer, and every manifest field
    both have except :data:`RUN_FIELDS` and :data:`RUN_SETTINGS`; returns ``out``'s manifest."""
    from datasets import load_from_disk

    for split in ("train", "validation"):
        got = np.asarray(load_from_disk(str(out / split))["input_ids"])
        want = np.asarray(load_from_disk(str(ref / split))["input_ids"])
        assert got.shape == want.shape and len(want) > 5
        assert (got == want).all(), f"{split}: rows differ"
    assert (out / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    got_m = json.loads((out / "manifest.json").read_text())
    ref_m = json.loads((ref / "manifest.json").read_text())
    skip = RUN_FIELDS | {f"settings.{k}" for k in RUN_SETTINGS}
    got_f, ref_f = _flat(got_m), _flat(ref_m)
    shared = {k for k in got_f.keys() & ref_f.keys() if k.split(".")[0] not in skip}
    shared -= skip
    assert {k for k in shared if k.startswith("splits.")} >= {"splits.train.tokens"}
    assert {k.split(".")[0] for k in shared} >= {"inputs", "stages", "splits", "settings"}
    assert {k: got_f[k] for k in shared} == {k: ref_f[k] for k in shared}
    stages = ref_m["stages"]
    assert stages["deduplicate"]["dropped"]["duplicate"] >= 15  # copies in another shard
    assert stages["near_dedup"]["dropped"]["near_duplicate"] >= 5
    return got_m


# ---------------------------------------------------------------------------------------------
# Processes this module starts: each carries a marker in its environment, which every process
# it starts inherits, so what is left of them can be found whatever its name or group.


def _carrying(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, to the process group ``proc`` leads (started with
    ``start_new_session``), and reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _assert_none_left(marker: str, pids: list[int] | None = None) -> None:
    """Nothing carrying ``marker`` is alive 10 s after the stop (SIGKILL is sent to any of
    ``pids`` still there first, so a failure here does not leak them)."""
    deadline = time.monotonic() + 10
    while (left := _carrying(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left running: {left}"


# ---------------------------------------------------------------------------------------------
# Ray: two nodes on loopback.

RAY_PORT = 6379  # the namespace is new: nothing else listens there

RAY_SCRIPT = """\
ip link set lo up
cd {base}
TMPDIR={base}/tmp-head {ray} start --head --node-ip-address 127.0.0.1 --port {port} \\
  --num-cpus 1 --temp-dir {base}/head --include-dashboard false --disable-usage-stats
TMPDIR={base}/tmp-worker {ray} start --address 127.0.0.1:{port} --node-ip-address 127.0.0.1 \\
  --num-cpus 1 --temp-dir {base}/worker --disable-usage-stats
{python} -c {nodes} > {base}/nodes.json
TMPDIR={base}/tmp-driver {prepare}
"""

RAY_NODES = """\
import json, time, ray
ray.init(address="127.0.0.1:{port}", log_to_driver=False)
for _ in range(60):
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2:
        break
    time.sleep(1)
print(json.dumps([{{"id": n["NodeID"], "cpus": n["Resources"].get("CPU")}} for n in alive]))
"""


def _can_unshare() -> str | None:
    """Why a network + PID namespace cannot be made here (None: it can)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (util-linux, iproute2) is not installed"
    probe = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "ip", "link", "set", "lo", "up"]
    done = subprocess.run(probe, capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot make a network namespace here ({done.stderr.strip()[:200]})"
    return None


@pytest.mark.slow
def test_two_node_ray_cluster_on_loopback(corpus, reference):
    """``ray start --head`` and ``ray start --address`` (1 CPU each, their own temporary
    directories) plus ``llmkit prepare --executor ray --tasks 2 --ray-address``, all in one
    shell inside ``unshare --net --pid``: a network namespace that has only loopback (Ray
    binds to the machine's interface address otherwise) and a PID namespace, so that every
    process Ray starts (its workers lead process groups of their own) dies with the shell.
    Each node's tasks log under that node's ``TMPDIR`` (datatrove writes its task logs under
    ``tempfile.gettempdir()``, which Ray's workers inherit from ``ray start``), so both nodes
    are seen to have run tasks. About two minutes."""
    pytest.importorskip("ray")
    why = _can_unshare()
    if why:
        pytest.skip(why)
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"{ray_cli} is absent (pip install 'llmkit[ray]')")
    # Ray's socket paths must fit in 107 bytes: a short directory of our own under /tmp
    base = Path(tempfile.mkdtemp(prefix="lkray-", dir="/tmp"))
    for sub in ("tmp-head", "tmp-worker", "tmp-driver"):
        (base / sub).mkdir()
    out, work = base / "out", base / "work"
    ray_args = ("--executor", "ray", "--tasks", "2", "--work-dir", str(work))
    ray_args += ("--ray-address", f"127.0.0.1:{RAY_PORT}")
    prepare = _llmkit(str(corpus), "--output", str(out), *ray_args, *COMMON)
    script = RAY_SCRIPT.format(
        base=base,
        ray=shlex.quote(str(ray_cli)),
        port=RAY_PORT,
        python=shlex.quote(sys.executable),
        nodes=shlex.quote(RAY_NODES.format(port=RAY_PORT)),
        prepare=shlex.join(prepare),
    )
    (base / "run.sh").write_text(script)
    marker = f"LLMKIT_TEST_CLUSTER={uuid.uuid4().hex}"
    env = _env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env[marker.split("=")[0]] = marker.split("=")[1]
    log = base / "run.log"
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*cmd, "sh", "-eu", str(base / "run.sh")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=900)
        finally:
            _stop_group(proc)
            _assert_none_left(marker.split("=")[1])
    try:
        assert rc == 0, log.read_text(errors="replace")[-4000:]
        nodes = json.loads((base / "nodes.json").read_text())
        assert len(nodes) == 2 and [n["cpus"] for n in nodes] == [1.0, 1.0]
        ran = {
            node: sorted(p.name for p in (base / node / "ray_logs" / "logs").glob("task_*.log"))
            for node in ("tmp-head", "tmp-worker")
        }
        assert ran["tmp-head"] and ran["tmp-worker"], f"tasks ran on one node only: {ran}"
        print(f"task logs per Ray node: {ran}")  # pytest -s shows it
        manifest = assert_same_output(out, reference)
        assert manifest["settings"]["executor"] == "ray" and manifest["settings"]["tasks"] == 2
        assert not (work / "errors").exists() or not list((work / "errors").iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_ray_failed_task_is_one_line_not_a_hang(tmp_path, shakespeare_slice):
    """A task that fails on Ray (invalid UTF-8 in its shard): the command stops with the
    task's one line (stage, task, shard, line) and exit 2. datatrove's Ray executor does not
    raise when a task fails, and a stage chained to it with ``depends`` waits for the missing
    task forever (logging "Dependency job still has 1/2 tasks. Waiting..." every 2 minutes),
    so llmkit runs the stages itself and checks each one. A new one-node Ray instance
    (``--ray-address local``) in ``unshare --net --pid``: nothing of it outlives the test."""
    pytest.importorskip("ray")
    why = _can_unshare()
    if why:
        pytest.skip(why)
    bad = tmp_path / "in"
    bad.mkdir()
    text = shakespeare_slice.read_bytes()
    cut = text.index(b"\n\n", 40_000)
    (bad / "x.txt").write_bytes(text[:cut] + b"\n\nbad \xff byte\n\n" + text[cut:])
    out, work = tmp_path / "out", tmp_path / "work"
    args = ("--executor", "ray", "--tasks", "2", "--work-dir", str(work), "--ray-address", "local")
    prepare = _llmkit(str(bad), "--output", str(out), *args, *COMMON)
    marker = uuid.uuid4().hex
    env = _env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", LLMKIT_TEST_CLUSTER=marker)
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
    script = f"ip link set lo up\nexec {shlex.join(prepare)}\n"
    proc = subprocess.Popen(
        [*cmd, "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=180)  # was: waiting forever
    finally:
        _stop_group(proc)
        _assert_none_left(marker)
    line = err.decode(errors="replace").strip().splitlines()[-1]
    assert proc.returncode == 2, err.decode(errors="replace")[-3000:]
    assert re.match(
        rf"error: signatures task [01] of 2, shard \d+ \({re.escape(str(bad))}/x.txt, bytes ", line
    )
    assert "invalid UTF-8 (byte 0xff" in line
    bad_line = text[:cut].count(b"\n") + 3
    assert f"x.txt:{bad_line}:" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Slurm: what is submitted (a stand-in sbatch; runs in the default suite).

FAKE_SBATCH = """\
#!{python}
import json, os, pathlib, sys
d = pathlib.Path(os.environ["FAKE_SBATCH_DIR"])
n = len(list(d.glob("*.json"))) + 1
script = pathlib.Path(sys.argv[-1]).read_text()
(d / f"{{n:03d}}.json").write_text(json.dumps({{"args": sys.argv[1:-1], "script": script}}))
print(f"Submitted batch job {{1000 + n}}")
"""

STAGE_TASKS = {  # llmkit's stages in order, and their tasks with --tasks 3
    "signatures": 3,
    "groups": 3,
    "resolve": 1,
    "admit": 3,
    "tokenizer": 1,
    "encode": 3,
    "pack": 3,
}


def _sbatch_lines(script: str) -> dict:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            out[key] = value
    return out


def _fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in ``sbatch`` and ``scontrol`` first on PATH; returns where ``sbatch`` records
    each submission (``NNN.json``: its arguments and script)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    record.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.format(python=sys.executable))
    scontrol = bin_dir / "scontrol"  # `scontrol show hostnames NODELIST` of one node
    scontrol.write_text('#!/bin/sh\necho "$3"\n')
    squeue = bin_dir / "squeue"  # the queue: $FAKE_SQUEUE's lines ("%i %k"), none if absent
    squeue.write_text('#!/bin/sh\ncat "$FAKE_SQUEUE" 2>/dev/null\nexit 0\n')
    for exe in (sbatch, scontrol, squeue):
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_DIR", str(record))
    monkeypatch.setenv("FAKE_SQUEUE", str(tmp_path / "squeue.txt"))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    return record


def _array_task(job: dict, task: int) -> subprocess.CompletedProcess:
    """Run a submitted array's command (without ``srun``) as Slurm runs array task ``task``."""
    command = shlex.split(job["script"].strip().splitlines()[-1])[4:]
    env = _env(SLURM_ARRAY_TASK_ID=str(task), SLURM_JOB_ID="1001", SLURM_NODELIST="node1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_slurm_submission_from_the_cli(tmp_path, corpus, monkeypatch):
    """``llmkit prepare --executor slurm`` with a stand-in ``sbatch`` on PATH (datatrove runs
    it as a program): each stage's array, in order, and nothing else (no datatrove
    ``merge_stats`` job), with every value checked: array size, the dependency on the stage
    before (``afterok``), partition, time, CPUs, job name, logs under the work directory, the
    ``--comment`` a rerun finds them by, and the command, which is llmkit's launcher (never
    ``launch_pickled_pipeline``); that command, run as Slurm would
    run array task 1 of the first stage, runs that rank and only it. Then the CLI said it
    submitted, wrote no output, and exited 0."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    record = _fake_slurm(tmp_path, monkeypatch)
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--executor", "slurm", "--tasks", "3", "--work-dir", str(work)]
    args += ["--slurm-partition", "cpu", "--slurm-time", "01:30:00", "--slurm-cpus", "2"]
    result = CliRunner().invoke(app, ["prepare", str(corpus), "--output", str(out), *args, *COMMON])
    assert result.exit_code == 0, result.output
    assert "submitted to slurm" in result.output and not out.exists()

    jobs = [json.loads(p.read_text()) for p in sorted(record.glob("*.json"))]
    assert len(jobs) == len(STAGE_TASKS)  # each stage's array; no merge_stats job
    tag = "llmkit-" + hashlib.sha256(str(work).encode()).hexdigest()[:12]
    for i, (stage, n) in enumerate(STAGE_TASKS.items()):
        array, array_id = jobs[i], 1000 + i + 1
        sb = _sbatch_lines(array["script"])
        assert sb["array"] == f"0-{n - 1}"
        assert (sb["partition"], sb["time"], sb["cpus-per-task"]) == ("cpu", "01:30:00", "2")
        assert sb["job-name"] == f"llmkit-{stage}"
        assert sb["output"] == sb["error"] == f"{work}/logs/slurm/%A_%a.out"
        assert sb["comment"] == tag  # how a rerun finds this job's arrays in the queue
        wanted = ["--export=ALL,RUN_OFFSET=0"]
        if i:  # afterok: a stage starts only when every task of the one before succeeded
            wanted.append(f"--dependency=afterok:{array_id - 1}")
        assert array["args"] == wanted
        command = array["script"].strip().splitlines()[-1]
        assert shlex.split(command) == [
            "srun",
            "-l",
            "-n",
            "1",
            sys.executable,
            "-m",
            "llmkit.data.distributed.launch",
            stage,
            str(work),
            "--tasks",
            str(n),
            "--tasks-per-job",
            "1",
            "--max-array-size",
            "1001",
        ]
        assert "launch_pickled_pipeline" not in array["script"]
        assert "merge_stats" not in array["script"]
        assert json.loads((work / "logs" / stage / "ranks_to_run.json").read_text()) == list(
            range(n)
        )

    # the first stage's command, as Slurm runs array task 1: that rank, and only it
    done = _array_task(jobs[0], 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (work / "logs/signatures/completions").iterdir()) == ["00001"]


def test_slurm_rerun_while_queued_submits_nothing(tmp_path, corpus, monkeypatch):
    """Run again while the job's arrays are still queued or running (``squeue`` lists jobs
    with its ``--comment``): refused in one line naming them, exit 2, nothing submitted (it
    submitted every unfinished task a second time). Another job's entries, or an empty
    queue, do not stop it."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    record = _fake_slurm(tmp_path, monkeypatch)
    work = tmp_path / "work"
    args = ["--executor", "slurm", "--tasks", "2", "--work-dir", str(work)]
    args += ["--slurm-partition", "cpu", "--slurm-time", "1:00:00", *COMMON]

    def run(out: str):
        return CliRunner().invoke(app, ["prepare", str(corpus), "--output", out, *args])

    assert run(str(tmp_path / "out")).exit_code == 0
    assert len(list(record.glob("*.json"))) == 7
    tag = _sbatch_lines(json.loads((record / "001.json").read_text())["script"])["comment"]
    (tmp_path / "squeue.txt").write_text(f"1003_[0-1] {tag}\n1004 {tag}\n77 llmkit-0123abcd\n")
    again = run(str(tmp_path / "out"))
    assert again.exit_code == 2, again.output
    line = again.output.strip().splitlines()[-1]
    assert line.startswith(f"error: 2 Slurm jobs of the work directory {work} are still queued")
    assert "(1003_[0-1], 1004)" in line and "scancel" in line
    assert len(list(record.glob("*.json"))) == 7
    (tmp_path / "squeue.txt").write_text("77 llmkit-0123abcd\n")  # another job's only
    assert run(str(tmp_path / "out")).exit_code == 0
    assert len(list(record.glob("*.json"))) == 14  # every task unfinished: submitted again


def test_slurm_failed_task_is_reported_by_the_next_run(tmp_path, shakespeare_slice, monkeypatch):
    """On Slurm the command returns once the arrays are submitted, so a task that fails later
    (invalid UTF-8 in its shard) is reported by the next run of the same command: its one
    line (stage, task, shard, line), exit 2, nothing submitted again (the failed task would
    only fail again, and the arrays after it still wait in the queue, never to start:
    DependencyNeverSatisfied, as seen on a real Slurm). It was resubmitted silently."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    record = _fake_slurm(tmp_path, monkeypatch)
    bad = tmp_path / "in"
    bad.mkdir()
    text = shakespeare_slice.read_bytes()
    cut = text.index(b"\n\n", 40_000)
    (bad / "x.txt").write_bytes(text[:cut] + b"\n\nbad \xff byte\n\n" + text[cut:])
    work, out = tmp_path / "work", tmp_path / "out"
    args = [str(bad), "--output", str(out), "--executor", "slurm", "--tasks", "2"]
    args += ["--work-dir", str(work), "--slurm-partition", "cpu", "--slurm-time", "1:00:00"]
    first = CliRunner().invoke(app, ["prepare", *args, *COMMON])
    assert first.exit_code == 0 and "submitted to slurm" in first.output, first.output
    jobs = [json.loads(p.read_text()) for p in sorted(record.glob("*.json"))]
    assert len(jobs) == 7
    ran = [_array_task(jobs[0], task) for task in (0, 1)]  # the signatures array
    assert sorted(r.returncode != 0 for r in ran) == [False, True]  # one shard holds the byte
    again = CliRunner().invoke(app, ["prepare", *args, *COMMON])
    assert again.exit_code == 2, again.output
    line = again.output.strip().splitlines()[-1]
    assert re.match(
        rf"error: signatures task [01] of 2, shard \d+ \({re.escape(str(bad))}/x.txt, bytes ", line
    )
    bad_line = text[:cut].count(b"\n") + 3
    assert f"x.txt:{bad_line}: invalid UTF-8 (byte 0xff" in line
    assert "scancel" in line and f"{work}/errors" in line
    assert len(list(record.glob("*.json"))) == 7  # nothing submitted again
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Slurm: one node, Debian's slurm-wlm, everything under a temporary directory.

SLURM_CONF = """\
ClusterName=llmkit-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={base}/munge.sock
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=4096 State=UNKNOWN
PartitionName=llmkit Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

# Slurm's name lookups (getaddrinfo) fail in a namespace whose only address is loopback's
# 127.0.0.1/8: a second address on lo (reachable from nowhere else) lets "localhost" resolve.
SLURM_SCRIPT = """\
ip link set lo up
ip addr add 10.254.0.1/32 dev lo
cd {base}
export SLURM_CONF={base}/slurm.conf
mungekey --create --keyfile={base}/munge.key
munged --foreground --force --key-file={base}/munge.key --socket={base}/munge.sock \\
  --pid-file={base}/munged.pid --seed-file={base}/munged.seed --log-file={base}/munged.log &
MUNGED=$!
for i in $(seq 50); do [ -S {base}/munge.sock ] && break; sleep 0.2; done
slurmctld -D -i -f {base}/slurm.conf > {base}/slurmctld.out 2>&1 &
SLURMCTLD=$!
slurmd -D -f {base}/slurm.conf -N localhost > {base}/slurmd.out 2>&1 &
SLURMD=$!
stop() {{ kill $SLURMD $SLURMCTLD $MUNGED 2>/dev/null; wait $SLURMD $SLURMCTLD $MUNGED; }}
trap stop EXIT
for i in $(seq 60); do [ "$(sinfo -h -o %t)" = idle ] && break; sleep 1; done
[ "$(sinfo -h -o %t)" = idle ] || {{ echo "the node did not come up"; exit 3; }}
{prepare} > first.out 2>&1
rc=0; {prepare} > early.out 2>&1 || rc=$?; echo $rc > early.rc
for i in $(seq {wait_s}); do [ -z "$(squeue -h)" ] && break; sleep 1; done
squeue -h > left-in-queue.txt
{prepare} > second.out 2>&1
{prepare_again} > third.out 2>&1
"""


def _slurm_missing() -> str | None:
    need = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun")
    missing = [x for x in need if not shutil.which(x)]
    if missing:
        return (
            f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm; "
            "make install does it when it can)"
        )
    return None


@pytest.mark.slow
def test_one_node_slurm_cluster(corpus, reference):
    """munged, slurmctld and slurmd (2 CPUs) started in ``unshare --net --pid`` with their
    configuration, key, state and sockets in a temporary directory; ``llmkit prepare
    --executor slurm --tasks 2`` submits the seven job arrays and returns (exit 0, "submitted");
    run again at once, while they are queued, it is refused (exit 2) and submits nothing;
    once the queue is empty the same command writes the output, equal to ``--num-proc 1``;
    a third run with another ``--output`` submits nothing. Every job exited 0. The daemons
    are stopped by their process ids, and everything left by the namespace's end. About
    three minutes."""
    why = _can_unshare() or _slurm_missing()
    if why:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="lkslurm-", dir="/tmp"))
    (base / "state").mkdir()
    (base / "spool").mkdir()
    (base / "slurm.conf").write_text(SLURM_CONF.format(base=base))
    out, work = base / "out", base / "work"
    args = ("--executor", "slurm", "--tasks", "2", "--work-dir", str(work))
    args += ("--slurm-partition", "llmkit", "--slurm-time", "00:20:00", "--slurm-cpus", "1")
    prepare = _llmkit(str(corpus), "--output", str(out), *args, *COMMON)
    again = _llmkit(str(corpus), "--output", str(base / "out2"), *args, *COMMON)
    script = SLURM_SCRIPT.format(
        base=base, prepare=shlex.join(prepare), prepare_again=shlex.join(again), wait_s=600
    )
    (base / "run.sh").write_text(script)
    marker = uuid.uuid4().hex
    # PATH as it is: the jobs need nothing from an activated virtual environment
    env = _env(LLMKIT_TEST_CLUSTER=marker)
    log = base / "run.log"
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*cmd, "sh", "-eu", str(base / "run.sh")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=900)
        finally:
            _stop_group(proc)
            _assert_none_left(marker)
    try:
        text = {n: (base / n).read_text(errors="replace") for n in ("run.log", "slurmctld.log")}
        assert rc == 0, text["run.log"][-3000:] + text["slurmctld.log"][-3000:]
        first = (base / "first.out").read_text()
        assert "submitted to slurm" in first, first[-2000:]
        early = (base / "early.out").read_text()  # run again at once: the arrays are queued
        assert (base / "early.rc").read_text().strip() == "2", early[-2000:]
        assert f"Slurm jobs of the work directory {work} are still queued" in early
        assert (base / "left-in-queue.txt").read_text() == ""
        second, third = ((base / n).read_text() for n in ("second.out", "third.out"))
        assert f"llmkit prepare -> {out} " in second, second[-2000:]
        assert f"llmkit prepare -> {base / 'out2'} " in third, third[-2000:]
        manifest = assert_same_output(out, reference)
        assert manifest["settings"]["executor"] == "slurm"
        assert_same_output(base / "out2", reference)
        ctld = text["slurmctld.log"]
        submitted = ctld.count("_slurm_rpc_submit_batch_job: JobId=")
        assert submitted == 7, ctld[-3000:]  # the seven job arrays, all from the first run
        ends = [x for x in ctld.splitlines() if "_job_complete" in x and "WEXITSTATUS" in x]
        assert ends and all(x.endswith("WEXITSTATUS 0") for x in ends), ends
        ids = [re.search(r"JobId=(\d+)_(\d+)\(", x).groups() for x in ends]
        assert len(ids) == len(set(ids)), ids  # each array task ran once
        sizes = {j: sum(1 for x, _ in ids if x == j) for j, _ in ids}
        # submitted in order: signatures, groups, resolve, admit, tokenizer, encode, pack
        assert [sizes[str(j)] for j in range(1, 8)] == [2, 2, 1, 2, 1, 2, 2], ids
        scripts = sorted(work.glob("logs/*/launch_script.slurm"))
        assert len(scripts) == 7
        for s in scripts:
            body = s.read_text()
            assert "-m llmkit.data.distributed.launch" in body
            assert "launch_pickled_pipeline" not in body
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("sbatch", ["fails", "missing"])
def test_a_failed_sbatch_is_one_line_with_its_reason(tmp_path, corpus, monkeypatch, sbatch):
    """sbatch installed but no controller: the line was "a task failed: CalledProcessError:
    Command '['sbatch', ...]' returned non-zero exit status 1", sbatch's reason only in the
    log. Now sbatch's last stderr line, and a hint; exit 2, no output. Without sbatch on
    PATH: one line saying it cannot be run."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if sbatch == "fails":
        fake = bin_dir / "sbatch"
        fake.write_text(
            "#!/bin/sh\necho 'sbatch: error: something first' >&2\n"
            "echo 'sbatch: error: Batch job submission failed: Unable to contact slurm "
            "controller (connect failure)' >&2\nexit 1\n"
        )
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    else:
        monkeypatch.setenv("PATH", str(bin_dir))  # nothing: no sbatch, no squeue
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--executor", "slurm", "--tasks", "2", "--work-dir", str(work)]
    args += ["--slurm-partition", "cpu", "--slurm-time", "10"]
    result = CliRunner().invoke(app, ["prepare", str(corpus), "--output", str(out), *args, *COMMON])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    if sbatch == "fails":
        assert line.startswith(
            "error: sbatch failed: sbatch: error: Batch job submission failed: Unable to "
            "contact slurm controller (connect failure) — check that Slurm is reachable (sinfo)"
        ), line
        [log] = (work / "logs").glob("console-*.log")  # sbatch's whole stderr is kept there
        assert "something first" in log.read_text() and "Unable to contact" in log.read_text()
    else:
        assert line.startswith("error: sbatch failed: cannot run it (No such file"), line
    assert "CalledProcessError" not in line and not out.exists()
