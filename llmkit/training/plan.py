"""Phase 1 of a run, the plan: every check and every derived number, before anything is built.

:func:`make_plan` reads the prepared data's manifest and tokenizer and the model's config, checks
that they fit together and with this machine, and works out the batch arithmetic and the run's
length. It builds no model, starts no process group and writes nothing; ``--dry-run`` prints
the plan (:func:`dry_run`) and stops there. Derived numbers sit beside the settings that make
them, as litgpt's ``args.py`` does (``gradient_accumulation_iters()``).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.runtime import announce_threads
from llmkit.training import checkpoint as ckpt
from llmkit.training.batches import steps_per_epoch
from llmkit.training.config import Recipe, check_lora_targets
from llmkit.training.flops import estimate_memory

#: Where launchers put the number of processes (accelerate's ``PartialState`` reads the same).
WORLD_SIZE_ENV = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]
#: ... and this process's rank.
RANK_ENV = ["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"]


@dataclass
class Plan:
    """What a run will do, checked; nothing here is built or written yet."""

    recipe: Recipe
    """The resolved recipe (defaults < YAML < overrides)."""
    data: Any
    """The prepared data (``llmkit.core.prepared.load_prepared``): train / validation splits,
    tokenizer, manifest."""
    model_config: Any
    """The transformers config of the model to train (pretrained, or built from the recipe)."""
    data_block: int
    """Tokens per prepared block (the manifest's ``block_size``)."""
    new_tokens: list[int]
    """Ids of tokens the data's tokenizer adds to a pretrained vocabulary (embeddings grow)."""
    resume_from: Path | None
    """The checkpoint to resume from, or None."""
    world: int
    """Processes the launcher started."""
    accum: int
    """Micro-batches per optimizer step on each process (gradient accumulation)."""
    total_steps: int
    """The run's length in optimizer steps (:func:`plan_steps`)."""
    plugins: dict[str, Any] = field(default_factory=dict)
    """accelerate plugins for the ``distributed`` strategy (FSDP, DeepSpeed)."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers to use (installed)."""
    missing_trackers: list[str] = field(default_factory=list)
    """Trackers asked for whose package is not installed (a warning, not an error)."""
    refusal: UserError | None = None
    """``--dry-run`` only: why a real run of this plan would stop on this machine (no launcher
    for fsdp / deepspeed, deepspeed missing, fp16 sharded on CPUs); :func:`dry_run` raises it
    after printing the plan, so the dry run still shows the memory per process."""

    @property
    def run_dir(self) -> Path:
        """Where the run is written."""
        return self.recipe.run_dir

    @property
    def tokenizer(self):
        """The data's tokenizer (saved with the model)."""
        return self.data.tokenizer

    @property
    def micro_batch_size(self) -> int:
        """Blocks per forward pass."""
        return self.recipe.train.micro_batch_size

    @property
    def global_batch(self) -> int:
        """Blocks per optimizer step over all processes."""
        return self.micro_batch_size * self.accum * self.world

    @property
    def n_train(self) -> int:
        """Training blocks."""
        return len(self.data.train)

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimizer step: global batch x (block_size - 1) targets."""
        return self.global_batch * (self.data_block - 1)

    @property
    def epoch_steps(self) -> int:
        """Whole steps in one pass over the training blocks."""
        return steps_per_epoch(self.n_train, self.global_batch)

    @property
    def sharded(self) -> bool:
        """The weights are sharded over processes (FSDP, DeepSpeed): every process takes part in
        each forward and in gathering the full weights."""
        return self.recipe.distributed.strategy != "ddp"


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


def tracker_names(wanted: list[str]) -> tuple[list[str], list[str]]:
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


def is_main_rank() -> bool:
    """This process is rank 0 of its launcher (read before accelerate starts)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(RANK_ENV, 0) == 0


def _model_config(recipe: Recipe, data, data_block: int) -> tuple[Any, list[int]]:
    """The model's config and the ids of tokens the data adds to a pretrained vocabulary.

    Raises:
        UserError: the data's blocks do not fit the model's positions, ``model.block_size``
            is below the data's, or the tokenizers do not match.
    """
    from llmkit.training.model import (
        added_token_rows,
        build_config,
        check_same_tokenizer,
        load_pretrained_config,
        positions_of,
        set_dropout,
    )

    mcfg, tokenizer = recipe.model, data.tokenizer
    if not mcfg.name_or_path:
        model_block = mcfg.block_size or data_block
        if model_block < data_block:
            raise UserError(
                f"model.block_size {model_block} is below the data's block_size {data_block}",
                f"set model.block_size={data_block} or prepare the data with --block-size "
                f"{model_block}",
            )
        config = build_config(
            mcfg,
            vocab_size=len(tokenizer),
            block_size=model_block,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return config, []
    config = load_pretrained_config(mcfg.name_or_path, mcfg.trust_remote_code)
    set_dropout(config, mcfg.dropout)
    positions = positions_of(config)
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
    model_vocab = int(getattr(config, "vocab_size", 0) or 0)
    path = recipe.data.path
    new_tokens = added_token_rows(tokenizer, model_vocab, mcfg.name_or_path, path)
    trained = data.manifest.tokenizer.trained
    check_same_tokenizer(tokenizer, model_vocab, mcfg.name_or_path, path, trained)
    return config, new_tokens


def _accumulation(recipe: Recipe, world: int, n_train: int) -> int:
    """Micro-batches per step on each process, from ``gradient_accumulation_steps`` or
    ``global_batch_size``.

    Raises:
        UserError: ``global_batch_size`` is not a multiple of micro-batch x processes, or the
            data has fewer blocks than one step.
    """
    tcfg = recipe.train
    b, accum = tcfg.micro_batch_size, tcfg.gradient_accumulation_steps
    if tcfg.global_batch_size is not None:
        if tcfg.global_batch_size % (b * world):
            raise UserError(
                f"train.global_batch_size {tcfg.global_batch_size} is not a multiple of "
                f"micro_batch_size x processes = {b} x {world}",
                f"use a multiple of {b * world}",
            )
        accum = tcfg.global_batch_size // (b * world)
    if n_train < b * accum * world:
        raise UserError(
            f"{recipe.data.path} has {n_train} training blocks, fewer than one step's "
            f"{b * accum * world} ({b} x {accum} accumulation x {world} processes)",
            "lower train.micro_batch_size or prepare more text / a smaller --block-size",
        )
    return accum


def _machine_checks(recipe: Recipe, *, cuda: bool, launched: bool, dry_run: bool):
    """The ``distributed`` section's checks: the recipe's own (raised at once), then this
    machine's (a launcher, deepspeed installed, no fp16 sharded on CPUs).

    Returns:
        None, or with ``dry_run`` the machine's refusal, for :func:`dry_run` to raise after
        printing the plan.

    Raises:
        UserError: the recipe's mistakes; without ``dry_run`` the machine's refusal too.
    """
    from llmkit.training.distributed import check_strategy

    dcfg, lora = recipe.distributed, recipe.lora.r > 0
    check_strategy(dcfg, cuda=cuda, lora=lora, launched=launched, machine=False)
    try:
        check_strategy(dcfg, cuda=cuda, lora=lora, launched=launched)
        if recipe.train.mixed_precision == "fp16" and not cuda and dcfg.strategy != "ddp":
            # no loss scaler is set up for sharded CPU runs: gradients underflow
            raise UserError(
                f"train.mixed_precision=fp16 with distributed.strategy={dcfg.strategy} is not "
                "supported on CPUs (no loss scaling)",
                "use train.mixed_precision=bf16 or no",
            )
    except UserError as err:
        if not dry_run:
            raise
        return err
    return None


def make_plan(recipe: Recipe, logger, *, resume: str | None = None, dry_run: bool = False) -> Plan:
    """Check everything that can be checked without building a model, and derive the numbers.

    Args:
        recipe: the resolved recipe.
        logger: a :class:`llmkit.training.logger.MetricLogger` for warnings (silent off rank 0).
        resume: ``--resume`` (``latest``, a checkpoint or a run directory), or None.
        dry_run: no trackers are looked up and no accelerate plugin is built. The
            ``distributed`` strategy is checked against this machine as for a real run, but a
            refusal of the machine is kept in :attr:`Plan.refusal` instead of raised, so that
            :func:`dry_run` prints the plan (the memory per process of fsdp and deepspeed, also
            on a CPU) and then refuses the same way a real run does.

    Raises:
        UserError: data not prepared, vocabulary or positions that do not fit the data, a
            ``distributed`` strategy this machine cannot run (or fp16 with fsdp / deepspeed on
            CPUs), batch sizes that do not divide,
            nothing to resume or a checkpoint of another batch size.
    """
    from accelerate.utils import get_int_from_env

    from llmkit.core.prepared import load_prepared, read_manifest
    from llmkit.training.distributed import accelerator_plugins

    tcfg = recipe.train
    manifest = read_manifest(recipe.data.path)
    data_block = manifest.block_size
    resume_from = ckpt.resolve_resume(resume, recipe.run_dir) if resume else None
    data = load_prepared(recipe.data.path, trust_remote_code=recipe.model.trust_remote_code)
    model_config, new_tokens = _model_config(recipe, data, data_block)
    # LoRA on tied embeddings exports another model than the one trained: refused first
    check_lora_targets(recipe.lora, model_config, recipe.model.trust_remote_code)

    cuda = torch.cuda.is_available()
    from llmkit.training.distributed import LAUNCHER_ENV

    launched = any(key in os.environ for key in LAUNCHER_ENV)
    refusal = _machine_checks(recipe, cuda=cuda, launched=launched, dry_run=dry_run)
    for message in recipe.ignored_settings():  # e.g. zero_stage with strategy ddp
        logger.warn(message)
    if logger.main:
        announce_threads()  # a busy machine: the thread count the CLI chose, said now
    if tcfg.mixed_precision == "fp16" and not cuda and recipe.distributed.strategy == "ddp":
        logger.warn(
            "train.mixed_precision=fp16 without a GPU: CPUs without AVX512-FP16 emulate "
            "float16 matmuls, tens of times slower than float32; use bf16 or no"
        )
    # The batch arithmetic needs the number of processes before accelerate starts (a
    # DeepSpeed plugin states the batch sizes): the launcher's, from the variables accelerate
    # reads (torchrun / accelerate launch: WORLD_SIZE; MPI launchers: their own).
    world = get_int_from_env(WORLD_SIZE_ENV, 1)
    accum = _accumulation(recipe, world, len(data.train))
    b = tcfg.micro_batch_size
    plugins = (
        {}
        if dry_run
        else accelerator_plugins(
            recipe.distributed, tcfg, micro_batch_size=b, accum=accum, world=world
        )
    )
    trackers, missing = ([], []) if dry_run else tracker_names(tcfg.trackers)
    plan = Plan(
        recipe=recipe,
        data=data,
        model_config=model_config,
        data_block=data_block,
        new_tokens=new_tokens,
        resume_from=resume_from,
        world=world,
        accum=accum,
        total_steps=0,
        plugins=plugins,
        trackers=trackers,
        missing_trackers=missing,
        refusal=refusal,
    )
    plan.total_steps = plan_steps(
        tcfg,
        n_train=plan.n_train,
        global_batch=plan.global_batch,
        tokens_per_step=plan.tokens_per_step,
    )
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        if saved.get("global_batch") != plan.global_batch or saved.get("world_size") != world:
            raise UserError(
                f"{resume_from} was written with a global batch of {saved.get('global_batch')} "
                f"blocks on {saved.get('world_size')} process(es); this run has "
                f"{plan.global_batch} on {world}",
                "resume with the same batch settings and number of processes",
            )
    return plan


def dry_run(plan: Plan, logger) -> dict[str, Any]:
    """Print the plan (on the main process) and return it: parameters, memory, tokens per
    step, steps. The model is built on the meta device only (no memory).

    Raises:
        UserError: :attr:`Plan.refusal`, after the plan is printed: a real run of this plan
            would stop there on this machine (``--dry-run`` makes every check a run makes).
    """
    config = plan.model_config
    if plan.new_tokens:  # the model as it will be trained: embeddings grown to the data's size
        config = copy.deepcopy(config)
        config.vocab_size = len(plan.tokenizer)
    shown = _dry_run(
        logger.console if logger.main else None,
        plan.recipe,
        config,
        plan.recipe.lora,
        accum=plan.accum,
        world=plan.world,
        data_block=plan.data_block,
        n_train=plan.n_train,
        tokens_per_step=plan.tokens_per_step,
        total_steps=plan.total_steps,
        new_tokens=plan.new_tokens,
    )
    if plan.refusal is not None:
        raise plan.refusal
    return shown


#: Up to this many blocks the dry run builds the whole model on the meta device (a fraction
#: of a second: GPT-2 XL has 48); above it, it counts from models of 1, 2 and 3 blocks.
FULL_COUNT_LAYERS = 64


def _meta_counts(config, lcfg, new_tokens, trust_remote_code: bool) -> tuple[int, int]:
    """(parameters, trainable parameters) of ``config``'s model built on the meta device (no
    memory), with LoRA adapters when ``lcfg.r > 0``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if lcfg.r == 0:
        n = sum(p.numel() for p in model.parameters())
        return n, n
    from llmkit.training.model import add_lora

    model = add_lora(model, lcfg, new_tokens)
    return (
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def count_parameters(
    config, lcfg, new_tokens: list[int] | None = None, *, trust_remote_code: bool = False
) -> tuple[int, int]:
    """(parameters, trainable parameters) of the model ``config`` describes, without memory.

    Up to :data:`FULL_COUNT_LAYERS` blocks the whole model is built on the meta device. Above,
    building it is what took the time (a Python object per module: ``model.n_layer=100000``
    ran for minutes with memory growing), so models of 1, 2 and 3 blocks are built instead;
    when the second and third add the same count (blocks of one size) the total is
    ``c1 + (L - 1) x (c2 - c1)``, exact for such models. Otherwise (blocks of unequal sizes)
    the whole model is built as before.

    Args:
        config: a transformers config (``num_hidden_layers`` = L).
        lcfg: the recipe's ``lora`` section (``r > 0``: adapters counted, base frozen).
        new_tokens: ids the data adds to a pretrained vocabulary (trainable embedding rows).
        trust_remote_code: let an ``auto_map`` config run its own code.
    """
    n_layer = int(getattr(config, "num_hidden_layers", 0) or 0)
    if n_layer <= FULL_COUNT_LAYERS:
        return _meta_counts(config, lcfg, new_tokens, trust_remote_code)
    counts = []
    for layers in (1, 2, 3):
        small = copy.deepcopy(config)
        small.num_hidden_layers = layers
        counts.append(_meta_counts(small, lcfg, new_tokens, trust_remote_code))
    (p1, t1), (p2, t2), (p3, t3) = counts
    if p3 - p2 != p2 - p1 or t3 - t2 != t2 - t1:
        return _meta_counts(config, lcfg, new_tokens, trust_remote_code)
    return p1 + (n_layer - 1) * (p2 - p1), t1 + (n_layer - 1) * (t2 - t1)


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
    n_params, n_trainable = count_parameters(
        model_config, lcfg, new_tokens, trust_remote_code=recipe.model.trust_remote_code
    )
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
