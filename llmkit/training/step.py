"""One optimizer step: forward and backward over the step's micro-batches, clip, update.

:func:`optimizer_step` is the whole of a step and returns what happened in a
:class:`StepResult`; the loop (``llmkit.training.fit``) only decides what to do with it (log,
count non-finite steps in a row, validate, save). In the manner of lerobot's ``update_policy``
(``src/lerobot/scripts/lerobot_train.py``) and torchtune's ``_loss_step``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmkit.core.prepared import IGNORE_INDEX
from llmkit.core.scoring import split_batch


def count_targets(micro_batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Number of target tokens (labels not -100) over all micro-batches of one step."""
    return int(sum(int((split_batch(b)[1] != IGNORE_INDEX).sum()) for b in micro_batches))


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over target tokens, in nats (float32).

    Args:
        logits: (B, T, vocab_size).
        targets: (B, T), -100 where not scored.
    """
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def micro_batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_targets: int, world_size: int = 1
) -> torch.Tensor:
    """The loss to backpropagate for one micro-batch of a gradient-accumulation step.

    The step's loss is the mean over *all* its target tokens — ``Σ nll / N`` where N counts the
    targets of every micro-batch on every process — not a mean of micro-batch means, which
    over-weights short micro-batches (the bug HF transformers fixed in 4.46, "gradient
    accumulation" blog post, Oct 2024). DDP averages gradients over processes, so the local
    sum is scaled by ``world_size / N``.

    Args:
        logits: (B, T, vocab_size) of this micro-batch.
        targets: (B, T), -100 where not scored.
        num_targets: N, target tokens in the whole step across processes.
        world_size: number of processes averaging gradients.
    """
    return summed_loss(logits, targets) * (world_size / max(num_targets, 1))


@dataclass
class StepResult:
    """What one optimizer step did (the same on every process)."""

    loss: float
    """Nats per target token over every micro-batch of every process; nan or inf when
    non-finite."""
    lr: float
    """The learning rate the step trained at (the schedule's value before it advanced)."""
    grad_norm: float | None
    """Total gradient norm before clipping; None when ``grad_clip`` is 0 (not computed)."""
    num_targets: int
    """Target tokens (labels not -100) in the step over all processes."""
    finite: bool
    """The loss (and, outside fp16, the gradient norm) were finite."""
    skipped: bool
    """No update was applied: non-finite, or no target token at all (AdamW would still decay
    the weights). The schedule advances either way."""


def optimizer_step(
    model: torch.nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    accelerator,
    *,
    grad_clip: float,
    check_grad_norm: bool = True,
    deepspeed: bool = False,
) -> StepResult:
    """Run one optimizer step over ``micro_batches`` (gradient accumulation) and report it.

    Every micro-batch's loss is its summed NLL divided by the step's target tokens over all
    processes (:func:`micro_batch_loss`), so the accumulated gradient is that of the mean over
    the whole step whatever the micro-batches hold. Gradients are synchronised between
    processes on the last micro-batch only. Then: clip to ``grad_clip`` (0: no clipping, no
    norm), apply the update when the step is finite and has targets (under fp16 the grad scaler
    may still skip it after an overflow and lower its scale), advance the schedule, zero the
    gradients.

    Args:
        model: the (prepared) model, in training mode.
        micro_batches: this process's micro-batches, each ``input_ids`` (b, T) and optionally
            ``labels`` / ``position_ids`` (b, T), on the accelerator's device.
        optimizer, scheduler: stepped once each (the optimizer only when not skipped).
        accelerator: an ``accelerate.Accelerator`` (backward, no_sync, clipping, reductions).
        grad_clip: maximum total gradient norm; 0 turns clipping off.
        check_grad_norm: a non-finite gradient norm makes the step non-finite (off under
            fp16, whose scaler skips overflowing steps itself).
        deepspeed: DeepSpeed's engine runs the step (it is told the step's boundary and
            divides the loss by its accumulation steps itself, which is undone here).

    Returns:
        A :class:`StepResult`.
    """
    world = accelerator.num_processes
    accum = len(micro_batches)
    device = accelerator.device
    local_targets = torch.tensor(count_targets(micro_batches), device=device)
    num_targets = int(accelerator.reduce(local_targets, reduction="sum"))
    lr = optimizer.param_groups[0]["lr"]
    step_nats = torch.zeros((), dtype=torch.float64, device=device)
    for i, mb in enumerate(micro_batches):
        inputs, targets = split_batch(mb)
        if deepspeed:  # tells DeepSpeed's engine where the step's boundary is
            ctx = accelerator.accumulate(model)
        else:
            ctx = accelerator.no_sync(model) if i < accum - 1 else nullcontext()
        with ctx:
            logits = model(**inputs).logits  # (b, T-1, vocab_size)
            loss = micro_batch_loss(logits, targets, num_targets, world)
            # DeepSpeed divides by its accumulation steps: undo, the loss is already
            # normalised by the step's target tokens.
            accelerator.backward(loss * accum if deepspeed else loss)
        step_nats += loss.detach().double() * (num_targets / world)
    if world > 1:  # the loss over every process's targets, not this rank's
        step_nats = accelerator.reduce(step_nats, reduction="sum")
    step_loss = float(step_nats) / max(num_targets, 1)
    grad_norm = None
    if grad_clip > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        grad_norm = None if norm is None else float(norm)
    finite = math.isfinite(step_loss) and (
        grad_norm is None or not check_grad_norm or math.isfinite(grad_norm)
    )
    if finite and num_targets:
        optimizer.step()  # fp16: the scaler skips it if a gradient overflowed
    elif accelerator.scaler is not None:
        # no optimizer.step(): the scaler records the overflow (lowering its scale) and is
        # ready for the next step's unscale
        if grad_clip == 0:
            accelerator.unscale_gradients()
        accelerator.scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=step_loss,
        lr=lr,
        grad_norm=grad_norm,
        num_targets=num_targets,
        finite=finite,
        skipped=not (finite and num_targets),
    )
