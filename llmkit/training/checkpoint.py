"""Checkpoints of a run: written atomically, the last K kept, the best kept beside them.

::

    run_dir/checkpoints/
      step-00000500/            accelerate ``save_state``: model.safetensors, optimizer.bin,
      step-00001000/            custom_checkpoint_0.pkl (the LR scheduler), random_states_<rank>.pkl
      best/                     (python, numpy, torch RNGs of each process), plus
                                trainer_state.json (step, tokens, early-stopping state) and
                                config.json (the model's config)

A checkpoint is first written to ``.tmp-<name>`` and renamed into place only when every process
has finished writing, so a crash or Ctrl-C mid-write leaves the previous checkpoints intact;
``trainer_state.json`` is written inside the temporary directory, so a checkpoint without it
never exists under its final name.

The data position needs no state beyond the step: the order of training blocks is a function
of (seed, epoch) (:func:`llmkit.training.batches.step_samples`), so step s always reads the
same blocks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llmkit.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """``step-00000500``: zero-padded so that names sort in step order."""
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The finished step checkpoints of a run, oldest first (``best`` and temporaries not)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint.

    Raises:
        UserError: not a checkpoint written by ``llmkit train``.
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"{checkpoint} is not an llmkit checkpoint (no readable {STATE_FILE})",
            "pass --resume latest or a run_dir/checkpoints/step-N directory",
        ) from err


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """The checkpoint that ``--resume`` names: ``latest`` (newest under ``run_dir``), a
    checkpoint directory, or a run directory (its newest).

    Raises:
        UserError: nothing to resume from.
    """
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(
                f"--resume latest: {run_dir / CHECKPOINTS} holds no checkpoint",
                "set train.save_interval to write checkpoints, or start without --resume",
            )
        return found[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        f"--resume {resume}: not a checkpoint or a run with checkpoints",
        "pass latest, a run directory or run_dir/checkpoints/step-N",
    )


def clean_temporaries(run_dir: Path) -> None:
    """Remove half-written ``.tmp-*`` checkpoints left by an interrupted run."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    accelerator, run_dir: Path, name: str, state: dict[str, Any], model_config: Any = None
) -> Path:
    """Write a checkpoint atomically; call on every process (each saves its RNG state).

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (its prepared model and optimizer and
            the objects registered for checkpointing are saved).
        run_dir: the run directory.
        name: ``step-NNNNNNNN`` or ``best`` (replaced if it exists).
        state: JSON-able trainer state (step, tokens, early-stopping counters...).
        model_config: a transformers config saved beside the weights, or None.

    Returns:
        The checkpoint's final path.
    """
    root = run_dir / CHECKPOINTS
    final = root / name
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if model_config is not None:
            model_config.to_json_file(str(tmp / "config.json"))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # only `best` is ever replaced: move the old one aside first
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints; returns those deleted."""
    found = list_checkpoints(run_dir)
    doomed = found[:-keep_last] if keep_last > 0 else found
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
