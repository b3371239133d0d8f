"""The training loop: next-token cross-entropy, AdamW, warmup + decay, through accelerate.

One readable function, :func:`train`, in the spirit of nanoGPT's ``train.py`` and torchtune's
recipes; the pieces it is made of (loss normalisation, optimizer groups, evaluation) are small
functions tested on their own.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmkit import __version__
from llmkit.errors import UserError
from llmkit.evaluation.evaluate import score_blocks
from llmkit.evaluation.metrics import IGNORE_INDEX, NLLSums
from llmkit.runs import RUN_MARKER, is_finished_run
from llmkit.training.config import Recipe, load_recipe


# --------------------------------------------------------------------------- loss
def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of a batch of blocks.

    Args:
        batch: ``input_ids`` (B, T) and optionally ``labels`` (B, T) with -100 where no loss is
            wanted (default: every token is a target).

    Returns:
        ``inputs`` (B, T-1) = ids[:, :-1] and ``targets`` (B, T-1) = labels[:, 1:]: position t
        predicts token t+1, so a block of T tokens gives T-1 targets and no position is wasted.
    """
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    return ids[:, :-1], labels[:, 1:].long()


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
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def micro_batch_loss(logits: torch.Tensor, targets: torch.Tensor, num_targets: int,
                     world_size: int = 1) -> torch.Tensor:
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


# --------------------------------------------------------------------------- optimizer
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (weights, embeddings), none on biases and norm gains.

    The rule "decay every parameter of 2 or more dimensions" is nanoGPT's
    (``model.py: configure_optimizers``).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, fused where this torch supports it."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg):
    """Linear warmup, then cosine to ``min_lr``, linear to 0, or constant, per optimizer step.

    Built with ``transformers.get_scheduler`` (``cosine_with_min_lr``, ``linear``,
    ``constant_with_warmup``).
    """
    from transformers import get_scheduler

    if cfg.lr_schedule == "cosine":
        return get_scheduler(
            "cosine_with_min_lr", optimizer, num_warmup_steps=cfg.warmup_steps,
            num_training_steps=cfg.max_steps, scheduler_specific_kwargs={"min_lr": cfg.min_lr},
        )
    name = "linear" if cfg.lr_schedule == "linear" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.max_steps)


# --------------------------------------------------------------------------- data
def _infinite_batches(loader) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            return
        epoch += 1


# --------------------------------------------------------------------------- run dir
def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            what = "a finished run" if is_finished_run(run_dir) else "files"
            raise UserError(
                f"{run_dir} already holds {what}",
                "pass --overwrite to replace it, or set name=... / out_dir=... for a new run",
            )
    run_dir.mkdir(parents=True, exist_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_final(model, tokenizer, run_dir: Path) -> None:
    """save_pretrained into a hidden directory, then move each file into the run directory."""
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


# --------------------------------------------------------------------------- train
def train(config: str | Path | Recipe | None = None, overrides: Sequence[str] = (), *,
          overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a causal LM on prepared blocks; write the model, tokenizer, config and metrics.

    Args:
        config: a recipe YAML path, a :class:`Recipe`, or None for the defaults.
        overrides: ``section.key=value`` strings applied over the recipe.
        overwrite: replace an existing run directory.
        progress: show the live progress bar (stderr).

    Returns:
        The final metrics: ``val_loss`` (nats/token), ``val_ppl``, ``val_bpb`` (bits/byte),
        ``steps``, ``tokens`` (targets trained on), ``train_seconds``, ``tokens_per_sec``.

    Raises:
        UserError: bad recipe, data not prepared, model positions below the data's block_size,
            an existing run without ``overwrite``, a non-finite loss.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from llmkit.data.prepared import load_prepared, read_manifest
    from llmkit.data.tokenizer import token_byte_lengths
    from llmkit.training.model import build_config, build_model

    recipe = config if isinstance(config, Recipe) else load_recipe(config, list(overrides))
    # Blocks are packed: EOS (= padding id) inside a block is real text, not padding, so the
    # "pass an attention_mask" warning does not apply; shard-writing bars add nothing here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tcfg, ecfg = recipe.train, recipe.eval
    console = Console(stderr=True)

    # Everything checkable is checked before a model is built.
    manifest = read_manifest(recipe.data.path)
    data_block = int(manifest["settings"]["block_size"])
    model_block = recipe.model.block_size or data_block
    if model_block < data_block:
        raise UserError(
            f"model.block_size {model_block} is below the data's block_size {data_block}",
            f"set model.block_size={data_block} or prepare the data with --block-size "
            f"{model_block}",
        )
    run_dir = recipe.run_dir

    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision)
    main = accelerator.is_main_process
    if main:
        _prepare_run_dir(run_dir, overwrite)
    accelerator.wait_for_everyone()

    data = load_prepared(recipe.data.path)
    tokenizer = data.tokenizer
    vocab_size = len(tokenizer)
    if len(data.train) < tcfg.micro_batch_size * accelerator.num_processes:
        raise UserError(
            f"{recipe.data.path} has {len(data.train)} training blocks, fewer than one batch "
            f"({tcfg.micro_batch_size} x {accelerator.num_processes} processes)",
            "lower train.micro_batch_size or prepare more text / a smaller --block-size",
        )

    set_seed(tcfg.seed)
    model_config = build_config(
        recipe.model, vocab_size=vocab_size, block_size=model_block,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = build_model(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg)

    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(tcfg.seed)
    train_ds = data.train.with_format("torch")
    loader = DataLoader(train_ds, batch_size=tcfg.micro_batch_size, shuffle=True,
                        drop_last=True, generator=generator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    token_bytes = torch.as_tensor(token_byte_lengths(tokenizer))
    world = accelerator.num_processes
    tokens_per_step = (tcfg.micro_batch_size * tcfg.gradient_accumulation_steps * world
                       * (data_block - 1))

    resolved = recipe.to_yaml()
    if main:
        _atomic_write_text(run_dir / "llmkit_config.yaml", resolved)
        console.print(f"[bold]llmkit train[/] {recipe.name} -> {run_dir}")
        console.print(resolved.rstrip(), highlight=False)
        console.print(
            f"model {recipe.model.type}: {n_params / 1e6:.2f}M parameters | "
            f"{len(data.train)} train blocks of {data_block} tokens | "
            f"{tokens_per_step} tokens per step | {tcfg.max_steps} steps | "
            f"{world} process(es) on {accelerator.device}"
        )
    metrics_file = (run_dir / "metrics.jsonl").open("w", encoding="utf-8") if main else None

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    n_val = len(data.validation)
    if ecfg.max_batches is not None:
        n_val = min(n_val, ecfg.max_batches * ecfg.batch_size)
    # Rank r scores blocks r, r+W, ...: together the ranks score each block exactly once.
    val_shard = data.validation.select(range(accelerator.process_index, n_val, world))

    def validate(step: int) -> dict[str, float]:
        sums = score_blocks(accelerator.unwrap_model(model), val_shard, token_bytes,
                            ecfg.batch_size, accelerator.device)
        if world > 1:
            t = torch.tensor([sums.nats, sums.tokens, sums.bytes], dtype=torch.float64,
                             device=accelerator.device)
            t = accelerator.reduce(t, reduction="sum")
            sums = NLLSums(float(t[0]), int(t[1]), int(t[2]))
        result = sums.metrics("val_")
        log({"step": step, **result})
        return result

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f} | lr {task.fields[lr]:.2e} | "
                   "{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not (progress and main),
        transient=False,
    )
    text_every = tcfg.log_interval * max(1, tcfg.max_steps // (10 * tcfg.log_interval))
    batches = _infinite_batches(loader)
    model.train()
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    trained_tokens = 0
    last_val: dict[str, float] = {}
    with bar:
        task = bar.add_task("train", total=tcfg.max_steps, loss=float("nan"), lr=0.0, tps=0.0)
        for step in range(1, tcfg.max_steps + 1):
            micro = [next(batches) for _ in range(tcfg.gradient_accumulation_steps)]
            local_targets = torch.tensor(count_targets(micro), device=accelerator.device)
            num_targets = int(accelerator.reduce(local_targets, reduction="sum"))
            step_nats = 0.0
            for i, mb in enumerate(micro):
                inputs, targets = split_batch(mb)
                sync = i == len(micro) - 1
                ctx = accelerator.no_sync(model) if not sync else nullcontext()
                with ctx:
                    logits = model(input_ids=inputs).logits
                    loss = micro_batch_loss(logits, targets, num_targets, world)
                    accelerator.backward(loss)
                step_nats += float(loss.detach()) * num_targets / world
            if tcfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            local_loss = step_nats / max(num_targets / world, 1)
            if not math.isfinite(local_loss):
                raise UserError(
                    f"the training loss became {local_loss} at step {step}",
                    "lower train.learning_rate or set train.grad_clip (the run dir keeps the "
                    "config and metrics so far)",
                )
            trained_tokens += num_targets
            window_tokens += num_targets
            if step % tcfg.log_interval == 0 or step == tcfg.max_steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                lr = scheduler.get_last_lr()[0]
                bar.update(task, completed=step, loss=local_loss, lr=lr, tps=tps)
                if main and progress and not console.is_terminal and step % text_every == 0:
                    # No live bar off a terminal (CI, a pipe): a plain line now and then.
                    console.print(f"step {step}/{tcfg.max_steps} | loss {local_loss:.4f} | "
                                  f"lr {lr:.2e} | {tps:,.0f} tok/s", highlight=False)
                log({"step": step, "loss": local_loss, "lr": lr, "tokens_per_sec": tps,
                     "elapsed_sec": now - start})
            else:
                bar.update(task, completed=step)
            if step % ecfg.interval == 0 and step != tcfg.max_steps and len(data.validation):
                last_val = validate(step)
                if main:
                    bar.console.print(
                        f"step {step}: val_loss {last_val['val_loss']:.4f} | "
                        f"val_ppl {last_val['val_ppl']:.2f} | val_bpb {last_val['val_bpb']:.4f}"
                    )
    train_seconds = time.perf_counter() - start
    if len(data.validation):
        last_val = validate(tcfg.max_steps)
    final = {
        **last_val,
        "steps": tcfg.max_steps,
        "tokens": trained_tokens,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_sec": trained_tokens / max(train_seconds, 1e-9),
        "parameters": n_params,
    }
    if main:
        if metrics_file is not None:
            metrics_file.close()
        _save_final(accelerator.unwrap_model(model), tokenizer, run_dir)
        _atomic_write_text(run_dir / RUN_MARKER, json.dumps({
            "status": "finished",
            "llmkit_version": __version__,
            "data": str(recipe.data.path),
            "final_metrics": final,
        }, indent=2))
        summary = " | ".join(
            f"{k} {v:.4f}" for k, v in last_val.items()
        )
        console.print(
            f"done: {tcfg.max_steps} steps in {train_seconds:.1f} s "
            f"({final['tokens_per_sec']:,.0f} tok/s) | {summary}\nsaved {run_dir}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final

