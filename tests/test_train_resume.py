"""Checkpoints and exact resume, the data order, non-finite steps, early stopping, --dry-run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _write_prepared
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.metrics import NLLSums
from llmkit.errors import UserError
from llmkit.training import fit as fit_module
from llmkit.training import step as step_module
from llmkit.training.batches import micro_batch_samples, step_samples
from llmkit.training.checkpoint import list_checkpoints, read_state
from llmkit.training.config import load_recipe
from llmkit.training.fit import EarlyStopping
from llmkit.training.loop import train
from llmkit.training.setup import make_scheduler

REPO = Path(__file__).resolve().parents[1]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if r.get("loss") is not None}


def _overrides(data: Path, run: Path, **extra) -> list[str]:
    base = {
        "data.path": data,
        "out_dir": run,
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "model.dropout": 0.1,
        "train.micro_batch_size": 4,
        "train.max_steps": 10,
        "train.warmup_steps": 3,
        "train.log_interval": 1,
        "train.save_interval": 5,
        "train.trackers": "[]",
        "eval.interval": 5,
        "train.peak_flops": 1e11,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_every_epoch_visits_every_block_once_and_steps_split_the_same_on_any_world():
    n, g = 26, 4  # 6 whole steps per epoch, 2 blocks dropped (a different 2 each epoch)
    for epoch in range(3):
        seen = torch.cat([step_samples(epoch * 6 + k, n, g, seed=7) for k in range(6)])
        assert len(set(seen.tolist())) == 24 and seen.max() < n
    assert not torch.equal(step_samples(0, n, g, 7), step_samples(6, n, g, 7))
    # one process x micro-batch 4 reads what two processes x 2 read together
    samples = step_samples(3, n, g, 7)
    both = torch.cat([micro_batch_samples(samples, 0, r, 2, 2) for r in range(2)])
    assert torch.equal(both, micro_batch_samples(samples, 0, 0, 1, 4))


@pytest.mark.parametrize(
    "fresh_process",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["same-process", "fresh-process"],
)
def test_resume_continues_the_same_curve(tmp_path, tiny_tokenizer, fresh_process):
    """In the same process the RNGs have moved on past step 7 before resuming, so both
    variants prove that the checkpoint, not the process, carries the state; the fresh process
    (@slow: ~20-40 s of imports on 2 busy cores) is the issue's exact test."""
    # 24 blocks, 4 per step: epoch 1 is steps 1-6, so steps 6-10 cross an epoch boundary.
    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 9)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    seen: dict[int, list[int]] = {}
    train(
        None,
        _overrides(data, straight),
        progress=False,
        on_step=lambda s, r: seen.__setitem__(s, r["samples"]),
    )
    # every block exactly once in epoch 1 (steps 1-6); epoch 2 starts afresh
    epoch1 = sorted(i for s in range(1, 7) for i in seen[s])
    assert epoch1 == list(range(24))
    epoch2 = [i for s in range(7, 11) for i in seen[s]]
    assert len(set(epoch2)) == 16

    def interrupt(step, record):
        if step == 7:  # Ctrl-C after the step-5 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(None, _overrides(data, broken), progress=False, on_step=interrupt)
    assert [p.name for p in list_checkpoints(broken)] == ["step-00000005"]
    assert read_state(broken / "checkpoints" / "step-00000005")["step"] == 5
    assert not (broken / "llmkit_run.json").exists()

    if fresh_process:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "llmkit",
                "train",
                *_overrides(data, broken),
                "--resume",
                "latest",
                "--no-progress",
                # the threads of the straight run: on a busy machine the CLI would pick fewer
                # (llmkit.runtime), and another reduction order changes the last bits
                "--threads",
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        torch.manual_seed(12345)  # disturb every RNG: the checkpoint must restore them
        train(None, _overrides(data, broken), progress=False, resume="latest")
    a, b = _losses(straight), _losses(broken)
    assert sorted(b) == list(range(1, 11))  # steps 6-7 of the broken run were replaced
    for step in range(6, 11):
        assert a[step] == b[step], step  # bitwise: the same floats
    assert all(a[s] == b[s] for s in range(1, 6))
    # the learning rate of step 6 is the schedule's value at index 5
    cfg = load_recipe(None, _overrides(data, broken)).train
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = make_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    lr6 = [r["lr"] for r in _records(broken) if r["step"] == 6 and "lr" in r]
    assert lr6 == [opt.param_groups[0]["lr"]] and lr6[0] > 0
    # the final weights are the same too
    wa = (straight / "model.safetensors").read_bytes()
    assert wa == (broken / "model.safetensors").read_bytes()
    # last K = 2 kept (5 and 10), best beside them
    assert [p.name for p in list_checkpoints(broken)] == ["step-00000005", "step-00000010"]
    assert (broken / "checkpoints" / "best" / "trainer_state.json").is_file()


def test_resume_without_checkpoint_is_a_one_line_error(tmp_path, tiny_tokenizer):
    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 4)
    result = CliRunner().invoke(
        app, ["train", *_overrides(data, tmp_path / "r"), "--resume", "latest"]
    )
    assert result.exit_code == 2
    assert "no checkpoint" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _nan_on(steps: set[int], monkeypatch):
    calls = {"n": 0}
    real = step_module.micro_batch_loss

    def fake(logits, targets, num_targets, world_size=1):
        calls["n"] += 1  # one micro-batch per step here: call n is step n
        loss = real(logits, targets, num_targets, world_size)
        return loss * float("nan") if calls["n"] in steps else loss

    monkeypatch.setattr(step_module, "micro_batch_loss", fake)


def test_a_non_finite_step_is_skipped_and_training_goes_on(
    tmp_path, tiny_tokenizer, monkeypatch, capsys
):
    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 4)
    _nan_on({3}, monkeypatch)
    run = tmp_path / "r"
    skipped = {}
    final = train(
        None,
        _overrides(data, run, **{"train.max_steps": 6}),
        progress=False,
        on_step=lambda s, r: skipped.__setitem__(s, r["skipped"]),
    )
    assert final["steps"] == 6 and math.isfinite(final["val_loss"])
    assert [s for s, flag in skipped.items() if flag] == [3]
    recs = _records(run)
    assert [r["step"] for r in recs if r.get("skipped")] == [3]
    assert "step 3: non-finite loss" in capsys.readouterr().err


def test_several_non_finite_steps_stop_with_the_last_checkpoint_intact(
    tmp_path, tiny_tokenizer, monkeypatch
):
    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 4)
    _nan_on(set(range(4, 100)), monkeypatch)
    run = tmp_path / "r"
    ov = _overrides(
        data, run, **{"train.save_interval": 2, "train.max_bad_steps": 3, "train.keep_last": 5}
    )
    with pytest.raises(
        UserError,
        match=r"non-finite for 3 steps in a row \(steps 4-6\)"
        r".*last good checkpoint .*step-00000004",
    ):
        train(None, ov, progress=False)
    from safetensors.torch import load_file

    kept = list_checkpoints(run)
    assert [p.name for p in kept] == ["step-00000002", "step-00000004"]
    w2 = load_file(kept[0] / "model.safetensors")
    w4 = load_file(kept[1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in w4.values())
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)  # step 3 trained, step 4 did not
    assert read_state(kept[1])["step"] == 4
    assert not (run / "llmkit_run.json").exists()


def test_early_stopping_rule_on_a_scripted_curve():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    curve = [5.0, 4.0, 3.95, 3.5, 3.45, 3.41, 3.0]
    fired = None
    for step, value in enumerate(curve, start=1):
        stop.update(step, value)
        if stop.should_stop:
            fired = step
            break
    # 3.95 and 3.5: 3.5 < 4.0 - 0.1 improves; 3.45, 3.41 are within 0.1 of 3.5 -> stop at 6
    assert fired == 6 and stop.best == 3.5 and stop.best_step == 4


def test_early_stopping_stops_training_and_keeps_the_best(tmp_path, tiny_tokenizer, monkeypatch):
    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 4)
    curve = iter([5.0, 4.0, 3.95, 3.99, 3.0, 2.0])  # val_loss at steps 2, 4, 6, 8, ...

    def scripted(model, blocks, token_bytes, batch_size, device, **kw):
        n = len(blocks) * 15
        return NLLSums(nats=next(curve) * n, tokens=n, bytes=n)

    monkeypatch.setattr(fit_module, "score_blocks", scripted)
    run = tmp_path / "r"
    ov = _overrides(
        data,
        run,
        **{
            "eval.interval": 2,
            "eval.patience": 2,
            "eval.min_delta": 0.1,
            "train.save_interval": 2,
            "train.max_steps": 20,
        },
    )
    final = train(None, ov, progress=False)
    # best 4.0 at step 4; 3.95 (step 6) and 3.99 (step 8) do not beat it by 0.1: stop at 8
    assert final["steps"] == 8 and final["stopped"] == "early_stopping"
    assert final["best_step"] == 4 and final["best_val_loss"] == 4.0
    assert read_state(run / "checkpoints" / "best")["step"] == 4
    # `--resume best` names it; a damaged trainer_state.json names the file and an earlier one
    from llmkit.training.checkpoint import resolve_resume

    assert resolve_resume("best", run) == run / "checkpoints" / "best"
    with pytest.raises(UserError, match="holds no best checkpoint"):
        resolve_resume("best", tmp_path / "elsewhere")
    state = run / "checkpoints" / "step-00000008" / "trainer_state.json"
    state.write_text(state.read_text()[:20])
    with pytest.raises(UserError, match=r"step-00000008 is damaged: file trainer_state.json") as e:
        read_state(state.parent)
    assert e.value.hint.endswith("step-00000006")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000006", "step-00000008"]
    assert [r["step"] for r in _records(run) if "val_loss" in r] == [2, 4, 6, 8]


def test_dry_run_counts_parameters_and_writes_nothing(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 40, 4)
    run = tmp_path / "r"
    result = CliRunner().invoke(
        app,
        [
            "train",
            *_overrides(
                data,
                run,
                **{
                    "train.gradient_accumulation_steps": 2,
                    "train.max_steps": "null",
                    "train.epochs": 2,
                },
            ),
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    ref = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    n = sum(p.numel() for p in ref.parameters())
    assert plan["parameters"] == n and plan["trainable_parameters"] == n
    mem = plan["memory_bytes"]
    assert mem["weights"] == 4 * n and mem["gradients"] == 4 * n and mem["optimizer"] == 8 * n
    # Korthikanti et al. eq. (1), fp32: s b h (34 + 5 a s / h) x 2 bytes, + 3 x 4 b s V logits
    s, b, h, a, v = 15, 4, 16, 2, len(tiny_tokenizer)
    assert mem["activations"] == int(s * b * h * (34 + 5 * a * s / h) * 2) + 12 * b * s * v
    assert plan["tokens_per_step"] == 4 * 2 * 15
    assert plan["steps"] == 2 * (40 // 8)  # 2 epochs of 5 whole steps
    assert not run.exists()


def test_checkpoints_of_a_tied_model_print_no_shared_tensor_warning(
    tmp_path, tiny_tokenizer, caplog
):
    """accelerate warns "Removed shared tensor {'lm_head.weight'}" on every save of a model
    with tied embeddings; the tie comes back on load, so llmkit keeps that line out of the
    run's output (and the checkpoint still resumes, see the tests above)."""
    import logging

    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 9)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train(None, _overrides(data, run, **{"train.max_steps": 5}))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005"]
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_a_diverged_model_is_not_saved_as_a_finished_run(tmp_path, tiny_tokenizer):
    """learning_rate=1e300: step 1's loss and gradients are finite but its update overflows
    float32, the next steps are non-finite yet fewer than max_bad_steps. The run used to end
    with status 0, 'val_loss nan (best)' and a finished run of inf/NaN weights."""
    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 4)
    run = tmp_path / "r"
    ov = _overrides(
        data,
        run,
        **{"train.learning_rate": 1e300, "train.max_steps": 3, "train.warmup_steps": 0},
    )
    ov += ["train.max_bad_steps=5", "train.save_interval=1", "eval.interval=3"]
    with pytest.raises(UserError, match=r"training diverged after step 3: .* not finite") as err:
        train(None, ov, progress=False)
    assert "train.learning_rate (now 1e+300)" in err.value.hint
    assert not (run / "llmkit_run.json").exists()
    assert not (run / "model.safetensors").exists()
    assert [p.name for p in list_checkpoints(run)][-1] == "step-00000003"
