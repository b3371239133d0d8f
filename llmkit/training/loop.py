"""The training loop: next-token cross-entropy, AdamW, warmup + decay, through accelerate.

One readable function, :func:`train`, in the spirit of nanoGPT's ``train.py`` and torchtune's
recipes; the pieces it is made of (loss normalisation, optimizer groups, evaluation) are small
functions tested on their own.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmkit import __version__
from llmkit.errors import UserError
from llmkit.evaluation.metrics import IGNORE_INDEX, NLLSums
from llmkit.evaluation.scoring import block_columns, score_blocks, split_batch
from llmkit.runs import RUN_MARKER, is_finished_run
from llmkit.runtime import announce_threads
from llmkit.training import checkpoint as ckpt
from llmkit.training.batches import micro_batch_samples, step_samples, steps_per_epoch
from llmkit.training.config import Recipe, load_recipe
from llmkit.training.flops import (
    MfuMeter,
    estimate_memory,
    flops_per_token,
    format_mfu,
    matmul_dtype,
    matmul_shapes,
    measure_peak_flops,
    model_shape,
)


# --------------------------------------------------------------------------- loss
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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int | None = None):
    """Linear warmup, then cosine to ``min_lr``, linear to 0, or constant, per optimizer step.

    Built with ``transformers.get_scheduler`` (``cosine_with_min_lr``, ``linear``,
    ``constant_with_warmup``). Step s (1-based) trains at the schedule's value for index s-1,
    so the first warmup step has learning rate 0 (the HF Trainer's convention).

    Args:
        total_steps: the schedule's length; default ``cfg.max_steps``.
    """
    from transformers import get_scheduler

    total_steps = total_steps or cfg.max_steps

    if cfg.lr_schedule == "cosine":
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr": cfg.min_lr},
        )
    name = "linear" if cfg.lr_schedule == "linear" else "constant_with_warmup"
    return get_scheduler(
        name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps
    )


# --------------------------------------------------------------------------- run dir
# What a run writes into its directory; ``--overwrite`` removes these (and only these) at the
# start of the new run, the finished marker first, so the directory never mixes two runs.
_RUN_FILES = (
    RUN_MARKER,
    ckpt.CHECKPOINTS,
    "tensorboard",
    "metrics.jsonl",
    "llmkit_config.yaml",
    "README.md",
    "loss_curve.png",
    "adapter",
    ".final.tmp",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_RUN_FILE_PATTERNS = ("model-*.safetensors", "pytorch_model-*.bin", ".*.tmp")


def _os_error(err: OSError, run_dir: Path) -> UserError:
    """A one-line error for a failure to create or write the run directory."""
    reason = err.strerror or type(err).__name__
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        reason = f"a file is in the way ({reason})"
    where = "" if err.filename in (None, str(run_dir)) else f" ({err.filename})"
    return UserError(
        f"cannot create or write the run directory {run_dir}{where}: {reason}",
        "choose another out_dir=... / name=..., or fix the permissions",
    )


def _prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool = False) -> None:
    """Make the run directory ready for a new (or resumed) run.

    The finished marker is removed first: from here until the new run finishes, the directory
    is not a finished run. With ``overwrite`` the previous run's files are removed too.

    Raises:
        UserError: the directory holds files and neither ``overwrite`` nor ``resume`` is set;
            it cannot be created or written (a file in the way, no permission).
    """
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(run_dir))
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            if not overwrite:
                what = "a finished run" if is_finished_run(run_dir) else "files"
                raise UserError(
                    f"{run_dir} already holds {what}",
                    "pass --overwrite to replace it, or set name=... / out_dir=... for a new run",
                )
            doomed = [run_dir / name for name in _RUN_FILES]
            for pattern in _RUN_FILE_PATTERNS:
                doomed += sorted(run_dir.glob(pattern))
            for child in doomed:  # RUN_MARKER first
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.exists() or child.is_symlink():
                    child.unlink()
        elif (run_dir / RUN_MARKER).exists():  # resuming: unfinished until it finishes again
            (run_dir / RUN_MARKER).unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".llmkit-write-test"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise _os_error(err, run_dir) from None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_final(model, tokenizer, run_dir: Path, state_dict=None) -> None:
    """save_pretrained into a hidden directory, then move each file into the run directory.

    ``state_dict``: the full weights when the model is sharded (FSDP, ZeRO-3), else None.

    Raises:
        UserError: the model could not be written (disk full, quota, permissions): one line
            naming the run directory, the space left and the checkpoint to resume from; the
            hidden directory is removed, so no model file appears in the run directory.
    """
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except Exception as err:
        if not ckpt.write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
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
    for f in tmp.iterdir():
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


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


def plan_steps(tcfg, *, n_train: int, global_batch: int, tokens_per_step: int) -> int:
    """The run's length in optimizer steps: the first limit of ``max_steps``, ``max_tokens``
    (rounded up to whole steps) and ``epochs`` (of ``n_train // global_batch`` steps each)."""
    limits = []
    if tcfg.max_steps is not None:
        limits.append(tcfg.max_steps)
    if tcfg.max_tokens is not None:
        limits.append(math.ceil(tcfg.max_tokens / tokens_per_step))
    if tcfg.epochs is not None:
        limits.append(max(1, math.ceil(tcfg.epochs * steps_per_epoch(n_train, global_batch))))
    return min(limits)


def _tracker_names(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """(trackers to use, trackers skipped because their package is missing)."""
    import importlib.util

    packages = {
        "tensorboard": ("tensorboard", "tensorboardX"),
        "wandb": ("wandb",),
        "mlflow": ("mlflow",),
        "comet_ml": ("comet_ml",),
        "aim": ("aim",),
        "clearml": ("clearml",),
        "dvclive": ("dvclive",),
        "swanlab": ("swanlab",),
        "trackio": ("trackio",),
    }
    use, skipped = [], []
    for name in wanted:
        mods = packages.get(name, (name,))
        (use if any(importlib.util.find_spec(m) for m in mods) else skipped).append(name)
    return use, skipped


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.learning_rate": 0.004, ...}`` with scalar values only."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, (list, tuple)):
            out[f"{prefix}{k}"] = str(v)
        else:
            out[f"{prefix}{k}"] = v
    return out


def _warn(console, message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, turned into Ctrl-C by the CLI) during a run; ``str()`` says what
    the run directory holds and how to continue."""


def _interrupted_message(run_dir: Path, step: int | None) -> str:
    at = f" at step {step}" if step else ""
    last = ckpt.list_checkpoints(run_dir)
    if last:
        return (
            f"interrupted{at}; {run_dir} is not a finished run, its checkpoint {last[-1]} "
            f"is intact: continue with --resume latest"
        )
    return f"interrupted{at}; {run_dir} is not a finished run and holds no checkpoint yet"


# --------------------------------------------------------------------------- train
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
        raise TrainingInterrupted(_interrupted_message(state["run_dir"], None)) from None
    except OSError as err:
        if err.filename is None and err.errno not in _DISK_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        raise UserError(
            f"cannot write {where}{err.strerror or err}",
            "check the disk space and permissions of the run directory",
        ) from None


#: torch.compile backend for ``model.compile: true`` (tests swap in ``eager`` to skip the C++
#: code generation that makes inductor take minutes on a small CPU).
COMPILE_BACKEND = "inductor"

#: Where launchers put the number of processes (accelerate's ``PartialState`` reads the same).
_WORLD_SIZE_ENV = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]

_DISK_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


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
    """The body of :func:`train` (which turns interrupts and disk errors into one line)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, get_int_from_env, set_seed
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from llmkit.data.prepared import load_prepared, read_manifest
    from llmkit.data.tokenizer import token_byte_lengths
    from llmkit.training.distributed import accelerator_plugins, check_strategy
    from llmkit.training.model import (
        add_lora,
        added_token_rows,
        build_config,
        build_model,
        check_same_tokenizer,
        enable_gradient_checkpointing,
        load_pretrained,
        load_pretrained_config,
        positions_of,
        resize_embeddings,
        set_dropout,
    )

    recipe = config if isinstance(config, Recipe) else load_recipe(config, list(overrides))
    if trust_remote_code and not recipe.model.trust_remote_code:
        recipe = recipe.model_copy(deep=True)
        recipe.model.trust_remote_code = True
    # Blocks are packed: EOS (= padding id) inside a block is real text, not padding, so the
    # "pass an attention_mask" warning does not apply; shard-writing bars add nothing here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tcfg, ecfg, mcfg, lcfg = recipe.train, recipe.eval, recipe.model, recipe.lora
    console = Console(stderr=True)

    # ---- Everything checkable is checked before a model is built.
    manifest = read_manifest(recipe.data.path)
    data_block = int(manifest["settings"]["block_size"])
    run_dir = recipe.run_dir
    resume_from = ckpt.resolve_resume(resume, run_dir) if resume else None
    trust = mcfg.trust_remote_code
    data = load_prepared(recipe.data.path, trust_remote_code=trust)
    tokenizer = data.tokenizer
    vocab_size = len(tokenizer)
    new_tokens: list[int] = []  # ids of tokens the data adds to a pretrained vocabulary
    if mcfg.name_or_path:
        model_config = load_pretrained_config(mcfg.name_or_path, trust)
        set_dropout(model_config, mcfg.dropout)
        positions = positions_of(model_config)
        if positions is not None and data_block > positions:
            raise UserError(
                f"the data's block_size {data_block} is above the {positions} positions of "
                f"{mcfg.name_or_path}",
                f"prepare the data with --block-size {positions} or less",
            )
        if mcfg.block_size is not None and positions is not None and mcfg.block_size > positions:
            raise UserError(
                f"model.block_size {mcfg.block_size} is above the {positions} "
                f"positions of {mcfg.name_or_path}",
                "remove model.block_size",
            )
        model_vocab = int(getattr(model_config, "vocab_size", 0) or 0)
        new_tokens = added_token_rows(tokenizer, model_vocab, mcfg.name_or_path, recipe.data.path)
        check_same_tokenizer(
            tokenizer,
            model_vocab,
            mcfg.name_or_path,
            recipe.data.path,
            bool(manifest.get("tokenizer", {}).get("trained")),
        )
    else:
        model_block = mcfg.block_size or data_block
        if model_block < data_block:
            raise UserError(
                f"model.block_size {model_block} is below the data's block_size {data_block}",
                f"set model.block_size={data_block} or prepare the data with --block-size "
                f"{model_block}",
            )
        model_config = build_config(
            mcfg,
            vocab_size=vocab_size,
            block_size=model_block,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    cuda = torch.cuda.is_available()
    check_strategy(recipe.distributed, cuda=cuda, lora=lcfg.r > 0)
    if int(os.environ.get("RANK", "0")) == 0:
        for message in recipe.ignored_settings():  # e.g. zero_stage with strategy ddp
            _warn(console, message)
        announce_threads()  # a busy machine: the thread count the CLI chose, said now
    if tcfg.mixed_precision == "fp16" and not cuda and int(os.environ.get("RANK", "0")) == 0:
        _warn(
            console,
            "train.mixed_precision=fp16 without a GPU: CPUs without AVX512-FP16 emulate "
            "float16 matmuls, tens of times slower than float32; use bf16 or no",
        )
    # The batch arithmetic needs the number of processes before accelerate starts (a
    # DeepSpeed plugin states the batch sizes): the launcher's, from the variables accelerate
    # reads (torchrun / accelerate launch: WORLD_SIZE; MPI launchers: their own).
    world = get_int_from_env(_WORLD_SIZE_ENV, 1)
    b = tcfg.micro_batch_size
    accum = tcfg.gradient_accumulation_steps
    if tcfg.global_batch_size is not None:
        if tcfg.global_batch_size % (b * world):
            raise UserError(
                f"train.global_batch_size {tcfg.global_batch_size} is not a multiple of "
                f"micro_batch_size x processes = {b} x {world}",
                f"use a multiple of {b * world}",
            )
        accum = tcfg.global_batch_size // (b * world)
    global_batch = b * accum * world
    n_train = len(data.train)
    if n_train < global_batch:
        raise UserError(
            f"{recipe.data.path} has {n_train} training blocks, fewer than one step's "
            f"{global_batch} ({b} x {accum} accumulation x {world} processes)",
            "lower train.micro_batch_size or prepare more text / a smaller --block-size",
        )
    plugins = accelerator_plugins(
        recipe.distributed, tcfg, micro_batch_size=b, accum=accum, world=world
    )
    trackers, missing = ([], []) if dry_run else _tracker_names(tcfg.trackers)
    if world == 1:
        # accelerate keeps one state per process and silently keeps the first run's compile
        # backend (or refuses another precision): a second train() in the same process (a
        # notebook, the tests) starts from a fresh one. Not under a launcher: the process
        # group belongs to the state there.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    # Several processes (torchrun / accelerate launch) and no GPU: accelerate joins them over
    # gloo only when told cpu=True (without it each process trains alone, unaware of the rest).
    accelerator = Accelerator(
        cpu=world > 1 and not cuda,
        mixed_precision=tcfg.mixed_precision,
        log_with=trackers or None,
        project_dir=str(run_dir),
        dynamo_backend=COMPILE_BACKEND if mcfg.compile else None,
        **plugins,
    )
    if accelerator.num_processes != world:
        raise UserError(
            f"accelerate joined {accelerator.num_processes} processes but the launcher "
            f"started {world}",
            "start several processes with torchrun or accelerate launch",
        )
    if tcfg.mixed_precision == "fp16" and accelerator.scaler is None and not plugins:
        # accelerate has fp16 (autocast + dynamic loss scaling) on GPUs only; torch has both
        # on the CPU too: give accelerate the CPU scaler, so that backward, clipping, the
        # optimizer step and save_state / load_state handle it exactly as on a GPU.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    main = accelerator.is_main_process
    rank = accelerator.process_index
    tokens_per_step = global_batch * (data_block - 1)
    total_steps = plan_steps(
        tcfg, n_train=n_train, global_batch=global_batch, tokens_per_step=tokens_per_step
    )
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        if saved.get("global_batch") != global_batch or saved.get("world_size") != world:
            raise UserError(
                f"{resume_from} was written with a global batch of {saved.get('global_batch')} "
                f"blocks on {saved.get('world_size')} process(es); this run has {global_batch} "
                f"on {world}",
                "resume with the same batch settings and number of processes",
            )

    if dry_run:
        if new_tokens:  # the model as it will be trained: embeddings grown to the data's size
            model_config = copy.deepcopy(model_config)
            model_config.vocab_size = vocab_size
        return _dry_run(
            console if main else None,
            recipe,
            model_config,
            lcfg,
            accum=accum,
            world=world,
            data_block=data_block,
            n_train=n_train,
            tokens_per_step=tokens_per_step,
            total_steps=total_steps,
            new_tokens=new_tokens,
        )

    if main:
        _prepare_run_dir(run_dir, overwrite, resume=resume_from is not None)
        ckpt.clean_temporaries(run_dir)
    accelerator.wait_for_everyone()
    if _state is not None:
        _state["run_dir"] = run_dir

    # ---- Model, optimizer, schedule.
    set_seed(tcfg.seed)
    if mcfg.name_or_path:
        model = load_pretrained(mcfg.name_or_path, model_config, trust)
        if new_tokens:
            resize_embeddings(model, vocab_size)
            if main:
                console.print(
                    f"embeddings of {mcfg.name_or_path} grown from {new_tokens[0]} to "
                    f"{vocab_size} rows for the {len(new_tokens)} token(s) the data's tokenizer "
                    "adds (new rows start at the mean of the others"
                    + ("; LoRA trains them)" if lcfg.r > 0 else ")"),
                    highlight=False,
                )
    else:
        model = build_model(model_config)
    if lcfg.r > 0:
        model = add_lora(model, lcfg, new_tokens)
    if mcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped once per optimizer step by this loop (accelerate's wrapper
    # would step it once per process). It is not registered with accelerate (which would
    # pickle it): its state goes into trainer_state.json (llmkit.training.checkpoint).
    early = EarlyStopping(ecfg.patience, ecfg.min_delta)
    start_step, trained_tokens = 0, 0
    resumed_val: dict[str, float] = {}  # the validation of the checkpoint's step, if it had one
    if resume_from is not None:
        saved = ckpt.load_checkpoint(accelerator, resume_from, scheduler)
        start_step, trained_tokens = int(saved["step"]), int(saved["tokens"])
        early.load_state_dict(saved.get("early_stopping", {}))
        if saved.get("last_val_step") == start_step:
            resumed_val = dict(saved.get("last_val") or {})

    columns = block_columns(data.train)
    train_ds = data.train.with_format("torch", columns=columns)
    token_bytes = torch.as_tensor(token_byte_lengths(tokenizer))
    n_layer, n_head, head_dim = model_shape(model_config)
    flops_tok = flops_per_token(
        n_params,
        n_layer,
        n_head,
        head_dim,
        data_block - 1,
        trainable_fraction=n_trainable / max(n_params, 1),
    )
    if tcfg.peak_flops is not None:
        meter = MfuMeter(flops_tok, tcfg.peak_flops, "train.peak_flops", world)
    else:
        # The peak in the dtype the matmuls really run in: the trainer's autocast dtype
        # (DeepSpeed casts the weights itself, outside autocast).
        dev = accelerator.device
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            peak_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(
                tcfg.mixed_precision, "float32"
            )
        else:
            with accelerator.autocast():
                peak_dtype = matmul_dtype(dev)
        size = 4096 if dev.type == "cuda" else 512
        rows = 4096 if dev.type == "cuda" else 512
        shapes = matmul_shapes(model_config, b * (data_block - 1), rows)
        peak = measure_peak_flops(str(dev), peak_dtype, size, 0.5, shapes)
        meter = MfuMeter(
            flops_tok,
            peak,
            f"best {peak_dtype} matmul on {dev}",
            world,
            remeasure=lambda: measure_peak_flops.__wrapped__(
                str(dev), peak_dtype, size, 1.0, shapes
            ),
        )

    resolved = recipe.to_yaml()
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        _atomic_write_text(run_dir / "llmkit_config.yaml", resolved)
        console.print(f"[bold]llmkit train[/] {recipe.name} -> {run_dir}")
        console.print(resolved.rstrip(), highlight=False)
        what = mcfg.name_or_path or f"{mcfg.type} from scratch"
        lora = f" | LoRA r={lcfg.r}: {n_trainable / 1e6:.2f}M trainable" if lcfg.r else ""
        console.print(
            f"model {what}: {n_params / 1e6:.2f}M parameters{lora} | "
            f"{n_train} train blocks of {data_block} tokens | {tokens_per_step} tokens per step "
            f"({b} x {accum} accumulation x {world} processes) | {total_steps} steps | "
            f"{flops_tok / 1e6:.1f} MFLOP/token | peak {meter.peak / 1e9:.1f} GFLOP/s per "
            f"process ({meter.source}) | {world} process(es) on {accelerator.device}",
            highlight=False,
        )
        for name in missing:
            _warn(
                console,
                f"tracker `{name}` is not installed; skipped "
                f"(pip install {name}, or set train.trackers=[])",
            )
        if resume_from is not None:
            console.print(f"resuming from {resume_from} at step {start_step}")
            kept = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= start_step]
            _atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    metrics_file = (
        metrics_path.open("a" if resume_from else "w", encoding="utf-8") if main else None
    )
    if trackers:
        accelerator.init_trackers("tensorboard", config=_flat(recipe.model_dump(mode="json")))

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if trackers:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    n_val = len(data.validation)
    if ecfg.max_batches is not None:
        n_val = min(n_val, ecfg.max_batches * ecfg.batch_size)
    # Rank r scores blocks r, r+W, ...: together the ranks score each block exactly once.
    val_shard = data.validation.select(range(rank, n_val, world))
    sharded = recipe.distributed.strategy != "ddp"
    # FSDP / ZeRO-3 gather parameters inside forward, a collective call: every rank must run
    # as many forwards as the rank with the most blocks (the rest on a discarded filler row).
    most = math.ceil(math.ceil(n_val / world) / ecfg.batch_size) if n_val else 0
    extra = most - math.ceil(len(val_shard) / ecfg.batch_size) if sharded else 0

    def validate(step: int) -> dict[str, float]:
        sums = score_blocks(
            model if sharded else accelerator.unwrap_model(model),
            val_shard,
            token_bytes,
            ecfg.batch_size,
            accelerator.device,
            extra_forwards=extra,
            filler=data.validation,
        )
        if world > 1:
            t = torch.tensor(
                [sums.nats, sums.tokens, sums.bytes], dtype=torch.float64, device=accelerator.device
            )
            t = accelerator.reduce(t, reduction="sum")
            sums = NLLSums(float(t[0]), int(t[1]), int(t[2]))
        result = sums.metrics("val_")
        log({"step": step, **result, "val_tokens": sums.tokens})
        return result

    def trainer_state(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "tokens": trained_tokens,
            "total_steps": total_steps,
            "global_batch": global_batch,
            "world_size": world,
            "early_stopping": early.state_dict(),
            "scheduler": scheduler.state_dict(),
            # validation already logged at this step: a resume from here does not repeat it
            "last_val_step": last_val_step,
            "last_val": last_val if last_val_step == step else {},
            "llmkit_version": __version__,
        }

    unwrapped_config = accelerator.unwrap_model(model).config

    def rows(indices: torch.Tensor) -> dict[str, torch.Tensor]:
        got = train_ds[indices.tolist()]  # each column (b, T)
        return {k: got[k].long().to(accelerator.device) for k in columns}

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f} | lr {task.fields[lr]:.2e} | "
            "{task.fields[tps]:,.0f} tok/s | MFU {task.fields[mfu]}"
        ),
        TimeRemainingColumn(),
        console=console,
        disable=not (progress and main),
        transient=False,
    )
    text_every = tcfg.log_interval * max(1, total_steps // (10 * tcfg.log_interval))
    model.train()
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    last_val: dict[str, float] = resumed_val
    last_val_step = start_step if resumed_val else None
    bad_in_row = 0
    stopped = "max_steps"
    mfu: float | None = 0.0
    step = start_step
    check_grad_norm = tcfg.mixed_precision != "fp16"  # fp16: the grad scaler skips overflows
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def scale_record() -> dict[str, float]:
        """fp16: the loss scale after this step (halved after an overflow, doubled after
        2000 clean steps: torch.amp.GradScaler's defaults, from Micikevicius et al. 2018,
        "Mixed Precision Training", §3.2)."""
        if accelerator.scaler is None:
            return {}
        return {"loss_scale": float(accelerator.scaler.get_scale())}

    try:
        with bar:
            task = bar.add_task(
                "train",
                total=total_steps,
                completed=start_step,
                loss=float("nan"),
                lr=0.0,
                tps=0.0,
                mfu=format_mfu(0.0),
            )
            for step in range(start_step + 1, total_steps + 1):
                samples = step_samples(step - 1, n_train, global_batch, tcfg.seed)
                micro = [
                    rows(micro_batch_samples(samples, i, rank, world, b)) for i in range(accum)
                ]
                local_targets = torch.tensor(count_targets(micro), device=accelerator.device)
                num_targets = int(accelerator.reduce(local_targets, reduction="sum"))
                lr = optimizer.param_groups[0]["lr"]
                step_nats = torch.zeros((), dtype=torch.float64, device=accelerator.device)
                for i, mb in enumerate(micro):
                    inputs, targets = split_batch(mb)
                    sync = i == len(micro) - 1
                    if deepspeed:  # tells DeepSpeed's engine where the step's boundary is
                        ctx = accelerator.accumulate(model)
                    else:
                        ctx = accelerator.no_sync(model) if not sync else nullcontext()
                    with ctx:
                        logits = model(**inputs).logits  # (b, T-1, vocab_size)
                        loss = micro_batch_loss(logits, targets, num_targets, world)
                        # DeepSpeed divides by its accumulation steps: undo, the loss is
                        # already normalised by the step's target tokens.
                        accelerator.backward(loss * accum if deepspeed else loss)
                    step_nats += loss.detach().double() * (num_targets / world)
                if world > 1:  # the loss over every process's targets, not this rank's
                    step_nats = accelerator.reduce(step_nats, reduction="sum")
                step_loss = float(step_nats) / max(num_targets, 1)
                grad_norm = None
                if tcfg.grad_clip > 0:
                    norm = accelerator.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                    grad_norm = None if norm is None else float(norm)
                finite = math.isfinite(step_loss) and (
                    grad_norm is None or not check_grad_norm or math.isfinite(grad_norm)
                )
                if finite and num_targets:
                    optimizer.step()  # fp16: the scaler skips it if a gradient overflowed
                    bad_in_row = 0
                else:
                    if accelerator.scaler is not None:
                        # no optimizer.step(): the scaler records the overflow (lowering its
                        # scale) and is ready for the next step's unscale
                        if tcfg.grad_clip == 0:
                            accelerator.unscale_gradients()
                        accelerator.scaler.update()
                if not num_targets:
                    # every label of the step is -100 (chat data): nothing to learn from, and
                    # AdamW would still decay the weights, so no update at all
                    if main:
                        _warn(bar.console, f"step {step}: no labelled target tokens; skipped")
                elif not finite:
                    bad_in_row += 1
                    if main:
                        bar.console.print(
                            f"[yellow]warning:[/] step {step}: non-finite loss {step_loss} / "
                            f"grad norm {grad_norm}; step skipped ({bad_in_row} in a row, "
                            f"stop at {tcfg.max_bad_steps})",
                            highlight=False,
                        )
                    log({"step": step, "skipped": True, "loss": None, "lr": lr, **scale_record()})
                    if bad_in_row >= tcfg.max_bad_steps:
                        last = ckpt.list_checkpoints(run_dir)
                        where = f"last good checkpoint {last[-1]}" if last else "no checkpoint"
                        fixes = ["lower train.learning_rate"]
                        if tcfg.grad_clip == 0:
                            fixes.append("set train.grad_clip (e.g. 1.0)")
                        if tcfg.mixed_precision == "fp16":
                            fixes.append("use bf16 instead of fp16")
                        hint = ", or ".join(
                            [", ".join(fixes[:-1]), fixes[-1]] if len(fixes) > 1 else fixes
                        )
                        hint += "; then --resume latest" if last else "; then start again"
                        raise UserError(
                            f"the training loss was non-finite for {bad_in_row} steps in a row "
                            f"(steps {step - bad_in_row + 1}-{step}); {where}; {run_dir} holds "
                            "no finished run",
                            hint,
                        )
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                trained_tokens += num_targets
                window_tokens += tokens_per_step  # processed, labelled or not: compute
                if on_step is not None:
                    mine = torch.cat(
                        [micro_batch_samples(samples, i, rank, world, b) for i in range(accum)]
                    )
                    on_step(
                        step,
                        {
                            "loss": step_loss,
                            "lr": lr,
                            "samples": samples.tolist(),
                            "rank_samples": mine.tolist(),
                            "skipped": not (finite and num_targets),
                        },
                    )
                if finite and (step % tcfg.log_interval == 0 or step == total_steps):
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    # tokens/s over all processes / (peak per process x processes); None
                    # when above 100% even after measuring the peak again (said once)
                    known = meter.unknown_reason is None
                    mfu = meter.mfu(tps)
                    if main and known and meter.unknown_reason is not None:
                        _warn(bar.console, f"MFU unknown: {meter.unknown_reason}")
                    window_start, window_tokens = now, 0
                    bar.update(
                        task, completed=step, loss=step_loss, lr=lr, tps=tps, mfu=format_mfu(mfu)
                    )
                    if main and progress and not console.is_terminal and step % text_every == 0:
                        # No live bar off a terminal (CI, a pipe): a plain line now and then.
                        console.print(
                            f"step {step}/{total_steps} | loss {step_loss:.4f} | "
                            f"lr {lr:.2e} | {tps:,.0f} tok/s | MFU {format_mfu(mfu)}",
                            highlight=False,
                        )
                    log(
                        {
                            "step": step,
                            "loss": step_loss,
                            "lr": lr,
                            "tokens_per_sec": tps,
                            "mfu": mfu,
                            "grad_norm": grad_norm,
                            "elapsed_sec": now - start,
                            **scale_record(),
                        }
                    )
                else:
                    bar.update(task, completed=step)

                evaluate_now = step % ecfg.interval == 0 or step == total_steps
                if evaluate_now and len(data.validation):
                    last_val, last_val_step = validate(step), step
                    improved = early.update(step, last_val["val_loss"])
                    if main:
                        bar.console.print(
                            f"step {step}: val_loss {last_val['val_loss']:.4f} | "
                            f"val_ppl {last_val['val_ppl']:.2f} | "
                            f"val_bpb {last_val['val_bpb']:.4f}" + (" (best)" if improved else ""),
                            highlight=False,
                        )
                    if improved and tcfg.save_interval:
                        ckpt.save_checkpoint(
                            accelerator, run_dir, ckpt.BEST, trainer_state(step), unwrapped_config
                        )
                if tcfg.save_interval and step % tcfg.save_interval == 0:
                    ckpt.save_checkpoint(
                        accelerator,
                        run_dir,
                        ckpt.step_dir_name(step),
                        trainer_state(step),
                        unwrapped_config,
                    )
                    if main:
                        ckpt.prune_checkpoints(run_dir, tcfg.keep_last)
                    accelerator.wait_for_everyone()
                if early.should_stop:
                    stopped = "early_stopping"
                    if main:
                        bar.console.print(
                            f"early stopping at step {step}: val_loss has not improved by more "
                            f"than {ecfg.min_delta} for {early.bad_evals} evaluations; best "
                            f"{early.best:.4f} at step {early.best_step}",
                            highlight=False,
                        )
                    break
            else:
                if tcfg.max_tokens is not None and total_steps < (tcfg.max_steps or 10**18):
                    stopped = "max_tokens"
                if tcfg.epochs is not None and total_steps == math.ceil(
                    tcfg.epochs * steps_per_epoch(n_train, global_batch)
                ):
                    stopped = "epochs"
    except KeyboardInterrupt:
        if metrics_file is not None:
            metrics_file.close()
        raise TrainingInterrupted(_interrupted_message(run_dir, step)) from None
    train_seconds = time.perf_counter() - start
    if len(data.validation) and last_val_step != step:
        last_val = validate(step)
    steps_run = step - start_step
    run_tps = steps_run * tokens_per_step / max(train_seconds, 1e-9)
    known = meter.unknown_reason is None
    run_mfu = meter.mfu(run_tps) if steps_run else None  # the run's average, like its tok/s
    if main and known and meter.unknown_reason is not None:
        _warn(console, f"MFU unknown: {meter.unknown_reason}")
    final = {
        **last_val,
        "steps": step,
        "tokens": trained_tokens,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_sec": run_tps,
        "mfu": run_mfu,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "best_val_loss": early.best,
        "best_step": early.best_step,
        "stopped": stopped,
    }
    # FSDP / ZeRO-3: every process takes part in gathering the full weights
    full_state = accelerator.get_state_dict(model) if sharded else None
    if main:
        if metrics_file is not None:
            metrics_file.close()
        _finish(
            accelerator.unwrap_model(model),
            tokenizer,
            run_dir,
            recipe,
            data.manifest,
            resolved,
            final,
            state_dict=full_state,
            embeddings_grown=bool(new_tokens),
        )
        summary = "".join(f" | {k} {v:.4f}" for k, v in last_val.items())
        console.print(
            f"done: {step} steps in {train_seconds:.1f} s "
            f"({run_tps:,.0f} tok/s, MFU {format_mfu(run_mfu)}){summary}\n"
            f"saved {run_dir}",
            highlight=False,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from llmkit.training.report import read_metrics

    return read_metrics(path)


def _finish(
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
    model card, and last the finished marker. ``state_dict``: see :func:`_save_final`;
    ``embeddings_grown``: the embeddings were resized for tokens the data added."""
    from llmkit.training.report import model_card, plot_loss_curve, read_metrics

    if recipe.lora.r > 0:
        # embedding layers go with the adapter only when they grew (peft otherwise looks for
        # the base model's config.json to decide, which a .gguf file does not have)
        model.save_pretrained(run_dir / "adapter", save_embedding_layers=embeddings_grown)
        if recipe.lora.merge:
            model = model.merge_and_unload()
    _save_final(model, tokenizer, run_dir, state_dict)
    plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curve.png")
    base = recipe.model.name_or_path or f"{recipe.model.type} from scratch"
    if recipe.lora.r > 0:
        base += f", LoRA r={recipe.lora.r}" + (" merged" if recipe.lora.merge else "")
    _atomic_write_text(
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
    _atomic_write_text(
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


def _dry_run(
    console,
    recipe: Recipe,
    model_config,
    lcfg,
    *,
    accum: int,
    world: int,
    data_block: int,
    n_train: int,
    tokens_per_step: int,
    total_steps: int,
    new_tokens: list[int] | None = None,
) -> dict[str, Any]:
    """Count parameters on the meta device (no memory), estimate memory, print the plan
    (``console`` None: print nothing, on processes other than the main one).

    Under FSDP or DeepSpeed the sharded parts are divided by the number of processes: ZeRO
    stage 1 the optimizer state, 2 also the gradients, 3 (and FSDP) also the weights
    (Rajbhandari et al. 2020, "ZeRO", §5, figure 1)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config, trust_remote_code=recipe.model.trust_remote_code
        )
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = n_params
    if lcfg.r > 0:
        from llmkit.training.model import add_lora

        model = add_lora(model, lcfg, new_tokens)
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tcfg = recipe.train
    memory = estimate_memory(
        n_params=n_params,
        n_trainable=n_trainable,
        config=model_config,
        micro_batch_size=tcfg.micro_batch_size,
        seq_len=data_block - 1,
        mixed_precision=tcfg.mixed_precision,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
    )
    dcfg = recipe.distributed
    stage = {"ddp": 0, "fsdp": 3, "deepspeed": dcfg.zero_stage}[dcfg.strategy]
    sharded = ["optimizer", "gradients", "weights"][:stage]
    for part in sharded:
        memory[part] = math.ceil(memory[part] / world)
    memory["total"] = sum(v for k, v in memory.items() if k != "total")
    plan = {
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "memory_bytes": memory,
        "micro_batch_size": tcfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "processes": world,
        "tokens_per_step": tokens_per_step,
        "steps": total_steps,
        "tokens": tokens_per_step * total_steps,
        "epochs": total_steps * tokens_per_step / max(n_train * (data_block - 1), 1),
    }
    if console is None:
        return plan
    gib = 2**30
    shard_note = f" ({', '.join(sharded)} sharded over {world})" if sharded else ""
    console.print(
        f"dry run: {recipe.name}\n"
        f"  parameters          {n_params:,} ({n_trainable:,} trainable)\n"
        f"  memory per process  {memory['total'] / gib:.3f} GiB = weights "
        f"{memory['weights'] / gib:.3f} + gradients {memory['gradients'] / gib:.3f} + "
        f"optimizer {memory['optimizer'] / gib:.3f} + activations "
        f"{memory['activations'] / gib:.3f}{shard_note}\n"
        f"  tokens per step     {tokens_per_step:,} ({tcfg.micro_batch_size} x {accum} "
        f"accumulation x {world} processes x {data_block - 1} targets)\n"
        f"  steps               {total_steps:,} ({plan['tokens']:,} tokens, "
        f"{plan['epochs']:.2f} epochs)\n"
        "nothing trained, nothing written",
        highlight=False,
    )
    return plan
