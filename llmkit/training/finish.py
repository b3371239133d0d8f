"""Phase 4 of a run, finish: the final metrics, then the model (LoRA merged, adapter kept),
tokenizer, loss curve, model card and last the finished marker.

Only the main process writes; under FSDP / ZeRO-3 every process first takes part in gathering
the full weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import __version__
from llmkit.core.atomic import atomic_files
from llmkit.core.atomic import write_text as atomic_write_text
from llmkit.errors import UserError
from llmkit.runs import RUN_MARKER
from llmkit.training import checkpoint as ckpt
from llmkit.training.config import Recipe
from llmkit.training.flops import format_mfu
from llmkit.training.rundir import drop_previous_run

if TYPE_CHECKING:
    from llmkit.training.fit import FitState
    from llmkit.training.plan import Plan
    from llmkit.training.setup import Setup


def finish(plan: Plan, run: Setup, state: FitState) -> dict[str, Any]:
    """Write the finished run and return its final metrics (see ``llmkit.training.loop.train``)."""
    accelerator, logger = run.accelerator, run.logger
    steps_run = state.step - run.start_step
    run_tps = steps_run * plan.tokens_per_step / max(state.train_seconds, 1e-9)
    known = run.meter.unknown_reason is None
    run_mfu = run.meter.mfu(run_tps) if steps_run else None  # the run's average, like its tok/s
    if known and run.meter.unknown_reason is not None:
        logger.warn(f"MFU unknown: {run.meter.unknown_reason}")
    final = {
        **state.last_val,
        "steps": state.step,
        "tokens": state.tokens,
        "train_seconds": round(state.train_seconds, 2),
        "tokens_per_sec": run_tps,
        "mfu": run_mfu,
        "parameters": run.n_params,
        "trainable_parameters": run.n_trainable,
        "best_val_loss": run.early.best,
        "best_step": run.early.best_step,
        "stopped": state.stopped,
    }
    _refuse_non_finite(plan, run, state)
    # FSDP / ZeRO-3: every process takes part in gathering the full weights
    full_state = accelerator.get_state_dict(run.model) if plan.sharded else None
    logger.close()
    if accelerator.is_main_process:
        if full_state is not None:
            full_state = drop_tied_copies(accelerator.unwrap_model(run.model), full_state)
        write_run(
            accelerator.unwrap_model(run.model),
            plan.tokenizer,
            plan.run_dir,
            plan.recipe,
            plan.data.manifest.as_dict(),
            run.resolved,
            final,
            state_dict=full_state,
            embeddings_grown=bool(plan.new_tokens),
        )
    summary = "".join(f" | {k} {v:.4f}" for k, v in state.last_val.items())
    logger.print(
        f"done: {state.step} steps in {state.train_seconds:.1f} s "
        f"({run_tps:,.0f} tok/s, MFU {format_mfu(run_mfu)}){summary}\n"
        f"saved {plan.run_dir}"
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def drop_tied_copies(model, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The gathered weights of a sharded model without the second name of a tied parameter.

    The gathered state holds a tensor per name, so a tied output matrix (``lm_head.weight``,
    the same parameter as the input embedding) comes back as its own copy and
    ``save_pretrained`` would write it twice; the unsharded path saves it once. The names that
    share one parameter in ``model`` (``named_parameters(remove_duplicate=False)``) keep the
    first; the model's config restores the tie on load.
    """
    first: dict[int, str] = {}
    drop = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            drop.append(name)
        else:
            first[id(param)] = name
    return {k: v for k, v in state_dict.items() if k not in drop}


def _refuse_non_finite(plan: Plan, run: Setup, state: FitState) -> None:
    """Never save a diverged model as a finished run.

    A step whose loss and gradients were finite can still leave non-finite weights (a learning
    rate so large that the update overflows float32: ``train.learning_rate=1e300``), and the
    few non-finite steps after it may stay under ``train.max_bad_steps``. The weights (every
    process holds the same replica, except under FSDP / ZeRO-3 where the all-reduced
    validation loss decides alone) and the last validation loss are checked before anything
    is written; the checkpoints already written are kept.

    Raises:
        UserError: a weight or the last validation loss is not finite.
    """
    import math

    import torch

    bad_val = [
        k for k, v in state.last_val.items() if isinstance(v, float) and not math.isfinite(v)
    ]
    bad_weights = (
        []
        if plan.sharded
        else [n for n, p in run.model.named_parameters() if not torch.isfinite(p).all()]
    )
    if not bad_val and not bad_weights:
        return
    what = (
        f"{len(bad_weights)} weight tensor(s) are not finite (e.g. {bad_weights[0]})"
        if bad_weights
        else f"the last validation {bad_val[0]} is not finite"
    )
    kept = ckpt.list_checkpoints(plan.run_dir)
    resume = f"; the checkpoint {kept[-1].name} is kept" if kept else ""
    raise UserError(
        f"training diverged after step {state.step}: {what}, so the model is not saved as a "
        f"finished run{resume}",
        f"lower train.learning_rate (now {plan.recipe.train.learning_rate:g}) and train again",
    )


def save_final(model, tokenizer, run_dir: Path, state_dict=None) -> None:
    """save_pretrained into a hidden directory, then move each file into the run directory.

    ``state_dict``: the full weights when the model is sharded (FSDP, ZeRO-3), else None.

    Raises:
        UserError: the model could not be written (disk full, quota, permissions): one line
            naming the run directory, the space left and the checkpoint to resume from; the
            hidden directory is removed, so no model file appears in the run directory.
    """
    try:
        with atomic_files(run_dir, "final") as tmp:  # run_dir/.final.tmp-<pid>-<hex>
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except Exception as err:
        if not ckpt.write_failure(err):
            raise
        where = getattr(err, "filename", None)
        what = f" ({Path(where).name})" if where else ""
        kept = ckpt.list_checkpoints(run_dir)
        resume = f"; checkpoint {kept[-1].name} is intact" if kept else ""
        raise UserError(
            f"cannot write the final model to {run_dir}{what}: {ckpt.reason(err)}"
            f"{ckpt.free_space(run_dir)}{resume}; {run_dir} is not a finished run",
            "free space on that disk, then run the same command with --resume latest"
            if kept
            else "free space on that disk (or set train.save_interval to keep checkpoints), "
            "then train again",
        ) from None


def write_run(
    model,
    tokenizer,
    run_dir: Path,
    recipe: Recipe,
    manifest: dict,
    resolved: str,
    final: dict[str, Any],
    state_dict=None,
    embeddings_grown: bool = False,
) -> None:
    """The final directory: the model (LoRA merged, adapter kept), tokenizer, loss curve,
    model card, and last the finished marker. ``state_dict``: see :func:`save_final`;
    ``embeddings_grown``: the embeddings were resized for tokens the data added."""
    from llmkit.training.report import model_card, plot_loss_curve, read_metrics

    if recipe.lora.r > 0:
        # embedding layers go with the adapter only when they grew (peft otherwise looks for
        # the base model's config.json to decide, which a .gguf file does not have)
        model.save_pretrained(run_dir / "adapter", save_embedding_layers=embeddings_grown)
        if recipe.lora.merge:
            model = model.merge_and_unload()
    save_final(model, tokenizer, run_dir, state_dict)
    plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curve.png")
    base = recipe.model.name_or_path or f"{recipe.model.type} from scratch"
    if recipe.lora.r > 0:
        base += f", LoRA r={recipe.lora.r}" + (" merged" if recipe.lora.merge else "")
    atomic_write_text(
        run_dir / "README.md",
        model_card(
            name=recipe.name,
            base=base,
            manifest=manifest,
            config_yaml=resolved,
            final=final,
            version=__version__,
        ),
    )
    atomic_write_text(
        run_dir / RUN_MARKER,
        json.dumps(
            {
                "status": "finished",
                "llmkit_version": __version__,
                "data": str(recipe.data.path),
                "final_metrics": final,
            },
            indent=2,
        ),
    )
    drop_previous_run(run_dir)  # the run --overwrite set aside, now replaced for good
