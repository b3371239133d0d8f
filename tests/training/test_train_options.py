"""The rest of issue 4's list, one value each: batch arithmetic, stopping by tokens or epochs,
every schedule, bf16, a Llama from scratch, trackers, the plain progress lines, recipes that
open with their commands, and half-written checkpoints ignored."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.training.checkpoint import list_checkpoints
from llmkit.training.config import load_recipe
from llmkit.training.loop import train
from llmkit.training.setup import make_scheduler

REPO = Path(__file__).resolve().parents[2]


def _overrides(data: Path, run: Path, **extra) -> list[str]:
    base = {
        "data.path": data,
        "out_dir": run,
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "train.micro_batch_size": 2,
        "train.max_steps": 4,
        "train.warmup_steps": 0,
        "train.log_interval": 1,
        "train.save_interval": 0,
        "train.trackers": "[]",
        "train.peak_flops": 1e11,
        "eval.interval": 100,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def data(write_prepared, tmp_path, tiny_tokenizer):
    return write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 2)


def test_global_batch_size_sets_the_accumulation(tmp_path, data):
    seen = {}
    final = train(
        None,
        _overrides(data, tmp_path / "r", **{"train.global_batch_size": 6, "train.max_steps": 2}),
        progress=False,
        on_step=lambda s, r: seen.__setitem__(s, r["samples"]),
    )
    # 6 blocks per step = micro-batch 2 x 3 accumulation on one process
    assert [len(seen[s]) for s in (1, 2)] == [6, 6]
    assert final["tokens"] == 2 * 6 * 15
    result = CliRunner().invoke(
        app, ["train", *_overrides(data, tmp_path / "x", **{"train.global_batch_size": 5})]
    )
    assert result.exit_code == 2 and "multiple of 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_stop_by_max_tokens_or_epochs(write_prepared, tmp_path, tiny_tokenizer):
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)
    # 2 blocks x 15 targets = 30 tokens per step: 100 tokens -> 4 steps (rounded up)
    final = train(
        None,
        _overrides(data, tmp_path / "t", **{"train.max_tokens": 100, "train.max_steps": 50}),
        progress=False,
    )
    assert final["steps"] == math.ceil(100 / 30) == 4 and final["stopped"] == "max_tokens"
    # 8 blocks / 2 per step = 4 steps per epoch: 1.5 epochs -> 6 steps
    final = train(
        None,
        _overrides(data, tmp_path / "e", **{"train.epochs": 1.5, "train.max_steps": "null"}),
        progress=False,
    )
    assert final["steps"] == 6 and final["stopped"] == "epochs"


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_linear_and_constant_schedules_warm_up_then_decay_or_hold(schedule):
    cfg = load_recipe(
        None,
        [
            f"train.lr_schedule={schedule}",
            "train.learning_rate=1e-3",
            "train.min_lr=0",
            "train.warmup_steps=10",
            "train.max_steps=110",
        ],
    ).train
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.max_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    if schedule == "linear":  # to 0 at the end: halfway through the decay, half the peak
        assert lrs[60] == pytest.approx(5e-4) and lrs[109] == pytest.approx(1e-5)
    else:
        assert lrs[10:] == pytest.approx([1e-3] * 100)


def test_bf16_autocast_trains_float32_weights(write_prepared, tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)  # small: learnable
    run = tmp_path / "bf16"
    seen: dict[int, float] = {}
    train(
        None,
        _overrides(
            data,
            run,
            **{
                "train.mixed_precision": "bf16",
                "train.max_steps": 16,
                "train.learning_rate": 1e-2,
                "train.min_lr": 1e-3,
            },
        ),
        progress=False,
        on_step=lambda s, r: seen.__setitem__(s, r["loss"]),
    )
    assert sum(seen[s] for s in (14, 15, 16)) / 3 < seen[1] - 0.5, seen
    assert {t.dtype for t in load_file(run / "model.safetensors").values()} == {torch.float32}


def test_llama_from_scratch(tmp_path, data):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "llama"
    final = train(
        None,
        _overrides(
            data,
            run,
            **{"model.type": "llama", "model.extra": "{intermediate_size: 48, rope_theta: 1e4}"},
        ),
        progress=False,
    )
    assert final["steps"] == 4 and math.isfinite(final["val_loss"])
    model = AutoModelForCausalLM.from_pretrained(run)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.intermediate_size == 48 and model.config.max_position_embeddings == 16


def test_a_missing_tracker_is_skipped_with_a_warning(tmp_path, data, capsys):
    final = train(
        None,
        _overrides(data, tmp_path / "r", **{"train.trackers": "[no_such_tracker]"}),
        progress=False,
    )
    assert final["steps"] == 4
    err = capsys.readouterr().err
    assert "tracker `no_such_tracker` is not installed; skipped" in err


def test_progress_lines_off_a_terminal(tmp_path, data, capsys):
    train(None, _overrides(data, tmp_path / "r", **{"train.max_steps": 10}), progress=True)
    err = capsys.readouterr().err.splitlines()
    lines = [x for x in err if x.startswith("step ") and x.split()[1].count("/") == 1]
    # off a terminal: a plain line every step here (about ten per run) with the live figures,
    # then the bar's last state (with the ETA column) when it closes
    *plain, bar = lines
    assert [x.split()[1] for x in plain] == [f"{s}/10" for s in range(1, 11)]
    for line in plain:
        assert "| loss " in line and "| lr " in line and "tok/s" in line and "| MFU " in line
    assert bar.startswith("step 10/10 ━") and bar.endswith("0:00:00")


def test_every_recipe_opens_with_the_commands_that_run_it():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        head = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            head.append(line)
        text = "\n".join(head)
        assert f"llmkit train --config recipes/{path.name}" in text, path.name
        assert "llmkit prepare" in text, path.name


def test_a_half_written_checkpoint_is_ignored_and_cleaned(tmp_path, data):
    run = tmp_path / "r"
    ov = _overrides(data, run, **{"train.save_interval": 2, "train.max_steps": 4})

    def stop(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(None, ov, progress=False, on_step=stop)
    # a crash while writing step 4: its temporary directory holds part of the files
    half = run / "checkpoints" / ".tmp-step-00000004"
    shutil.copytree(list_checkpoints(run)[-1], half)
    (half / "trainer_state.json").unlink()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    final = train(None, ov, progress=False, resume="latest")
    assert final["steps"] == 4 and not half.exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert json.loads((run / "llmkit_run.json").read_text())["status"] == "finished"
