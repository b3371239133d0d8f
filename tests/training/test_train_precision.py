"""fp16 with a dynamic loss scaler, and torch.compile, on the CPU: a few steps train, the
non-finite-step handling and checkpoints / resume still work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.training import setup as training_setup  # not setup_module: a pytest hook name
from llmkit.training import step as step_module
from llmkit.training.checkpoint import list_checkpoints
from llmkit.training.loop import train


def _overrides(data: Path, run: Path, **extra) -> list[str]:
    base = {
        "data.path": data,
        "out_dir": run,
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "train.micro_batch_size": 4,
        "train.max_steps": 10,
        "train.warmup_steps": 0,
        "train.learning_rate": 1e-2,
        "train.min_lr": 1e-3,
        "train.log_interval": 1,
        "train.save_interval": 5,
        "train.trackers": "[]",
        "train.peak_flops": 1e11,
        "eval.interval": 100,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def data(write_prepared, tmp_path, tiny_tokenizer):
    # 8 blocks repeated: a small set a tiny model can memorise, so the loss must fall
    return write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of fp16")
def test_fp16_trains_skips_a_non_finite_step_and_resumes_exactly(tmp_path, data, monkeypatch):
    """fp16 on the CPU: torch's autocast and GradScaler, handed to accelerate (which has
    fp16 on GPUs only). Parameters and optimizer stay float32; the scaler's state is in the
    checkpoints; a NaN step is skipped and halves the scale; a resumed run is exact."""
    from safetensors.torch import load_file

    dtypes = set()
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # the optimizer updates float32 parameters
        dtypes.update(p.dtype for g in self.param_groups for p in g["params"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    calls = {"n": 0}
    real = step_module.micro_batch_loss

    def nan_at_step_3(logits, targets, num_targets, world_size=1):
        calls["n"] += 1
        loss = real(logits, targets, num_targets, world_size)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(step_module, "micro_batch_loss", nan_at_step_3)
    straight = tmp_path / "straight"
    skipped = {}
    train(
        None,
        _overrides(data, straight, **{"train.mixed_precision": "fp16"}),
        progress=False,
        on_step=lambda s, r: skipped.__setitem__(s, r["skipped"]),
    )
    assert [s for s, flag in skipped.items() if flag] == [3]
    recs = {r["step"]: r for r in _records(straight) if "loss" in r}
    # the scale starts at 2^16 and halves on the overflow (no other overflow here)
    assert [recs[s]["loss_scale"] for s in range(1, 11)] == [2.0**16] * 2 + [2.0**15] * 8
    assert recs[3]["skipped"] and recs[3]["loss"] is None
    assert all(recs[s]["loss"] is not None for s in range(4, 11))
    # the loss falls; parameters, optimizer and saved weights are float32
    assert sum(recs[s]["loss"] for s in (8, 9, 10)) / 3 < recs[1]["loss"] - 0.5
    assert dtypes == {torch.float32}
    assert all(t.dtype == torch.float32 for t in load_file(straight / "model.safetensors").values())
    assert (list_checkpoints(straight)[-1] / "scaler.pt").is_file()

    # stopped at step 6, resumed from the step-5 checkpoint: the same losses as straight
    monkeypatch.setattr(step_module, "micro_batch_loss", real)
    broken = tmp_path / "broken"

    def stop(step, record):
        if step == 6:
            raise KeyboardInterrupt

    calls["n"] = 0
    monkeypatch.setattr(step_module, "micro_batch_loss", nan_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(
            None,
            _overrides(data, broken, **{"train.mixed_precision": "fp16"}),
            progress=False,
            on_step=stop,
        )
    monkeypatch.setattr(step_module, "micro_batch_loss", real)
    torch.manual_seed(999)
    train(
        None,
        _overrides(data, broken, **{"train.mixed_precision": "fp16"}),
        progress=False,
        resume="latest",
    )
    a = {r["step"]: r for r in _records(straight) if r.get("loss") is not None}
    b = {r["step"]: r for r in _records(broken) if r.get("loss") is not None}
    for step in range(6, 11):
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["loss_scale"] == b[step]["loss_scale"], step


def test_compile_trains_checkpoints_and_resumes(tmp_path, data, monkeypatch):
    """torch.compile through accelerate, with the ``eager`` backend (dynamo's graph capture
    without inductor's C++ code generation, which takes minutes on a small CPU; the slow test
    below runs inductor)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(training_setup, "COMPILE_BACKEND", "eager")
    backends = []
    real_compile = torch.compile

    def spy(model, *args, **kwargs):
        backends.append(kwargs.get("backend"))
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    _compiled_run(tmp_path, data)
    assert backends == ["eager", "eager"]  # the run and its resumed run were compiled
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled")
    assert model.get_input_embeddings().weight.shape[1] == 16


@pytest.mark.slow
def test_compile_with_inductor(tmp_path, data):
    _compiled_run(tmp_path, data)


def _compiled_run(tmp_path: Path, data: Path) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    run = tmp_path / "compiled"
    seen: dict[int, float] = {}
    train(
        None,
        _overrides(data, run, **{"model.compile": "true"}),
        progress=False,
        on_step=lambda s, r: seen.__setitem__(s, r["loss"]),
    )
    assert sum(seen[s] for s in (8, 9, 10)) / 3 < seen[1] - 0.5, seen
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005", "step-00000010"]
    from safetensors.torch import load_file

    weights = load_file(list_checkpoints(run)[0] / "model.safetensors")
    assert not any("_orig_mod" in k for k in weights)  # plain names, loadable uncompiled
    # resume from step 5 in the same process: steps 6-10 again, same losses to float noise
    (run / "llmkit_run.json").unlink()
    again: dict[int, float] = {}
    train(
        None,
        _overrides(data, run, **{"model.compile": "true"}),
        progress=False,
        resume=str(list_checkpoints(run)[0]),
        on_step=lambda s, r: again.__setitem__(s, r["loss"]),
    )
    assert sorted(again) == list(range(6, 11))
    for step in again:
        assert again[step] == pytest.approx(seen[step], rel=1e-5), step
