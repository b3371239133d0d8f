"""Phase 3 of a run, fit: the loop over optimizer steps, validation, checkpoints, early stopping.

:func:`fit` reads in two screens: take the step's blocks, run one optimizer step
(:func:`llmkit.training.step.optimizer_step`), then log, validate and save as the recipe says.
Everything it prints or records goes through the run's
:class:`~llmkit.training.logger.MetricLogger`, which is silent off the main process, so the loop
has no rank test. In the manner of litgpt's ``finetune/full.py::fit``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmkit import __version__
from llmkit.core.metrics import NLLSums
from llmkit.core.scoring import score_blocks
from llmkit.errors import UserError
from llmkit.training import checkpoint as ckpt
from llmkit.training.batches import micro_batch_samples, step_samples
from llmkit.training.flops import format_mfu
from llmkit.training.rundir import TrainingInterrupted, interrupted_message
from llmkit.training.step import StepResult, optimizer_step

if TYPE_CHECKING:
    from llmkit.training.plan import Plan
    from llmkit.training.setup import Setup


class EarlyStopping:
    """Stop when validation loss has not improved for ``patience`` evaluations in a row.

    An evaluation improves when ``val_loss < best - min_delta`` (the rule of Keras' and the HF
    Trainer's ``EarlyStoppingCallback``; Prechelt 1998, "Early Stopping — But When?", motivates
    patience over stopping at the first rise).

    Args:
        patience: evaluations without improvement that stop the run; None never stops.
        min_delta: the smallest drop, in nats/token, that counts as an improvement.
    """

    def __init__(self, patience: int | None, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, val_loss: float) -> bool:
        """Record an evaluation; True when it is a new best."""
        if self.best is None or val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = val_loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_val_loss": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best_val_loss")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))


@dataclass
class FitState:
    """Where the loop is; what a checkpoint and the final metrics are made of."""

    step: int
    """The last optimizer step run (the start step before the first)."""
    tokens: int
    """Target tokens trained on so far (labelled ones only, over all processes)."""
    last_val: dict[str, float] = field(default_factory=dict)
    """The latest validation (``val_loss``, ``val_ppl``, ``val_bpb``)."""
    last_val_step: int | None = None
    """The step of :attr:`last_val`; None before the first."""
    bad_in_row: int = 0
    """Non-finite steps in a row (a finite step with targets resets it)."""
    stopped: str = "max_steps"
    """Why the loop ended: ``max_steps``, ``max_tokens``, ``epochs`` or ``early_stopping``."""
    started: float = 0.0
    """When the loop started (``time.perf_counter``)."""
    train_seconds: float = 0.0
    """Wall time of the loop, once it has ended."""
    window_start: float = 0.0
    """Start of the current throughput window (``time.perf_counter``)."""
    window_tokens: int = 0
    """Input tokens processed in the current window, labelled or not (compute, for MFU)."""


def validate(plan: Plan, run: Setup, step: int) -> dict[str, float]:
    """Score the validation split (each process its shard, summed over processes), log and
    return ``val_loss`` (nats/token), ``val_ppl``, ``val_bpb`` (bits per UTF-8 byte)."""
    accelerator = run.accelerator
    sums = score_blocks(
        run.model if plan.sharded else accelerator.unwrap_model(run.model),
        run.val_shard,
        run.token_bytes,
        plan.recipe.eval.batch_size,
        accelerator.device,
        extra_forwards=run.extra_forwards,
        filler=plan.data.validation,
    )
    if plan.world > 1:
        t = torch.tensor(
            [sums.nats, sums.tokens, sums.bytes], dtype=torch.float64, device=accelerator.device
        )
        t = accelerator.reduce(t, reduction="sum")
        sums = NLLSums(float(t[0]), int(t[1]), int(t[2]))
    result = sums.metrics("val_")
    run.logger.log({"step": step, **result, "val_tokens": sums.tokens})
    return result


def trainer_state(plan: Plan, run: Setup, state: FitState) -> dict[str, Any]:
    """What ``trainer_state.json`` of a checkpoint at ``state.step`` holds."""
    step = state.step
    return {
        "step": step,
        "tokens": state.tokens,
        "total_steps": plan.total_steps,
        "global_batch": plan.global_batch,
        "world_size": plan.world,
        "early_stopping": run.early.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        # validation already logged at this step: a resume from here does not repeat it
        "last_val_step": state.last_val_step,
        "last_val": state.last_val if state.last_val_step == step else {},
        "llmkit_version": __version__,
    }


def _micro_batches(plan: Plan, run: Setup, step: int) -> tuple[torch.Tensor, list[dict]]:
    """(the step's block indices over all processes (G,), this process's micro-batches, each
    column (b, T) on the device)."""
    b, rank = plan.micro_batch_size, run.accelerator.process_index
    samples = step_samples(step - 1, plan.n_train, plan.global_batch, plan.recipe.train.seed)
    micro = []
    for i in range(plan.accum):
        got = run.train_rows[micro_batch_samples(samples, i, rank, plan.world, b).tolist()]
        micro.append({k: v.long().to(run.accelerator.device) for k, v in got.items()})
    return samples, micro


def _scale_record(run: Setup) -> dict[str, float]:
    """fp16: the loss scale after this step (halved after an overflow, doubled after 2000
    clean steps: torch.amp.GradScaler's defaults, from Micikevicius et al. 2018, "Mixed
    Precision Training", §3.2)."""
    if run.accelerator.scaler is None:
        return {}
    return {"loss_scale": float(run.accelerator.scaler.get_scale())}


def _check_step(plan: Plan, run: Setup, state: FitState, result: StepResult) -> None:
    """Count non-finite steps and stop the run after ``train.max_bad_steps`` in a row.

    Raises:
        UserError: too many non-finite steps in a row (the hint says what to change).
    """
    tcfg, step = plan.recipe.train, state.step
    if result.finite and result.num_targets:
        state.bad_in_row = 0
        return
    if not result.num_targets:
        # every label of the step is -100 (chat data): nothing to learn from
        run.logger.warn(f"step {step}: no labelled target tokens; skipped")
        return
    state.bad_in_row += 1
    run.logger.warn(
        f"step {step}: non-finite loss {result.loss} / grad norm {result.grad_norm}; step "
        f"skipped ({state.bad_in_row} in a row, stop at {tcfg.max_bad_steps})"
    )
    run.logger.log(
        {"step": step, "skipped": True, "loss": None, "lr": result.lr, **_scale_record(run)}
    )
    if state.bad_in_row < tcfg.max_bad_steps:
        return
    last = ckpt.list_checkpoints(plan.run_dir)
    where = f"last good checkpoint {last[-1]}" if last else "no checkpoint"
    fixes = ["lower train.learning_rate"]
    if tcfg.grad_clip == 0:
        fixes.append("set train.grad_clip (e.g. 1.0)")
    if tcfg.mixed_precision == "fp16":
        fixes.append("use bf16 instead of fp16")
    hint = ", or ".join([", ".join(fixes[:-1]), fixes[-1]] if len(fixes) > 1 else fixes)
    hint += "; then --resume latest" if last else "; then start again"
    raise UserError(
        f"the training loss was non-finite for {state.bad_in_row} steps in a row "
        f"(steps {step - state.bad_in_row + 1}-{step}); {where}; {plan.run_dir} holds "
        "no finished run",
        hint,
    )


def _log_step(plan: Plan, run: Setup, state: FitState, result: StepResult) -> None:
    """Advance the bar; every ``log_interval`` steps (and the last) log loss, lr, throughput
    and MFU over the window since the previous log."""
    step, tcfg = state.step, plan.recipe.train
    state.window_tokens += plan.tokens_per_step  # processed, labelled or not: compute
    if not result.finite or (step % tcfg.log_interval and step != plan.total_steps):
        run.logger.advance(step)
        return
    now = time.perf_counter()
    tps = state.window_tokens / max(now - state.window_start, 1e-9)
    # tokens/s over all processes / (peak per process x processes); None when above 100%
    # even after measuring the peak again (said once)
    known = run.meter.unknown_reason is None
    mfu = run.meter.mfu(tps)
    if known and run.meter.unknown_reason is not None:
        run.logger.warn(f"MFU unknown: {run.meter.unknown_reason}")
    state.window_start, state.window_tokens = now, 0
    run.logger.advance(step, loss=result.loss, lr=result.lr, tps=tps, mfu=format_mfu(mfu))
    run.logger.log(
        {
            "step": step,
            "loss": result.loss,
            "lr": result.lr,
            "tokens_per_sec": tps,
            "mfu": mfu,
            "grad_norm": result.grad_norm,
            "elapsed_sec": now - state.started,
            **_scale_record(run),
        }
    )


def _validate_and_save(plan: Plan, run: Setup, state: FitState) -> None:
    """Validate every ``eval.interval`` steps (and at the last), keep the best checkpoint,
    save one every ``save_interval`` steps."""
    step, tcfg, ecfg = state.step, plan.recipe.train, plan.recipe.eval
    saving = tcfg.save_interval > 0
    config = run.accelerator.unwrap_model(run.model).config if saving else None
    if (step % ecfg.interval == 0 or step == plan.total_steps) and len(plan.data.validation):
        state.last_val, state.last_val_step = validate(plan, run, step), step
        improved = run.early.update(step, state.last_val["val_loss"])
        run.logger.print(
            f"step {step}: val_loss {state.last_val['val_loss']:.4f} | "
            f"val_ppl {state.last_val['val_ppl']:.2f} | "
            f"val_bpb {state.last_val['val_bpb']:.4f}" + (" (best)" if improved else "")
        )
        if improved and saving:
            ckpt.save_checkpoint(
                run.accelerator, plan.run_dir, ckpt.BEST, trainer_state(plan, run, state), config
            )
    if saving and step % tcfg.save_interval == 0:
        name = ckpt.step_dir_name(step)
        state_json = trainer_state(plan, run, state)
        ckpt.save_checkpoint(
            run.accelerator, plan.run_dir, name, state_json, config, keep_last=tcfg.keep_last
        )


def _why_finished(plan: Plan) -> str:
    """Which limit ended a loop that ran all its steps."""
    tcfg = plan.recipe.train
    stopped = "max_steps"
    if tcfg.max_tokens is not None and plan.total_steps < (tcfg.max_steps or 10**18):
        stopped = "max_tokens"
    if tcfg.epochs is not None and plan.total_steps == math.ceil(tcfg.epochs * plan.epoch_steps):
        stopped = "epochs"
    return stopped


def fit(
    plan: Plan,
    run: Setup,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> FitState:
    """Train from ``run.start_step`` to ``plan.total_steps`` (or early stopping); validate at
    the end if the last step was not validated.

    Args:
        on_step: called on every process after each step with ``(step, record)``: ``loss``,
            ``lr``, ``samples`` (the step's block indices over all processes),
            ``rank_samples`` (this process's) and ``skipped``.

    Raises:
        TrainingInterrupted: Ctrl-C (or SIGTERM); the message says what the run directory
            holds and how to continue.
        UserError: too many non-finite steps in a row.
    """
    from accelerate.utils import DistributedType

    tcfg, logger = plan.recipe.train, run.logger
    state = FitState(step=run.start_step, tokens=run.start_tokens, last_val=run.resumed_val)
    state.last_val_step = run.start_step if run.resumed_val else None
    deepspeed = run.accelerator.distributed_type == DistributedType.DEEPSPEED
    text_every = tcfg.log_interval * max(1, plan.total_steps // (10 * tcfg.log_interval))
    run.model.train()
    state.started = state.window_start = time.perf_counter()
    try:
        with logger.bar(plan.total_steps, run.start_step, text_every):
            for state.step in range(run.start_step + 1, plan.total_steps + 1):
                samples, micro = _micro_batches(plan, run, state.step)
                result = optimizer_step(
                    run.model,
                    micro,
                    run.optimizer,
                    run.scheduler,
                    run.accelerator,
                    grad_clip=tcfg.grad_clip,
                    check_grad_norm=tcfg.mixed_precision != "fp16",  # fp16: the scaler skips
                    deepspeed=deepspeed,
                )
                _check_step(plan, run, state, result)
                state.tokens += result.num_targets
                if on_step is not None:
                    on_step(state.step, _step_record(plan, run, samples, result))
                _log_step(plan, run, state, result)
                _validate_and_save(plan, run, state)
                if run.early.should_stop:
                    state.stopped = "early_stopping"
                    logger.print(
                        f"early stopping at step {state.step}: val_loss has not improved by "
                        f"more than {plan.recipe.eval.min_delta} for {run.early.bad_evals} "
                        f"evaluations; best {run.early.best:.4f} at step {run.early.best_step}"
                    )
                    break
            else:
                state.stopped = _why_finished(plan)
    except KeyboardInterrupt:
        logger.close()
        raise TrainingInterrupted(interrupted_message(plan.run_dir, state.step)) from None
    state.train_seconds = time.perf_counter() - state.started
    if len(plan.data.validation) and state.last_val_step != state.step:
        state.last_val = validate(plan, run, state.step)
    return state


def _step_record(plan: Plan, run: Setup, samples: torch.Tensor, result: StepResult) -> dict:
    """The record ``on_step`` receives."""
    rank, b = run.accelerator.process_index, plan.micro_batch_size
    mine = torch.cat(
        [micro_batch_samples(samples, i, rank, plan.world, b) for i in range(plan.accum)]
    )
    return {
        "loss": result.loss,
        "lr": result.lr,
        "samples": samples.tolist(),
        "rank_samples": mine.tolist(),
        "skipped": result.skipped,
    }
