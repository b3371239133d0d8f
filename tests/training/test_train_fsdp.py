"""FSDP (accelerate's FSDP2 plugin) on CPU processes over gloo, for real: the same losses and
weights as DDP and as one process, exact resume from a sharded checkpoint in fresh processes,
and a final directory that plain ``from_pretrained`` loads.

The multi-process runs are slow on a small machine (each ``torchrun`` start costs tens of
seconds); the fast test at the end checks the switch that makes accelerate shard on CPUs.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from sharded import (
    STEPS,
    _max_diff,
    _overrides,
    _torchrun,
    _weights,
    _write_labelled,
    needs_torchrun,
)

from llmkit.training.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """One process with micro-batch 2b (and one batch of 4b), two with DDP and with FSDP
    (micro-batch b = 1, 2 micro-batches per step), uninterrupted for 20 steps."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = _write_labelled(tmp / "data", tiny_tokenizer, 16, 48, 6)
    out: dict[str, dict] = {}
    for name, micro, accum in (("one", 2, 2), ("batch", 4, 1)):
        seen: dict[int, float] = {}
        final = train(
            None,
            _overrides(data, tmp / name, micro, accum),
            progress=False,
            on_step=lambda s, r, seen=seen: seen.__setitem__(s, r["loss"]),
        )
        out[name] = {"seen": seen, "final": final, "run": tmp / name}
    for i, (name, extra) in enumerate(
        (
            ("ddp", []),
            ("fsdp", ["distributed.strategy=fsdp"]),
            ("fsdp_keep", ["distributed.strategy=fsdp", "distributed.reshard_after_forward=false"]),
        )
    ):
        ranks = _torchrun(
            tmp, tmp / name, _overrides(data, tmp / name, 1, 2, *extra), port=29561 + i
        )
        out[name] = {
            "seen": {int(k): v for k, v in ranks[0]["seen"].items()},
            "ranks": ranks,
            "final": ranks[0]["final"],
            "run": tmp / name,
        }
    out["_tmp"], out["_data"] = tmp, data
    return out


@pytest.mark.slow
@needs_torchrun
def test_fsdp_on_cpu_processes_matches_ddp_and_one_process(runs):
    one = runs["one"]
    assert sorted(one["seen"]) == list(range(1, STEPS + 1))
    for name in ("ddp", "fsdp", "fsdp_keep"):
        got = runs[name]
        for step in range(1, STEPS + 1):
            assert got["seen"][step] == pytest.approx(one["seen"][step], abs=1e-5), (name, step)
            # every rank reports the loss over both ranks' targets
            assert got["ranks"][1]["seen"][str(step)] == got["seen"][step]
        assert _max_diff(_weights(got["run"]), _weights(one["run"])) < 1e-5, name
        if name != "ddp":
            assert _max_diff(_weights(got["run"]), _weights(runs["ddp"]["run"])) < 1e-5, name
        assert got["final"]["val_loss"] == pytest.approx(one["final"]["val_loss"], abs=1e-5)
    # the sharded run really sharded: its checkpoints are torch.distributed.checkpoint shards
    shards = runs["fsdp"]["run"] / "checkpoints" / "step-00000010" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    ddp_ckpt = runs["ddp"]["run"] / "checkpoints" / "step-00000010"
    assert (ddp_ckpt / "model.safetensors").is_file()
    assert not (ddp_ckpt / "pytorch_model_fsdp_0").exists()


@pytest.mark.slow
@needs_torchrun
def test_fsdp_accumulation_is_normalised_by_the_global_target_count(runs):
    """2 processes x 2 micro-batches of 1 block, each holding a different number of targets,
    give the loss of one batch of the same 4 blocks (mean over all their targets)."""
    batch, fsdp = runs["batch"], runs["fsdp"]
    for step in range(1, STEPS + 1):
        assert fsdp["seen"][step] == pytest.approx(batch["seen"][step], abs=1e-6), step
    assert _max_diff(_weights(fsdp["run"]), _weights(batch["run"])) < 1e-5


@pytest.mark.slow
@needs_torchrun
def test_fsdp_resume_in_fresh_processes_continues_exactly(runs):
    """A copy of the run stopped after its step-10 checkpoint, resumed in 2 fresh processes:
    steps 11-20 and the final weights are bitwise those of the uninterrupted run, and the
    optimizer's step and moments after loading are those that were saved."""
    tmp, data, full = runs["_tmp"], runs["_data"], runs["fsdp"]
    run = tmp / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        full["run"] / "checkpoints" / "step-00000010", run / "checkpoints" / "step-00000010"
    )
    ranks = _torchrun(
        tmp,
        run,
        _overrides(data, run, 1, 2, "distributed.strategy=fsdp"),
        resume="latest",
        port=29571,
    )
    seen = {int(k): v for k, v in ranks[0]["seen"].items()}
    assert sorted(seen) == list(range(11, STEPS + 1))
    for step in seen:  # bitwise: same shards, same reduction order
        assert seen[step] == full["seen"][step], step
    assert _max_diff(_weights(run), _weights(full["run"])) == 0.0
    saved = torch.load(f"{full['run']}.saved-10.pt", weights_only=True)
    loaded = torch.load(f"{run}.loaded-10.pt", weights_only=True)
    assert saved.keys() == loaded.keys() and len(saved) >= 20
    for name, moments in saved.items():
        assert set(moments) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(moments["step"]) == 10.0
        for key, value in moments.items():
            assert torch.equal(loaded[name][key], value), (name, key)
    # the final directory is a whole model: plain from_pretrained on one process
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run).eval()
    reference = AutoModelForCausalLM.from_pretrained(runs["one"]["run"]).eval()
    ids = torch.arange(15).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
