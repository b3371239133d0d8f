"""Phase 2 of a run, the setup: accelerator, model, optimizer, schedule, resumed state, logger.

:func:`make_accelerator` starts accelerate (and joins the processes of a launcher);
:func:`setup` builds everything the loop needs from a :class:`~llmkit.training.plan.Plan` and
returns it as one :class:`Setup`. The pieces (optimizer groups, schedule) are small functions
tested on their own, in the manner of torchtune's ``_setup_*`` helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.core.atomic import write_text as atomic_write_text
from llmkit.errors import UserError
from llmkit.training import checkpoint as ckpt
from llmkit.training.fit import EarlyStopping
from llmkit.training.flops import (
    MfuMeter,
    flops_per_token,
    matmul_dtype,
    matmul_shapes,
    measure_peak_flops,
    model_shape,
)
from llmkit.training.logger import MetricLogger
from llmkit.training.plan import Plan

#: torch.compile backend for ``model.compile: true`` (tests swap in ``eager`` to skip the C++
#: code generation that makes inductor take minutes on a small CPU).
COMPILE_BACKEND = "inductor"


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


# --------------------------------------------------------------------------- accelerator
def make_accelerator(plan: Plan):
    """Start accelerate for this run (mixed precision, trackers, compile, FSDP / DeepSpeed).

    Raises:
        UserError: accelerate joined another number of processes than the launcher started.
    """
    from accelerate import Accelerator

    tcfg = plan.recipe.train
    if plan.world == 1:
        # accelerate keeps one state per process and silently keeps the first run's compile
        # backend (or refuses another precision): a second train() in the same process (a
        # notebook, the tests) starts from a fresh one. Not under a launcher: the process
        # group belongs to the state there.
        from llmkit.core.compat import reset_accelerate_state

        reset_accelerate_state()
    # Several processes (torchrun / accelerate launch) and no GPU: accelerate joins them over
    # gloo only when told cpu=True (without it each process trains alone, unaware of the rest).
    accelerator = Accelerator(
        cpu=plan.world > 1 and not torch.cuda.is_available(),
        mixed_precision=tcfg.mixed_precision,
        log_with=plan.trackers or None,
        project_dir=str(plan.run_dir),
        dynamo_backend=COMPILE_BACKEND if plan.recipe.model.compile else None,
        **plan.plugins,
    )
    if accelerator.num_processes != plan.world:
        raise UserError(
            f"accelerate joined {accelerator.num_processes} processes but the launcher "
            f"started {plan.world}",
            "start several processes with torchrun or accelerate launch",
        )
    if tcfg.mixed_precision == "fp16" and accelerator.scaler is None and not plan.plugins:
        # accelerate has fp16 (autocast + dynamic loss scaling) on GPUs only; torch has both
        # on the CPU too: give accelerate the CPU scaler, so that backward, clipping, the
        # optimizer step and save_state / load_state handle it exactly as on a GPU.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    return accelerator


# --------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """Everything the loop works with, built and (on resume) restored."""

    accelerator: Any
    """The ``accelerate.Accelerator`` of the run."""
    model: Any
    """The model as accelerate prepared it (wrapped under DDP / FSDP / DeepSpeed)."""
    optimizer: Any
    """AdamW, prepared (:func:`make_optimizer`)."""
    scheduler: Any
    """The learning-rate schedule, stepped once per optimizer step by the loop; not
    registered with accelerate (which would pickle it): its state goes into
    ``trainer_state.json``."""
    logger: MetricLogger
    """Messages, progress, metrics file and trackers (silent off the main process)."""
    meter: MfuMeter
    """Model FLOPs utilisation against this device's measured (or the recipe's) peak."""
    early: EarlyStopping
    """Validation-loss early stopping (its state saved with each checkpoint)."""
    n_params: int
    """Parameters of the model (LoRA: base + adapter)."""
    n_trainable: int
    """Parameters that train."""
    train_rows: Any
    """The training split in torch format, restricted to the columns the loop reads."""
    token_bytes: torch.Tensor
    """(vocab_size,) UTF-8 bytes per token id, for bits per byte."""
    val_shard: Any
    """The validation blocks this process scores: rows r, r+W, ... of the first ``n_val``."""
    extra_forwards: int
    """Forward passes on a filler row after validation so that every process runs as many
    (FSDP / ZeRO-3 gather parameters in each forward)."""
    resolved: str
    """The resolved recipe as YAML (saved as ``llmkit_config.yaml`` and in the model card)."""
    start_step: int = 0
    """The step the run starts after (0, or the checkpoint's on resume)."""
    start_tokens: int = 0
    """Target tokens trained on before ``start_step``."""
    resumed_val: dict[str, float] = field(default_factory=dict)
    """The validation of the checkpoint's step, when it had one (not repeated on resume)."""


def _build_model(plan: Plan, logger: MetricLogger):
    """The model to train: pretrained (embeddings grown for the data's added tokens) or new,
    with LoRA and gradient checkpointing as the recipe says."""
    from llmkit.training.model import (
        add_lora,
        build_model,
        enable_gradient_checkpointing,
        load_pretrained,
        resize_embeddings,
    )

    mcfg, lcfg = plan.recipe.model, plan.recipe.lora
    if mcfg.name_or_path:
        model = load_pretrained(mcfg.name_or_path, plan.model_config, mcfg.trust_remote_code)
        if plan.new_tokens:
            vocab_size = len(plan.tokenizer)
            resize_embeddings(model, vocab_size)
            logger.print(
                f"embeddings of {mcfg.name_or_path} grown from {plan.new_tokens[0]} to "
                f"{vocab_size} rows for the {len(plan.new_tokens)} token(s) the data's tokenizer "
                "adds (new rows start at the mean of the others"
                + ("; LoRA trains them)" if lcfg.r > 0 else ")")
            )
    else:
        model = build_model(plan.model_config)
    if lcfg.r > 0:
        model = add_lora(model, lcfg, plan.new_tokens)
    if mcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _mfu_meter(plan: Plan, accelerator, flops_tok: float) -> MfuMeter:
    """The MFU meter: against ``train.peak_flops``, else the peak measured on this device in
    the dtype the matmuls really run in (the trainer's autocast dtype; DeepSpeed casts the
    weights itself, outside autocast)."""
    from accelerate.utils import DistributedType

    tcfg = plan.recipe.train
    if tcfg.peak_flops is not None:
        return MfuMeter(flops_tok, tcfg.peak_flops, "train.peak_flops", plan.world)
    dev = accelerator.device
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        peak_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(tcfg.mixed_precision, "float32")
    else:
        with accelerator.autocast():
            peak_dtype = matmul_dtype(dev)
    size = 4096 if dev.type == "cuda" else 512
    rows = 4096 if dev.type == "cuda" else 512
    shapes = matmul_shapes(plan.model_config, plan.micro_batch_size * (plan.data_block - 1), rows)
    peak = measure_peak_flops(str(dev), peak_dtype, size, 0.5, shapes)
    return MfuMeter(
        flops_tok,
        peak,
        f"best {peak_dtype} matmul on {dev}",
        plan.world,
        remeasure=lambda: measure_peak_flops.__wrapped__(str(dev), peak_dtype, size, 1.0, shapes),
    )


def _validation_shard(plan: Plan, rank: int) -> tuple[Any, int]:
    """(the validation blocks this process scores, filler forwards it runs after them)."""
    ecfg, world = plan.recipe.eval, plan.world
    n_val = len(plan.data.validation)
    if ecfg.max_batches is not None:
        n_val = min(n_val, ecfg.max_batches * ecfg.batch_size)
    # Rank r scores blocks r, r+W, ...: together the ranks score each block exactly once.
    shard = plan.data.validation.select(range(rank, n_val, world))
    # FSDP / ZeRO-3 gather parameters inside forward, a collective call: every rank must run
    # as many forwards as the rank with the most blocks (the rest on a discarded filler row).
    most = math.ceil(math.ceil(n_val / world) / ecfg.batch_size) if n_val else 0
    extra = most - math.ceil(len(shard) / ecfg.batch_size) if plan.sharded else 0
    return shard, extra


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


def setup(plan: Plan, accelerator, logger: MetricLogger) -> Setup:
    """Build the model, optimizer and schedule, restore a checkpoint, open the logger.

    The run directory must be ready (:func:`llmkit.training.rundir.prepare_run_dir`).
    """
    from accelerate.utils import set_seed

    from llmkit.core.scoring import block_columns
    from llmkit.core.tokenizer import token_byte_lengths

    recipe, tcfg, ecfg = plan.recipe, plan.recipe.train, plan.recipe.eval
    set_seed(tcfg.seed)
    model = _build_model(plan, logger)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, plan.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    early = EarlyStopping(ecfg.patience, ecfg.min_delta)
    start_step, start_tokens, resumed_val = 0, 0, {}
    if plan.resume_from is not None:
        saved = ckpt.load_checkpoint(accelerator, plan.resume_from, scheduler)
        start_step, start_tokens = int(saved["step"]), int(saved["tokens"])
        early.load_state_dict(saved.get("early_stopping", {}))
        if saved.get("last_val_step") == start_step:
            resumed_val = dict(saved.get("last_val") or {})

    n_layer, n_head, head_dim = model_shape(plan.model_config)
    flops_tok = flops_per_token(
        n_params,
        n_layer,
        n_head,
        head_dim,
        plan.data_block - 1,
        trainable_fraction=n_trainable / max(n_params, 1),
    )
    meter = _mfu_meter(plan, accelerator, flops_tok)
    resolved = recipe.to_yaml()
    if logger.main:
        atomic_write_text(plan.run_dir / "llmkit_config.yaml", resolved)
    _announce(plan, logger, accelerator, meter, n_params, n_trainable, flops_tok, resolved)
    if plan.resume_from is not None:
        logger.print(f"resuming from {plan.resume_from} at step {start_step}")
    logger.open(
        plan.run_dir / "metrics.jsonl",
        resume_step=start_step if plan.resume_from is not None else None,
        accelerator=accelerator if plan.trackers else None,
    )
    if plan.trackers:
        accelerator.init_trackers("tensorboard", config=_flat(recipe.model_dump(mode="json")))
    columns = block_columns(plan.data.train)
    val_shard, extra = _validation_shard(plan, accelerator.process_index)
    return Setup(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        logger=logger,
        meter=meter,
        early=early,
        n_params=n_params,
        n_trainable=n_trainable,
        train_rows=plan.data.train.with_format("torch", columns=columns),
        token_bytes=torch.as_tensor(token_byte_lengths(plan.tokenizer)),
        val_shard=val_shard,
        extra_forwards=extra,
        resolved=resolved,
        start_step=start_step,
        start_tokens=start_tokens,
        resumed_val=resumed_val,
    )


def _announce(plan, logger, accelerator, meter, n_params, n_trainable, flops_tok, resolved):
    """The run's header on stderr: the resolved config, the model and the derived numbers."""
    mcfg, lcfg = plan.recipe.model, plan.recipe.lora
    logger.print(f"[bold]llmkit train[/] {plan.recipe.name} -> {plan.run_dir}")
    logger.print(resolved.rstrip())
    what = mcfg.name_or_path or f"{mcfg.type} from scratch"
    lora = f" | LoRA r={lcfg.r}: {n_trainable / 1e6:.2f}M trainable" if lcfg.r else ""
    logger.print(
        f"model {what}: {n_params / 1e6:.2f}M parameters{lora} | "
        f"{plan.n_train} train blocks of {plan.data_block} tokens | {plan.tokens_per_step} "
        f"tokens per step ({plan.micro_batch_size} x {plan.accum} accumulation x {plan.world} "
        f"processes) | {plan.total_steps} steps | {flops_tok / 1e6:.1f} MFLOP/token | peak "
        f"{meter.peak / 1e9:.1f} GFLOP/s per process ({meter.source}) | {plan.world} "
        f"process(es) on {accelerator.device}"
    )
    for name in plan.missing_trackers:
        logger.warn(
            f"tracker `{name}` is not installed; skipped "
            f"(pip install {name}, or set train.trackers=[])"
        )
