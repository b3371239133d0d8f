"""Checkpoints run no code and fail in one line: crafted pickles in every pickle-bearing file of a
real checkpoint, truncated files, a full disk while writing a checkpoint or the final model,
and no repeated validation line when resuming from the last step."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import UserError
from llmkit.runs import is_finished_run
from llmkit.training import checkpoint as ckpt
from llmkit.training.loop import train


def _overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.path": data,
        "out_dir": out,
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "train.micro_batch_size": 4,
        "train.max_steps": 10,
        "train.warmup_steps": 2,
        "train.log_interval": 1,
        "train.save_interval": 5,
        "train.trackers": "[]",
        "eval.interval": 5,
        "train.peak_flops": 1e11,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def finished(write_prepared, tmp_path_factory, tiny_tokenizer):
    """A finished 10-step run with checkpoints at steps 5 and 10 (and best)."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_prepared(root / "data", tiny_tokenizer, 16, 24, 8)
    train(None, _overrides(data, root / "run"), progress=False)
    return root, data, root / "run"


def _copy_run(finished, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the finished run (each test damages its own)."""
    _root, data, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return data, out


class _Evil:
    """Unpickling this writes the marker file (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        code = f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('code ran')"
        return (exec, (code,))


def _one_line(result) -> str:
    """The one ``error:`` line, last on stderr (after the run's own progress lines, if the
    run had started), with no traceback."""
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.exit_code == 2, result.output
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def _resume(data: Path, out: Path, what: str):
    return CliRunner().invoke(
        app, ["train", *_overrides(data, out), "--resume", what, "--no-progress"]
    )


def test_checkpoint_holds_no_accelerate_pickle_and_rng_as_json(finished):
    _root, _data, run = finished
    step5 = run / "checkpoints" / "step-00000005"
    names = sorted(p.name for p in step5.iterdir())
    assert names == [
        "config.json",
        "model.safetensors",
        "optimizer.bin",
        "rng_state_0.json",
        "trainer_state.json",
    ]
    state = json.loads((step5 / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 5 and state["last_val_step"] == 5
    rng = json.loads((step5 / "rng_state_0.json").read_text())
    assert len(rng["torch"]) == torch.get_rng_state().numel() and len(rng["numpy"][1]) == 624


# every file of a checkpoint that a library would unpickle, and how a crafted one is written
CRAFTED = {
    "optimizer.bin": "torch",  # torch.save zip whose data.pkl names exec
    "optimizer.bin:raw": "raw",  # a bare pickle under the same name
    "scaler.pt": "torch",  # fp16 runs have one
    "random_states_0.pkl": "raw",  # accelerate's RNG pickle (older llmkit checkpoints)
    "custom_checkpoint_0.pkl": "raw",  # accelerate's registered objects (plain pickle)
    "pytorch_model.bin": "torch",
    "extra/state.pt": "torch",
}


@pytest.mark.parametrize("target", list(CRAFTED))
def test_a_crafted_pickle_in_any_checkpoint_file_never_runs(finished, tmp_path, target):
    data, out = _copy_run(finished, tmp_path)
    marker = tmp_path / "MARKER"
    step = out / "checkpoints" / "step-00000005"
    name = target.split(":")[0]
    path = step / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if CRAFTED[target] == "torch":
        torch.save({"state": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker)))
    result = _resume(data, out, str(step))
    line = _one_line(result)
    assert not marker.exists(), "the crafted pickle ran"
    assert f"file {name}" in line and "step-00000005" in line, line
    if name == "custom_checkpoint_0.pkl":
        assert "never unpickles" in line, line
    else:
        assert "is refused" in line and "nothing of it was run" in line, line
        if CRAFTED[target] == "torch":
            assert "GLOBAL exec" in line, line


def test_every_pickle_at_once_never_runs(finished, tmp_path):
    data, out = _copy_run(finished, tmp_path)
    marker = tmp_path / "MARKER"
    step = out / "checkpoints" / "step-00000010"
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (step / name).write_bytes(pickle.dumps(_Evil(marker)))
    torch.save(_Evil(marker), step / "scaler.pt")
    line = _one_line(_resume(data, out, "latest"))
    assert not marker.exists()
    assert "step-00000010 is damaged" in line


def test_distributed_checkpoint_metadata_is_vetted(tmp_path):
    """FSDP checkpoints are torch.distributed.checkpoint directories whose .metadata torch
    reads with plain pickle: a real one passes the vetting, a crafted one is refused."""
    import warnings

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4)).sum().backward()
    opt.step()
    step = tmp_path / "checkpoints" / "step-00000001"
    shards = step / "pytorch_model_fsdp_0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=shards)
    (step / "trainer_state.json").write_text("{}")
    (step / "rng_state_0.json").write_text(json.dumps(ckpt.rng_state()))
    ckpt.verify_checkpoint(step)  # a real one: no error
    marker = tmp_path / "MARKER"
    (shards / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UserError) as err:
        ckpt.verify_checkpoint(step)
    assert "pytorch_model_fsdp_0/.metadata" in err.value.message
    assert "builtins.exec" in err.value.message and not marker.exists()


def _dcp_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A real torch.distributed.checkpoint of a model and its AdamW state, written on CPU in
    one process (what accelerate writes under FSDP), as an llmkit step checkpoint."""
    import warnings

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4)).sum().backward()
    opt.step()
    step = tmp_path / "checkpoints" / "step-00000001"
    shards = step / "pytorch_model_fsdp_0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=shards)
    (step / "trainer_state.json").write_text("{}")
    (step / "rng_state_0.json").write_text(json.dumps(ckpt.rng_state()))
    return step, shards


def test_a_crafted_pickle_item_in_a_distcp_shard_never_runs(tmp_path):
    """torch reads the BYTE_IO items of .distcp shards with torch.load(weights_only=False)
    (torch/distributed/checkpoint/default_planner.py, DefaultLoadPlanner.load_bytes): an item
    replaced by a pickle that runs code is refused by the vetting; torch itself would run it."""
    import io
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    step, shards = _dcp_checkpoint(tmp_path)
    ckpt.verify_checkpoint(step)  # a real one, with its byte items (the lr, betas...): passes
    meta_file = shards / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    byte_items = [
        (i, info)
        for i, info in meta.storage_data.items()
        if isinstance(meta.state_dict_metadata[i.fqn], BytesStorageMetadata)
    ]
    assert byte_items  # AdamW's param_groups are saved as bytes
    index, info = byte_items[0]
    marker = tmp_path / "MARKER"
    evil = io.BytesIO()
    torch.save(_Evil(marker), evil)
    shard = shards / info.relative_path
    original = shard.read_bytes()
    shard.write_bytes(original + evil.getvalue())  # the item now points at the crafted bytes
    info.offset, info.length = len(original), len(evil.getvalue())
    meta_file.write_bytes(pickle.dumps(meta))
    with pytest.raises(UserError) as err:
        ckpt.verify_checkpoint(step)
    line = err.value.message
    assert f"pytorch_model_fsdp_0/{info.relative_path}" in line and repr(index.fqn) in line
    assert "is refused" in line and "GLOBAL exec" in line and "\n" not in line
    assert not marker.exists()
    # what the vetting prevents: torch's own load runs the item's code
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp.load(state, checkpoint_id=shards)
        except Exception:
            pass
    assert marker.read_text() == "code ran"


def test_a_distcp_shard_no_metadata_indexes_is_refused(tmp_path):
    step, shards = _dcp_checkpoint(tmp_path)
    shutil.copy(next(shards.glob("*.distcp")), shards / "__9_0.distcp")
    with pytest.raises(UserError) as err:
        ckpt.verify_checkpoint(step)
    assert "pytorch_model_fsdp_0/__9_0.distcp is not indexed by a .metadata" in err.value.message


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "rng_state_0.json"])
def test_a_truncated_checkpoint_file_is_one_line(finished, tmp_path, name):
    data, out = _copy_run(finished, tmp_path)
    path = out / "checkpoints" / "step-00000010" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = _one_line(_resume(data, out, "latest"))
    assert f"checkpoint step-00000010 is damaged: file {name}" in line, line
    assert "--resume" in line and "step-00000005" in line  # the earlier checkpoint to use


@pytest.mark.parametrize("text", ['{"step": "5", "tokens": 300}', "[1, 2]", "{"])
def test_a_bad_trainer_state_is_one_line(finished, tmp_path, text):
    data, out = _copy_run(finished, tmp_path)
    path = out / "checkpoints" / "step-00000010" / "trainer_state.json"
    state = json.loads(path.read_text())
    if text.startswith('{"step"'):  # the batch settings fit, the step does not
        text = json.dumps({**state, "step": "5"})
    path.write_text(text)
    line = _one_line(_resume(data, out, str(path.parent)))
    assert "trainer_state.json" in line and "step-00000010" in line, line


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def _disk_full_on(monkeypatch, when, module, attr="save"):
    """Make ``module.attr`` (a writer) write half a file and fail with ENOSPC when
    ``when(path)`` is true."""
    real = getattr(module, attr)

    def writer(obj, f, *args, **kwargs):
        path = Path(f) if isinstance(f, (str, Path)) else None
        if path is not None and when(path):
            path.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(module, attr, writer)


def test_disk_full_while_writing_a_checkpoint(
    write_prepared, tmp_path, tiny_tokenizer, monkeypatch
):
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 8)
    armed = {"on": False}
    _disk_full_on(monkeypatch, lambda p: armed["on"] and ".tmp-" in str(p), torch)
    out = tmp_path / "run"
    kept: dict[str, str] = {}

    def on_step(step, record):
        if step == 10:
            kept.update(_digest(out / "checkpoints" / "step-00000005"))
            armed["on"] = True

    with pytest.raises(UserError) as err:
        train(None, _overrides(data, out), progress=False, on_step=on_step)
    message = str(err.value)
    assert "cannot write checkpoint" in message and "No space left on device" in message
    assert "optimizer.bin" in message and "MiB free" in message and "keep_last" in message
    assert "step-00000005 is intact" in message
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000005"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert _digest(root / "step-00000005") == kept
    ckpt.verify_checkpoint(root / "step-00000005")
    # the CLI says the same in one line (still armed: the first checkpoint fails)
    result = CliRunner().invoke(app, ["train", *_overrides(data, out), "--overwrite"])
    assert "cannot write checkpoint" in _one_line(result)


def test_disk_full_while_writing_the_final_model_then_resume(
    write_prepared, tmp_path, tiny_tokenizer, monkeypatch
):
    """The final model fails to write: one line, no model file under the run directory, the
    run unfinished; --resume latest (space freed) finishes it, with each validation once."""
    import transformers.modeling_utils as modeling_utils

    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 8)
    out = run = tmp_path / "run"
    with monkeypatch.context() as m:
        _disk_full_on(m, lambda p: ".final.tmp" in str(p), modeling_utils, "safe_save_file")
        result = CliRunner().invoke(app, ["train", *_overrides(data, out), "--no-progress"])
    line = _one_line(result)
    assert f"cannot write the final model to {run}" in line and "No space left" in line
    assert "--resume latest" in line and "step-00000010 is intact" in line
    for name in ("model.safetensors", "config.json", "llmkit_run.json", ".final.tmp"):
        assert not (run / name).exists(), name
    result = CliRunner().invoke(
        app, ["train", *_overrides(data, out), "--resume", "latest", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (run / "model.safetensors").is_file() and (run / "llmkit_run.json").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10]


def test_resuming_a_finished_run_from_its_last_checkpoint_logs_each_validation_once(
    finished, tmp_path
):
    data, run = _copy_run(finished, tmp_path)
    out = run
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = train(None, _overrides(data, out), progress=False, resume="latest")
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after if "val_loss" in r] == [5, 10]
    assert after == before
    val10 = next(r for r in before if r.get("step") == 10 and "val_loss" in r)
    assert final["val_loss"] == val10["val_loss"] and final["steps"] == 10


@pytest.mark.slow
def test_two_processes_resume_the_same_curve(write_prepared, tmp_path, tiny_tokenizer):
    """torchrun, 2 CPU processes over gloo: each writes and restores its own RNG state as JSON,
    and the resumed run repeats the straight run's losses and weights exactly (~1 min)."""
    import os
    import subprocess
    import sys

    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = {"train.max_steps": 6, "train.save_interval": 3, "eval.interval": 3}
    extra.update({"model.dropout": 0.1, "train.micro_batch_size": 2})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env["OMP_NUM_THREADS"] = "1"

    def torchrun(out: Path, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            + ["--master_port", "29531", "-m", "llmkit", "train", "--no-progress"]
            + [*_overrides(data, out, **extra), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(straight)
    step3 = straight / "checkpoints" / "step-00000003"
    assert {p.name for p in step3.glob("rng_state_*.json")} == {
        "rng_state_0.json",
        "rng_state_1.json",
    }
    assert not list(step3.glob("*.pkl"))
    shutil.copytree(straight, resumed)
    for name in ("model.safetensors", "llmkit_run.json"):
        (resumed / name).unlink()
    torchrun(resumed, "--resume", str(resumed / "checkpoints" / "step-00000003"))

    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}

    assert losses(resumed) == losses(straight) and sorted(losses(straight)) == [1, 2, 3, 4, 5, 6]
    a = (straight / "model.safetensors").read_bytes()
    assert a == (resumed / "model.safetensors").read_bytes()


def test_overwrite_that_fails_before_a_checkpoint_puts_the_finished_run_back(finished, tmp_path):
    """`train --overwrite model.name_or_path=M` whose weights are refused when they load set
    the finished run aside, failed, and left the run directory empty (the model hidden in
    .run.previous, which the error line did not name)."""
    data, out = _copy_run(finished, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = tmp_path / "refused_model"  # the run's own model, its weights a bare pickle
    shutil.copytree(out, refused, ignore=shutil.ignore_patterns("checkpoints"))
    (refused / "model.safetensors").unlink()
    (refused / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}, protocol=4))
    args = ["train", *_overrides(data, out), f"model.name_or_path={refused}", "--overwrite"]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    line = _one_line(result)
    assert "its pickled weights (.bin) are refused" in line, line
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / ".run.previous").exists()
    assert is_finished_run(out)
