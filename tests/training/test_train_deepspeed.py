"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU processes over gloo (DeepSpeed's CPU accelerator), for
real: both give the losses and weights of one process, and both resume exactly from their own
checkpoints in fresh processes, which llmkit vets without unpickling DeepSpeed's objects
blindly. Skipped when deepspeed is not installed (``pip install -e '.[deepspeed]'``).

The runs start from one saved random model (``model.name_or_path``): a model built from scratch
under ZeRO-3 is created inside ``deepspeed.zero.Init`` by transformers, which partitions each
weight as it is made and so draws other initial values than one process does.
"""

from __future__ import annotations

import importlib.util
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

pytestmark = [
    pytest.mark.slow,
    needs_torchrun,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed"
    ),
]


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("deepspeed")
    data = _write_labelled(tmp / "data", tiny_tokenizer, 16, 48, 6)
    seen: dict[int, float] = {}
    train(
        None,
        _overrides(data, tmp / "one", 2, 2, model=tiny_model_dir),
        progress=False,
        on_step=lambda s, r: seen.__setitem__(s, r["loss"]),
    )
    out = {"one": {"seen": seen, "run": tmp / "one"}, "_tmp": tmp, "_data": data}
    for i, stage in enumerate((2, 3)):
        name = f"zero{stage}"
        extra = ["distributed.strategy=deepspeed", f"distributed.zero_stage={stage}"]
        args = _overrides(data, tmp / name, 1, 2, *extra, model=tiny_model_dir)
        ranks = _torchrun(tmp, tmp / name, args, port=29581 + i)
        out[name] = {
            "seen": {int(k): v for k, v in ranks[0]["seen"].items()},
            "ranks": ranks,
            "run": tmp / name,
            "args": extra,
            "model": tiny_model_dir,
        }
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_cpu_processes_matches_one_process(ds_runs, stage):
    """2 processes x micro-batch 1 x 2 micro-batches (different target counts) give the losses
    of 1 process with micro-batch 2 to 1e-5 over 20 steps, and the same final weights."""
    one, run = ds_runs["one"], ds_runs[f"zero{stage}"]
    for step in range(1, STEPS + 1):
        assert run["seen"][step] == pytest.approx(one["seen"][step], abs=1e-5), step
        assert run["ranks"][1]["seen"][str(step)] == run["seen"][step]
    assert _max_diff(_weights(run["run"]), _weights(one["run"])) < 1e-5
    shards = run["run"] / "checkpoints" / "step-00000010" / "pytorch_model"
    names = sorted(p.name for p in shards.iterdir())
    if stage == 2:  # one copy of the weights, the optimizer state in 2 shards
        assert names == [
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    else:  # the weights sharded too
        assert names == [
            f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
            for r in range(2)
            for kind in ("model", "optim")
        ]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_in_fresh_processes_continues_exactly(ds_runs, stage):
    """Steps 11-20 and the final weights of a resume from the step-10 checkpoint equal the
    uninterrupted run's, bitwise; the final directory loads with plain from_pretrained."""
    tmp, data, full = ds_runs["_tmp"], ds_runs["_data"], ds_runs[f"zero{stage}"]
    run = tmp / f"zero{stage}-resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        full["run"] / "checkpoints" / "step-00000010", run / "checkpoints" / "step-00000010"
    )
    args = _overrides(data, run, 1, 2, *full["args"], model=full["model"])
    ranks = _torchrun(tmp, run, args, resume="latest", port=29591 + stage)
    seen = {int(k): v for k, v in ranks[0]["seen"].items()}
    assert sorted(seen) == list(range(11, STEPS + 1))
    for step in seen:
        assert seen[step] == full["seen"][step], step
    assert _max_diff(_weights(run), _weights(full["run"])) == 0.0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run).eval()
    weights = _weights(full["run"])
    ids = torch.arange(15).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
        model.load_state_dict(weights, strict=False)
        assert torch.allclose(logits, model(ids).logits, atol=1e-5)
