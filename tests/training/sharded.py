"""Shared by the sharded-training tests (test_train_fsdp.py, test_train_deepspeed.py): a
2-process ``torchrun`` of a training script that records each step's loss and the optimizer
state around checkpoints, prepared blocks with uneven targets, recipe overrides, and weight
comparisons. A helper module, not a test module."""

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

REPO = Path(__file__).resolve().parents[2]
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
