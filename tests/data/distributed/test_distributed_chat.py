"""``llmkit prepare --executor local`` on chat data (conversations): the rows (``input_ids``,
``labels``, ``position_ids``), the split entries (packing counters, answers located, skipped
conversations), the stages, the inputs, the chat section and the tokenizer equal
``llmkit prepare --num-proc 1`` for 1 and 2 tasks; the packing layout equals SFTPacker's own
rule; a failed conversation under ``--on-error fail`` is one line, as in one process; a task
killed mid-way and the job run again gives the same rows; the Slurm submission of the eight
chat stages."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmkit.cli import app

pytest.importorskip("datatrove")

SUPPORT = Path(__file__).resolve().parents[3] / "examples" / "support"
COMMON = ("--vocab-size", "400", "--no-plot", "--on-error", "skip")
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The support conversations (cut into two shards), Alpaca records, and a file of exact
    copies of support conversations (other shards than their first occurrence), a record the
    reader skips (a bad role), one the template step skips (a special token in text) and one
    longer than a row."""
    d = tmp_path_factory.mktemp("chat")
    lines = (SUPPORT / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    (d / "a_support.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "b_alpaca.jsonl").write_bytes((SUPPORT / "alpaca.jsonl").read_bytes())
    rng = random.Random(5)
    extra = [*rng.sample(lines, 6)]
    extra.append(json.dumps({"messages": [{"role": "bot", "content": "Hi"}]}))
    special = {"role": "user", "content": "a <|im_end|> b"}
    extra.append(json.dumps({"messages": [special, GOOD["messages"][1]]}))
    extra.append(json.dumps(GOOD))
    answer = " ".join(json.loads(x)["messages"][-1]["content"] for x in lines[:12])
    long = [
        {"role": "user", "content": "Tell me everything."},
        {"role": "assistant", "content": answer},
    ]
    extra.append(json.dumps({"messages": long}))  # longer than a row: truncated
    (d / "c_copies.jsonl").write_text("\n".join(extra) + "\n", encoding="utf-8")
    return d


def _prepare(corpus: Path, out: Path, *args: str) -> None:
    result = cli(str(corpus), "--output", str(out), *args)
    assert result.exit_code == 0, result.output


def _loaded(out: Path) -> dict:
    from llmkit.core.prepared import load_prepared

    data = load_prepared(out)  # what `llmkit train` reads
    return {
        "train": data.train.to_dict(),
        "validation": data.validation.to_dict(),
        "manifest": data.manifest.as_dict(),
    }


def _same(got: dict, ref: dict, work: Path) -> None:
    for name in ("train", "validation"):
        assert list(got[name]) == ["input_ids", "labels", "position_ids"]
        assert got[name] == ref[name]
    g, r = got["manifest"], ref["manifest"]
    for key in ("inputs", "stages", "splits", "chat", "warnings", "length_histogram"):
        assert g[key] == r[key], key
    tok_g, tok_r = dict(g["tokenizer"]), dict(r["tokenizer"])
    tok_g.pop("path"), tok_r.pop("path")  # the job records the directory resolved
    assert tok_g == tok_r
    # as prepare records them, and the executor's; num_proc: --num-proc as given (the local
    # executor's workers), where prepare records the processes it used
    skip = ("executor", "tasks", "work_dir", "num_proc")
    assert {k: v for k, v in g["settings"].items() if k not in skip} == {
        k: v for k, v in r["settings"].items() if k not in skip
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("ref") / "out"
    _prepare(corpus, out, "--num-proc", "1", "--no-cache", "--block-size", "384", *COMMON)
    return out


@pytest.mark.parametrize("tasks", [1, 2])
def test_chat_rows_and_manifest_equal_num_proc_1(tmp_path, corpus, reference, tasks):
    out = tmp_path / "out"
    work = tmp_path / "work"
    args = ("--executor", "local", "--tasks", str(tasks), "--work-dir", str(work))
    _prepare(corpus, out, *args, "--num-proc", "1", "--block-size", "384", *COMMON)
    got, ref = _loaded(out), _loaded(reference)
    _same(got, ref, work)
    m = ref["manifest"]
    # what the corpus is there for: each case happened
    assert m["stages"]["deduplicate"]["dropped"] == {"duplicate": 6}
    assert m["inputs"][2]["skipped"] == {"bad role": 1}
    skipped = sum(s["skipped"].get("special token in text", 0) for s in m["splits"].values())
    assert skipped == 1
    assert m["splits"]["train"]["packing"]["truncated"] > 0
    assert [w.split(":")[0] for w in m["warnings"]] == [
        f"{corpus}/c_copies.jsonl",
        "train",
        "train",
    ]
    assert m["chat"]["record_formats"] == {"alpaca": 10, "messages": 81 + 6 + 3}
    assert sum(m["chat"]["answers_located"].values()) > 0
    assert got["manifest"]["executor"]["shards"] >= 4  # the large file was cut
    rows = [np.load(p) for p in sorted((work / "chat_rows" / "train").iterdir())]
    rows = [r for r in rows if r.size]
    assert any(a[-1] == b[0] for a, b in zip(rows, rows[1:], strict=False))  # a row spans shards
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.slow
def test_pretrained_tokenizer_train_on_all_overlong_drop(tmp_path, corpus, tiny_tokenizer):
    """A given tokenizer given ChatML (its marker tokens added), loss on every token,
    overlong conversations dropped: the same as one process, for 2 tasks (about 30 s)."""
    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    rules = ("--tokenizer", str(tok), "--chat-template", "chatml", "--train-on", "all")
    rules += ("--overlong", "drop", "--block-size", "96", *COMMON)
    _prepare(corpus, tmp_path / "ref", "--num-proc", "1", "--no-cache", *rules)
    args = ("--executor", "local", "--tasks", "2", "--work-dir", str(tmp_path / "work"))
    _prepare(corpus, tmp_path / "out", *args, *rules)
    got, ref = _loaded(tmp_path / "out"), _loaded(tmp_path / "ref")
    _same(got, ref, tmp_path / "work")
    m = ref["manifest"]
    assert m["splits"]["train"]["packing"]["dropped"] > 0
    assert m["tokenizer"]["added_tokens"] == ["<|im_end|>", "<|im_start|>"]
    assert any("added to the vocabulary" in w for w in m["warnings"])


def test_failed_conversation_is_one_line_as_in_one_process(tmp_path):
    """Under --on-error fail the first conversation in order that the template refuses stops
    the run with prepare's own message (file:line), exit 2, and nothing is written."""
    path = tmp_path / "chat.jsonl"
    bad = {"messages": [{"role": "user", "content": "a <|im_end|> b"}, GOOD["messages"][1]]}
    records = [GOOD, {"prompt": "Ping", "response": "Pong"}, bad, GOOD]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    args = ("--vocab-size", "300", "--no-plot", "--block-size", "32", "--val-fraction", "0")
    one = cli(str(path), "--output", str(tmp_path / "one"), "--no-cache", *args)
    dist = cli(
        str(path), "--output", str(tmp_path / "out"), "--executor", "local",
        "--work-dir", str(tmp_path / "w"), *args,
    )  # fmt: skip
    assert one.exit_code == dist.exit_code == 2, dist.output
    line = [x for x in dist.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and f"{path}:3" in line[0] and "'<|im_end|>'" in line[0]
    message = line[0].split("chat_layout task 0 of 1: ")[-1].split(" — ")[0]
    assert f"error: {message} — " in one.output.replace("\n", " ")  # prepare's own words
    assert not (tmp_path / "out").exists()


def test_chat_template_tokenizer_without_tokenizer_is_refused(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    result = cli(
        str(path), "--output", str(tmp_path / "o"), "--executor", "local", "--work-dir",
        str(tmp_path / "w"), "--chat-template", "tokenizer",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--chat-template tokenizer needs a pretrained tokenizer" in result.output
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("block_size", [4, 7, 16])
def test_row_layout_is_sftpackers_rule(block_size):
    """assign_rows over lengths, shard after shard, gives each conversation the row
    SFTPacker puts it in, and the rows it writes."""
    from llmkit.data.distributed.chat import _opened, assign_rows
    from llmkit.data.pack import SFTPacker

    rng = np.random.default_rng(block_size)
    lengths = rng.integers(2, block_size + 1, size=300)  # 2+: one label left to train on
    lengths[rng.integers(0, 300, size=30)] = block_size  # rows filled by one conversation
    packer = SFTPacker(block_size, pad_token_id=0)
    expected = []
    for m in lengths:
        packer.add([(np.arange(1, m + 1), np.arange(1, m + 1))])
        # the open row holds it, or it filled its row, which closed
        expected.append(packer.rows if packer._fill else packer.rows - 1)
    packer.flush()
    state, got = (0, 0), []
    for part in np.array_split(lengths, 7):
        rows, state = assign_rows(part, block_size, state)
        got += rows.tolist()
    assert got == expected
    assert _opened(state) == packer.rows


def _chat_spec(work: Path, corpus: Path, tasks: int):
    """The job ``--executor local --tasks N`` makes of the reference's settings."""
    from llmkit.data.config import PrepareSettings
    from llmkit.data.distributed.prepare import job_spec

    flags = {"executor": "local", "tasks": tasks, "work_dir": str(work), "vocab_size": 400}
    flags |= {"block_size": 384, "on_error": "skip", "plot": False}
    return job_spec([str(corpus)], PrepareSettings.load(None, flags), "chat")


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_rows(tmp_path, corpus, reference):
    """A chat_encode task killed mid-way (SIGKILL), the job run again: the finished tasks are
    not run again, and the rows equal one process's (about 20 s)."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    from llmkit.data.distributed.chat import assemble_chat
    from llmkit.data.distributed.job import ENV_HANG, Work, completed_tasks, run_job

    spec = _chat_spec(tmp_path / "work", corpus, 2)
    script = (
        "import sys, json; from llmkit.data.distributed.job import JobSpec, run_job; "
        "run_job(JobSpec(**json.loads(sys.argv[1])), 'local', workers=1)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), ENV_HANG: "chat_encode:1"}
    p = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(dataclasses.asdict(spec))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = Work(spec.work_dir)
    deadline = time.time() + 120
    while not work.exists("hang/chat_encode-00001") and time.time() < deadline:
        assert p.poll() is None
        time.sleep(0.3)
    os.kill(int(work.read_bytes("hang/chat_encode-00001")), signal.SIGKILL)
    p.wait(timeout=30)
    before = completed_tasks(spec)
    assert before["chat_admit"] == 2 and before["chat_encode"] == 1
    assert before["chat_layout"] == before["chat_pack"] == 0
    runs = len(work.listdir("runs"))
    run_job(spec, "local", workers=1)
    assert len(work.listdir("runs")) - runs == 1 + 1 + 2  # encode 1, layout, pack 0-1
    assemble_chat(spec, tmp_path / "out")
    got, ref = _loaded(tmp_path / "out"), _loaded(reference)
    for name in ("train", "validation"):
        assert got[name] == ref[name]


def test_slurm_submission_of_a_chat_job(tmp_path, corpus, monkeypatch):
    """Eight job arrays, in order, each depending on the one before; each array task runs
    ``python -m llmkit.data.distributed.launch STAGE``, which knows the chat stages."""
    import datatrove.executor.slurm as slurm

    from llmkit.data.distributed import launch
    from llmkit.data.distributed.job import build_executors, plan_job

    submitted = []
    monkeypatch.setattr(
        slurm, "launch_slurm_job", lambda c, r, *a: submitted.append((c, a)) or str(len(submitted))
    )
    spec = _chat_spec(tmp_path / "work", corpus, 3)
    plan_job(spec)
    executors = build_executors(
        spec, "slurm", partition="cpu", time="01:00:00", slurm_logs_folder=str(tmp_path / "sl")
    )
    executors[-1].run()
    jobs = [(c, a) for c, a in submitted if "llmkit.data.distributed.launch" in c]
    stages = [c.split("llmkit.data.distributed.launch ", 1)[1].split()[0] for c, _ in jobs]
    assert stages == [
        "chat_signatures", "groups", "resolve", "chat_admit", "chat_tokenizer", "chat_encode",
        "chat_layout", "chat_pack",
    ]  # fmt: skip
    arrays = [next(x for x in c.splitlines() if "--array" in x) for c, _ in jobs]
    assert arrays == [f"#SBATCH --array=0-{n - 1}" for n in (3, 3, 1, 3, 1, 3, 1, 3)]
    for k, (_, args) in enumerate(jobs[1:]):
        assert f"--dependency=afterok:{submitted.index(jobs[k]) + 1}" in args
    with pytest.raises(SystemExit) as info:  # argparse: the stage is known, --tasks missing
        launch.main(["chat_pack", str(tmp_path / "work")])
    assert info.value.code == 2


@pytest.mark.slow
def test_ray_executor_on_chat_data(tmp_path, corpus, reference, monkeypatch):
    """``--executor ray`` on a one-node Ray instance this test starts: the chat stages run as
    Ray tasks and give the rows of one process (about a minute)."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        args = ("--executor", "ray", "--tasks", "2", "--work-dir", str(tmp_path / "work"))
        _prepare(corpus, tmp_path / "out", *args, "--block-size", "384", *COMMON)
    finally:
        ray.shutdown()
    got, ref = _loaded(tmp_path / "out"), _loaded(reference)
    for name in ("train", "validation"):
        assert got[name] == ref[name]
    assert got["manifest"]["splits"] == ref["manifest"]["splits"]
