"""``llmkit train``: next-token cross-entropy, AdamW, warmup + decay, through accelerate.

A run is four phases, each a module of its own, in the manner of torchtune's recipes and litgpt's
``finetune/full.py``:

1. **plan** (:mod:`llmkit.training.plan`): load the recipe and the data, check everything and
   derive every number (batch arithmetic, steps); nothing built. ``--dry-run`` stops here.
2. **setup** (:mod:`llmkit.training.setup`): accelerator, run directory, model, optimizer,
   schedule, resumed state, metric logger (:mod:`llmkit.training.logger`).
3. **fit** (:mod:`llmkit.training.fit`): the loop; one optimizer step is
   :func:`llmkit.training.step.optimizer_step`.
4. **finish** (:mod:`llmkit.training.finish`): model, adapter, tokenizer, card, curve, marker.

:func:`train` runs them in that order and turns interrupts and disk errors into one line.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import UserError
from llmkit.training import checkpoint as ckpt
from llmkit.training.config import Recipe, load_recipe
from llmkit.training.finish import finish
from llmkit.training.fit import fit
from llmkit.training.logger import MetricLogger
from llmkit.training.plan import dry_run as print_plan
from llmkit.training.plan import is_main_rank, make_plan
from llmkit.training.rundir import (
    TrainingInterrupted,
    interrupted_message,
    prepare_run_dir,
    restore_previous_run,
)
from llmkit.training.setup import make_accelerator, setup

__all__ = ["TrainingInterrupted", "train"]

_DISK_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def train(
    config: str | Path | Recipe | None = None,
    overrides: Sequence[str] = (),
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: str | None = None,
    dry_run: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Train a causal LM on prepared blocks; write the model, tokenizer, config and metrics.

    Args:
        config: a recipe YAML path, a :class:`Recipe`, or None for the defaults.
        overrides: ``section.key=value`` strings applied over the recipe.
        overwrite: replace an existing run directory.
        progress: show the live progress bar (stderr).
        resume: ``latest`` (the newest checkpoint of this run), a checkpoint directory or a run
            directory: restore model, optimizer, scheduler, RNGs and data position, continue.
        dry_run: print parameters, estimated memory, tokens per step and steps; train nothing,
            write nothing.
        on_step: called on every process after each step with ``(step, record)``; the record
            holds ``loss`` (nats per target token over all processes; with chat data only
            labelled tokens are targets), ``lr`` (used by the step),
            ``samples`` (the global indices of the blocks the step read over all processes),
            ``rank_samples`` (those this process read) and ``skipped``.
        trust_remote_code: let ``model.name_or_path`` (and the data's tokenizer) run Python
            code of its own; the same as the recipe's ``model.trust_remote_code: true``.
            Off (default, unless the recipe says so): such a model is refused, no code runs.

    Returns:
        The final metrics: ``val_loss`` (nats per target token), ``val_ppl``, ``val_bpb``
        (bits per UTF-8 byte of the targets; with chat data only the labelled ones),
        ``steps``, ``tokens`` (targets trained on), ``train_seconds``, ``tokens_per_sec``
        (input tokens processed, labelled or not), ``mfu``, ``best_val_loss`` and
        ``best_step``, ``stopped`` (why training ended).
        With ``dry_run``: the plan (parameters, memory in bytes, tokens per step, steps).

    Raises:
        UserError: bad recipe, data not prepared, vocabulary or positions that do not fit the
            data (a tokenizer that only adds tokens to a pretrained model's grows its
            embeddings instead), a ``distributed`` strategy this machine cannot run, an
            existing run without ``overwrite``, nothing to resume, too many non-finite steps in
            a row. All but the last are raised before a model is built.
    """
    state: dict[str, Any] = {}
    try:
        return _train(
            config,
            overrides,
            overwrite=overwrite,
            progress=progress,
            resume=resume,
            dry_run=dry_run,
            on_step=on_step,
            trust_remote_code=trust_remote_code,
            _state=state,
        )
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        if "run_dir" not in state:
            raise  # nothing written yet
        raise TrainingInterrupted(interrupted_message(state["run_dir"], None)) from None
    except OSError as err:
        _put_back_previous_run(state)
        if err.filename is None and err.errno not in _DISK_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        raise UserError(
            f"cannot write {where}{err.strerror or err}",
            "check the disk space and permissions of the run directory",
        ) from None
    except Exception:
        _put_back_previous_run(state)
        raise


def _put_back_previous_run(state: dict[str, Any]) -> None:
    """A run that failed before training started (main process; e.g. the model did not load):
    the finished run that ``--overwrite`` set aside goes back in place
    (:func:`restore_previous_run`). A run that failed while training (a non-finite loss)
    keeps its metrics for reading, and the finished run stays aside (``.NAME.previous``)."""
    if "run_dir" in state and "training" not in state and is_main_rank():
        restore_previous_run(state["run_dir"])


def _train(
    config: str | Path | Recipe | None = None,
    overrides: Sequence[str] = (),
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: str | None = None,
    dry_run: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    trust_remote_code: bool = False,
    _state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of :func:`train`: recipe, then plan, setup, fit, finish."""
    from transformers.utils import logging as hf_logging

    from llmkit.core.console import make_console

    recipe = config if isinstance(config, Recipe) else load_recipe(config, list(overrides))
    if trust_remote_code and not recipe.model.trust_remote_code:
        recipe = recipe.model_copy(deep=True)
        recipe.model.trust_remote_code = True
    # Blocks are packed: EOS (= padding id) inside a block is real text, not padding, so the
    # "pass an attention_mask" warning does not apply; shard-writing bars add nothing here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logger = MetricLogger(make_console(stderr=True), main=is_main_rank(), progress=progress)

    plan = make_plan(recipe, logger, resume=resume, dry_run=dry_run)
    if dry_run:
        return print_plan(plan, logger)

    accelerator = make_accelerator(plan)
    logger.main = accelerator.is_main_process  # accelerate's word on the rank from here on
    if accelerator.is_main_process:
        prepare_run_dir(plan.run_dir, overwrite, resume=plan.resume_from is not None)
        ckpt.clean_temporaries(plan.run_dir)
    accelerator.wait_for_everyone()
    if _state is not None:
        _state["run_dir"] = plan.run_dir
    run = setup(plan, accelerator, logger)
    if _state is not None:
        _state["training"] = True  # from here a failed run keeps what it wrote, to be read
    state = fit(plan, run, on_step)
    return finish(plan, run, state)
