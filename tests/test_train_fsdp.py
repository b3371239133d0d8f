"""FSDP (accelerate's FSDP2 plugin) on CPU processes over gloo, for real: the same losses and
weights as DDP and as one process, exact resume from a sharded checkpoint in fresh processes,
and a final directory that plain ``from_pretrained`` loads.

The multi-process runs are slow on a small machine (each ``torchrun`` start costs tens of
seconds); the fast test at the end checks the switch that makes accelerate shard on CPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.training.loop import train

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
needs_torchrun = pytest.mark.skipif(
    not Path(TORCHRUN).exists() and shutil.which("torchrun") is None,
    reason="torchrun not installed",
)

#: Run under torchrun (or alone): train, record each step's loss; around every checkpoint
#: saved or loaded, gather the optimizer's full state (AdamW step and moments, by parameter
#: name) and keep it, to compare what was saved with what a resume restored.
SCRIPT = """
import json, os, sys
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from llmkit.training import checkpoint as ckpt
from llmkit.training.loop import train

out, resume, args = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))

def full_optimizer_state(accelerator):
    # the sharded state by parameter name, each DTensor gathered whole (on every rank)
    model, opt = accelerator._models[0], accelerator._optimizers[0].optimizer
    for m in model.modules():  # after a forward-only pass (validation) the root stays gathered
        if hasattr(m, "reshard"):
            m.reshard()
    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions())
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    return {
        k: {n: whole(t).detach().clone() for n, t in sorted(v.items())}
        for k, v in sorted(sd["state"].items())
    }

save, load = ckpt.save_checkpoint, ckpt.load_checkpoint

def saving(accelerator, run_dir, name, state, *a, **kw):
    if accelerator.distributed_type != "FSDP":
        return save(accelerator, run_dir, name, state, *a, **kw)
    opt = full_optimizer_state(accelerator)
    if rank == 0 and name.startswith("step-"):
        torch.save(opt, f"{out}.saved-{state['step']}.pt")
    return save(accelerator, run_dir, name, state, *a, **kw)

def loading(accelerator, checkpoint, scheduler=None):
    state = load(accelerator, checkpoint, scheduler)
    if accelerator.distributed_type != "FSDP":
        return state
    opt = full_optimizer_state(accelerator)
    if rank == 0:
        torch.save(opt, f"{out}.loaded-{state['step']}.pt")
    return state

ckpt.save_checkpoint, ckpt.load_checkpoint = saving, loading
seen = {}
final = train(None, args, progress=False, resume=None if resume == "-" else resume,
              on_step=lambda s, r: seen.__setitem__(s, r["loss"]))
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump({"seen": seen, "final": final}, f)
"""

STEPS = 20


def _write_labelled(root: Path, tokenizer, block_size: int, n_train: int, n_val: int) -> Path:
    """Prepared blocks whose ``labels`` mask a different number of leading tokens per block
    (0 to block_size - 2), so that micro-batches hold different numbers of targets."""
    from datasets import Dataset

    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    for name, n in (("train", n_train), ("validation", n_val)):
        ids = rng.integers(0, vocab, size=(n, block_size), dtype=np.int64)
        labels = ids.copy()
        for i in range(n):
            labels[i, : (5 * i) % (block_size - 1)] = -100
        Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).save_to_disk(
            str(root / name)
        )
    tokenizer.save_pretrained(root)
    (root / "manifest.json").write_text(json.dumps({"settings": {"block_size": block_size}}))
    return root


def _overrides(
    data: Path, run: Path, micro: int, accum: int, *extra: str, model: Path | None = None
) -> list[str]:
    """A 2-layer GPT-2 of width 32 built from scratch, or ``model`` (a pretrained directory)."""
    shape = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2"]
    return [
        f"data.path={data}",
        f"out_dir={run}",
        *([f"model.name_or_path={model}"] if model else shape),
        f"train.micro_batch_size={micro}",
        f"train.gradient_accumulation_steps={accum}",
        f"train.max_steps={STEPS}",
        "train.warmup_steps=2",
        "train.log_interval=1",
        "train.save_interval=10",
        "train.trackers=[]",
        f"eval.interval={STEPS}",
        "train.peak_flops=1e11",
        *extra,
    ]


def _torchrun(tmp: Path, out: Path, args: list[str], resume: str = "-", port: int = 29561):
    script = tmp / "run_fsdp.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), str(script)]
        + [str(out), resume, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    # the same names: a tied output matrix is saved once by a gathered run too
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


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
