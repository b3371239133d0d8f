"""What ``--executor`` promises for documents holds for chat data and web archives too: every
output file byte for byte as ``--num-proc 1`` writes it (rows with the datasets' ``state.json``,
the tokenizer with its chat template, ``dropped.jsonl`` with ``--keep-dropped``,
``lengths.png``) and the manifest on every key but the executor's own and the time; a rerun
is up to date; a given tokenizer is loaded once by the command and every task loads the one
saved in the work directory; datatrove's log lines go to the work directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import MODELS, shared_file
from typer.testing import CliRunner

from llmkit.cli import app

pytest.importorskip("datatrove")

SUPPORT = Path(__file__).resolve().parents[3] / "examples" / "support"
#: The manifest entries a distributed run may differ in from ``--num-proc 1`` (as for
#: documents, ``test_distributed_cli.py``): anything else that differs is drift.
MAY_DIFFER = {"created", "executor", "settings.executor", "settings.tasks", "settings.work_dir"}
CHAT = ("--vocab-size", "400", "--block-size", "384", "--on-error", "skip", "--keep-dropped")


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


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


def _dropped(out: Path) -> list[dict]:
    lines = (out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines]


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory) -> Path:
    """The support conversations (cut into shards), Alpaca records, and a file of exact
    copies of support conversations (dropped in other shards than their first occurrence)
    and a record the template step skips (a special token in text)."""
    d = tmp_path_factory.mktemp("chat")
    lines = (SUPPORT / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    (d / "a_support.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "b_alpaca.jsonl").write_bytes((SUPPORT / "alpaca.jsonl").read_bytes())
    extra = random.Random(7).sample(lines, 5)
    special = {"role": "user", "content": "a <|im_end|> b"}
    extra.append(json.dumps({"messages": [special, {"role": "assistant", "content": "c"}]}))
    (d / "c_copies.jsonl").write_text("\n".join(extra) + "\n", encoding="utf-8")
    return d


def test_chat_output_is_one_process_byte_for_byte_and_a_rerun_is_up_to_date(tmp_path, chat_corpus):
    """Before the merge the chat manifest lacked fingerprint/cache/files, ``lengths.png`` and
    ``dropped.jsonl`` were not written, the splits' ``state.json`` differed (another dataset
    fingerprint) and a rerun ran the job again."""
    ref, out, work = tmp_path / "ref", tmp_path / "out", tmp_path / "work"
    first = cli(str(chat_corpus), "--output", str(ref), "--num-proc", "1", "--no-cache", *CHAT)
    assert first.exit_code == 0, first.output
    dist = ("--executor", "local", "--tasks", "2", "--work-dir", str(work), "--num-proc", "1")
    done = cli(str(chat_corpus), "--output", str(out), *dist, "--no-cache", *CHAT)
    assert done.exit_code == 0, done.output
    assert_same_output(out, ref)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["executor"]["shards"] >= 3 and manifest["fingerprint"] is not None
    assert {"lengths.png", "dropped.jsonl", "train/state.json"} <= set(manifest["files"])
    dropped = _dropped(out)
    assert len(dropped) == 5 and {d["reason"] for d in dropped} == {"duplicate"}
    assert all(d["where"].startswith(f"{chat_corpus / 'c_copies.jsonl'}:") for d in dropped)
    assert all(isinstance(d["messages"], list) for d in dropped)
    # datatrove's log lines went to the work directory, not the terminal
    assert "datatrove" not in done.output and "| INFO" not in done.output
    (log,) = (work / "logs").glob("console-*.log")
    assert log.read_text().count("Launching pipeline for rank=") == 2 + 2 + 1 + 2 + 1 + 2 + 1 + 2

    written, runs = files_of(out), len(list((work / "runs").iterdir()))
    for args in (dist, ("--num-proc", "1")):
        rerun = cli(str(chat_corpus), "--output", str(out), *args, *CHAT)
        assert rerun.exit_code == 0, rerun.output
        assert f"{out} is up to date" in rerun.output
    assert files_of(out) == written and len(list((work / "runs").iterdir())) == runs


@pytest.fixture
def spy_tokenizer_loads(monkeypatch) -> list[str]:
    """What the job's tasks pass to ``load_pretrained_tokenizer`` (the calls made under
    datatrove's executor; one worker: the local executor runs the tasks in this process)."""
    import traceback

    import llmkit.data.encode as encode

    calls: list[str] = []
    real = encode.load_pretrained_tokenizer

    def spy(name, **kw):
        if any("datatrove" in f.filename for f in traceback.extract_stack()):
            calls.append(str(name))
        return real(name, **kw)

    monkeypatch.setattr(encode, "load_pretrained_tokenizer", spy)
    return calls


def _chat_with_tokenizer(tmp_path, chat_corpus, tokenizer: str, calls: list[str]) -> None:
    rules = ("--tokenizer", tokenizer, "--chat-template", "chatml", *CHAT)
    ref, out, work = tmp_path / "ref", tmp_path / "out", tmp_path / "work"
    first = cli(str(chat_corpus), "--output", str(ref), "--num-proc", "1", "--no-cache", *rules)
    assert first.exit_code == 0, first.output
    calls.clear()
    dist = ("--executor", "local", "--tasks", "2", "--work-dir", str(work), "--num-proc", "1")
    done = cli(str(chat_corpus), "--output", str(out), *dist, "--no-cache", *rules)
    assert done.exit_code == 0, done.output
    assert_same_output(out, ref)
    # every task loaded the tokenizer the command saved, with its template, never the given one
    assert len(calls) >= 2
    assert all(Path(c).resolve() != Path(tokenizer).resolve() for c in calls), calls
    saved = json.loads((work / "chat_tokenizer.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert saved["resolved"] == manifest["tokenizer"]["chat_template"] == "chatml"
    assert saved["added_tokens"] == manifest["tokenizer"]["added_tokens"]
    assert manifest["tokenizer"]["path"] == tokenizer and not manifest["tokenizer"]["trained"]


def test_chat_with_a_tokenizer_directory_uses_the_one_saved_in_the_work_dir(
    tmp_path, chat_corpus, tiny_tokenizer, spy_tokenizer_loads
):
    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    _chat_with_tokenizer(tmp_path, chat_corpus, str(tok), spy_tokenizer_loads)
    assert json.loads((tmp_path / "work" / "chat_tokenizer.json").read_text())["added_tokens"]


GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent (the shared GGUF model)")
def test_chat_with_a_gguf_tokenizer_uses_the_one_saved_in_the_work_dir(
    tmp_path, chat_corpus, spy_tokenizer_loads
):
    """The GGUF is read by the command once (about 20 s a read), never by a task."""
    _chat_with_tokenizer(tmp_path, chat_corpus, str(GGUF), spy_tokenizer_loads)


def test_web_archives_keep_dropped_is_one_process_byte_for_byte(tmp_path, shakespeare_slice):
    """Before: under --executor a web page's URL was not carried with its document, so the
    dropped pages of dropped.jsonl had no ``url``."""
    pytest.importorskip("warcio")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_bytes(shakespeare_slice.read_bytes()[:30_000])
    for name in ("example.warc.gz", "example-iana.org-chunked.warc", "example-trunc.warc"):
        (inputs / f"b_{name}").write_bytes(shared_file(f"warc/{name}").read_bytes())
    copy = shared_file("warc/example-iana.org-chunked.warc").read_bytes()
    (inputs / "d_copy.warc").write_bytes(copy)  # its pages dropped as duplicates
    common = ("--vocab-size", "300", "--block-size", "32", "--on-error", "skip", "--no-cache")
    common += ("--keep-dropped",)
    ref, out = tmp_path / "ref", tmp_path / "out"
    first = cli(str(inputs), "--output", str(ref), "--num-proc", "1", *common)
    assert first.exit_code == 0, first.output
    dist = ("--executor", "local", "--tasks", "2", "--work-dir", str(tmp_path / "work"))
    done = cli(str(inputs), "--output", str(out), *dist, "--num-proc", "1", *common)
    assert done.exit_code == 0, done.output
    assert_same_output(out, ref)
    urls = [d["url"] for d in _dropped(out) if "url" in d]
    assert "http://www.iana.org/" in urls and all(u.startswith("http") for u in urls)


def test_the_slurm_launcher_knows_every_stage_of_both_paths(tmp_path):
    """A Slurm array task is a fresh ``python -m llmkit.data.distributed.launch STAGE``: every
    stage name of a text job and of a chat job is one it accepts (argparse's choices)."""
    import os
    import subprocess
    import sys

    from llmkit.data.distributed.chat import chat_stage_tasks
    from llmkit.data.distributed.job import STAGES, JobSpec

    spec = JobSpec(work_dir=str(tmp_path), inputs=[], tasks=2, partitions=2)
    names = [*STAGES, *chat_stage_tasks(spec)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    done = subprocess.run(
        [sys.executable, "-m", "llmkit.data.distributed.launch", "--help"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    choices = done.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert set(names) <= set(choices) and len(set(names)) == 7 + 6
