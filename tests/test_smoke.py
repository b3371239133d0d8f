"""End to end on real text: prepare -> train (a few steps, a tiny model) -> generate -> eval,
through the CLI, on a 60 kB slice of tiny Shakespeare. Runs in well under a minute."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from llmkit.cli import app


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"llmkit {' '.join(args)} failed:\n{result.output}"
    return result.stdout


def test_prepare_train_generate_eval(tmp_path, shakespeare_slice, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMKIT_MODEL", raising=False)
    manifest = json.loads(
        run(
            "prepare",
            str(shakespeare_slice),
            "--output",
            "data/shk",
            "--vocab-size",
            "384",
            "--block-size",
            "64",
            "--json",
        )
    )
    train_split = manifest["splits"]["train"]
    assert train_split["tokens"] == train_split["blocks"] * 64 + train_split["tail_tokens"]
    assert manifest["splits"]["validation"]["blocks"] >= 4

    final = json.loads(
        run(
            "train",
            "data.path=data/shk",
            "name=smoke",
            "model.n_layer=2",
            "model.n_embd=64",
            "model.n_head=2",
            "train.micro_batch_size=8",
            "train.max_steps=30",
            "train.warmup_steps=5",
            "eval.interval=15",
            "--no-progress",
            "--json",
        )
    )
    assert final["steps"] == 30
    # 30 steps move the model well below the uniform guess ln(384) = 5.95 nats per token.
    assert final["val_loss"] < math.log(384) - 0.5
    assert final["val_bpb"] == pytest.approx(
        final["val_loss"]
        * manifest["splits"]["validation"]["tokens"]
        / manifest["splits"]["validation"]["bytes"]
        / math.log(2),
        rel=0.05,
    )

    # No --model: the newest finished run under ./runs is used; same seed, same text.
    outs = [
        json.loads(run("generate", "ROMEO:", "--max-new-tokens", "12", "--seed", "7", "--json"))
        for _ in range(2)
    ]
    assert outs[0]["completion"] == outs[1]["completion"]
    assert outs[0]["new_tokens"] == 12 or outs[0].get("finish_reason") == "eos"

    # eval on the prepared validation split scores exactly what training validated on.
    result = json.loads(run("eval", "--model", "runs/smoke", "--data", "data/shk", "--json"))
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(final["val_bpb"], rel=1e-5)
