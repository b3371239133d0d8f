"""Several processes: one per GPU when ``llmkit train`` runs alone on a multi-GPU machine, and
the accelerate plugin (FSDP or DeepSpeed) that a recipe's ``distributed`` section selects.

- Relaunch: a process not started by a launcher (none of :data:`LAUNCHER_ENV` in its
  environment) that sees more than one CUDA device starts the same command
  again through PyTorch's launcher (``torch.distributed.run``, the code behind ``torchrun``),
  one process per visible GPU, and waits for them. On a CPU or a single GPU nothing changes.
  ``CUDA_VISIBLE_DEVICES`` chooses the GPUs, as with any PyTorch program.
- Plugins: ``strategy: fsdp`` builds accelerate's ``FullyShardedDataParallelPlugin`` (FSDP2,
  each transformer block wrapped on its own, Zhao et al. 2023, "PyTorch FSDP"); ``strategy:
  deepspeed`` builds ``DeepSpeedPlugin`` (ZeRO, Rajbhandari et al. 2020). Both run on GPUs
  and, under a launcher, on CPU processes over gloo: FSDP through :func:`shard_on_cpu`
  (accelerate itself would train plain DDP there), DeepSpeed through its CPU accelerator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import UserError, json_error_text, require

#: Environment variables that say "a launcher started this process" (torchrun and accelerate
#: launch set the first three; MPI launchers, which accelerate also joins, the others).
LAUNCHER_ENV = (
    "WORLD_SIZE",
    "LOCAL_RANK",
    "RANK",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
)


def processes_to_launch(env: Mapping[str, str], device_count: int) -> int | None:
    """How many processes to relaunch with, or None to run in this process.

    Args:
        env: the process environment (``os.environ``).
        device_count: visible CUDA devices (``torch.cuda.device_count()``).

    Returns:
        ``device_count`` when it is above 1 and no launcher variable is set; else None.
    """
    if any(key in env for key in LAUNCHER_ENV):
        return None
    return device_count if device_count > 1 else None


def launcher_args(nproc: int, train_args: Sequence[str]) -> list[str]:
    """The arguments of ``torchrun`` (``torch.distributed.run``) that run ``llmkit train``
    with ``train_args`` in ``nproc`` processes on this machine.

    ``--standalone`` starts a local rendezvous on a free port, so two runs on one machine do
    not collide.
    """
    return ["--standalone", "--nproc_per_node", str(nproc), "-m", "llmkit", "train", *train_args]


def relaunch(nproc: int, train_args: Sequence[str]) -> int:
    """Run ``llmkit train train_args`` in ``nproc`` processes (torchrun) and wait.

    A function call into ``torch.distributed.run`` (not a subprocess of a command string);
    each worker prints its own output (only rank 0 prints and writes).

    Returns:
        0, or the exit status of the first worker that failed (2 for a user error).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(launcher_args(nproc, train_args))
    try:
        run(args)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        return next((c for c in codes if c not in (0, None)), 1)
    return 0


def require_deepspeed() -> None:
    """Import ``deepspeed`` or raise a one-line :class:`UserError` (missing or broken install)."""
    require(
        "deepspeed",
        "distributed.strategy=deepspeed needs the deepspeed package",
        "pip install deepspeed",
    )


def check_strategy(
    dcfg, *, cuda: bool, lora: bool, launched: bool = True, machine: bool = True
) -> None:
    """Refuse a ``distributed`` section that cannot run here, before a model is built.

    Args:
        dcfg: the recipe's ``distributed`` section.
        cuda: a CUDA GPU is visible.
        lora: the recipe trains LoRA adapters.
        launched: a launcher (torchrun, accelerate launch) started this process
            (:data:`LAUNCHER_ENV`); fsdp and deepspeed need one, for their process group
            (on several GPUs the CLI relaunches itself under torchrun first).
        machine: check what this machine must have (GPUs, a launcher, deepspeed installed);
            False: only the recipe itself is checked (``make_plan`` does that first, then
            checks the machine; a dry run prints its plan before raising the latter).

    Raises:
        UserError: fsdp or deepspeed without a launcher; deepspeed
            not installed or its config file unreadable; LoRA with fsdp or deepspeed (merging
            sharded weights is not supported: LoRA's trainable state is small, use ddp).
    """
    if dcfg.strategy == "ddp":
        return
    if lora:
        raise UserError(
            f"LoRA with distributed.strategy={dcfg.strategy} is not supported",
            "use distributed.strategy=ddp: the adapters and their optimizer state are small",
        )
    if not machine:
        return
    if not launched and (not cuda or dcfg.strategy == "fsdp"):
        # On several GPUs the CLI has relaunched itself under torchrun before this point. On a
        # CPU or one GPU accelerate would silently train without FSDP (it applies the plugin
        # only to a multi-GPU state): say so instead. (DeepSpeed on one GPU starts its own.)
        where = "on CPUs" if not cuda else "on one GPU"
        n = 2 if not cuda else 1
        raise UserError(
            f"distributed.strategy={dcfg.strategy} {where} needs processes started by a "
            "launcher (it shards the weights over a process group)",
            f"torchrun --nproc_per_node {n} -m llmkit train ... (or use distributed.strategy=ddp)",
        )
    if dcfg.strategy == "deepspeed":
        if not cuda:  # DeepSpeed's CPU accelerator (it would pick it itself, with a warning)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        require_deepspeed()
        if dcfg.deepspeed_config is not None:
            _read_deepspeed_config(dcfg.deepspeed_config)


def _read_deepspeed_config(path: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read distributed.deepspeed_config {path}: {err.strerror}") from err
    except (ValueError, RecursionError) as err:
        raise UserError(
            f"distributed.deepspeed_config {path} is not valid JSON "
            f"({json_error_text(err, line=True)})",
            "fix the file at that place, or leave distributed.deepspeed_config out",
        ) from None
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise UserError(
            f"distributed.deepspeed_config {path} has no zero_optimization section",
            'add e.g. "zero_optimization": {"stage": 2}',
        )
    return config


def accelerator_plugins(
    dcfg, tcfg, *, micro_batch_size: int, accum: int, world: int
) -> dict[str, Any]:
    """Keyword arguments for ``accelerate.Accelerator`` that select the recipe's strategy.

    Args:
        dcfg: the recipe's ``distributed`` section.
        tcfg: the recipe's ``train`` section (clipping, precision).
        micro_batch_size: blocks per forward pass per process.
        accum: micro-batches per optimizer step.
        world: number of processes.

    Returns:
        ``{}`` for ddp (accelerate's default under a launcher), ``{"fsdp_plugin": ...}`` or
        ``{"deepspeed_plugin": ...}``.

    Raises:
        UserError: see :func:`check_strategy` (deepspeed missing, bad config file).
    """
    if dcfg.strategy == "ddp":
        return {}
    if dcfg.strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {
            "fsdp_plugin": FullyShardedDataParallelPlugin(
                fsdp_version=2,
                reshard_after_forward=dcfg.reshard_after_forward,
                # each block of the model's _no_split_modules (GPT2Block, LlamaDecoderLayer...)
                auto_wrap_policy="transformer_based_wrap",
                cpu_offload=dcfg.cpu_offload,
                # checkpoints: each process writes its shard; the final model is gathered whole
                state_dict_type="SHARDED_STATE_DICT",
                cpu_ram_efficient_loading=False,
            )
        }
    require_deepspeed()
    from accelerate.utils import DeepSpeedPlugin

    if dcfg.deepspeed_config is not None:
        config = _read_deepspeed_config(dcfg.deepspeed_config)
    else:
        offload = {"device": "cpu" if dcfg.cpu_offload else "none"}
        zero: dict[str, Any] = {"stage": dcfg.zero_stage}
        if dcfg.zero_stage >= 2:
            zero["offload_optimizer"] = offload
        if dcfg.zero_stage == 3:
            zero["offload_param"] = offload
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        config = {"zero_optimization": zero}
    # llmkit feeds no DataLoader to accelerate, so the batch sizes are stated here.
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=accum,
        train_batch_size=micro_batch_size * accum * world,
        gradient_clipping=tcfg.grad_clip,
    )
    config.setdefault("bf16", {"enabled": tcfg.mixed_precision == "bf16"})
    config.setdefault("fp16", {"enabled": tcfg.mixed_precision == "fp16"})
    return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=config)}


def shard_on_cpu(accelerator, plugins: Mapping[str, Any]) -> None:
    """Make accelerate run its FSDP2 path on CPU processes (gloo).

    accelerate (1.x, ``AcceleratorState.__init__``) turns an ``fsdp_plugin`` into
    ``DistributedType.FSDP`` only on GPU-like devices; with ``cpu=True`` (the only way it joins
    CPU processes over gloo) it keeps ``MULTI_CPU`` and silently trains plain DDP. PyTorch's
    FSDP2 (``torch.distributed.fsdp.fully_shard``) itself runs on CPU tensors over gloo, so
    here the started state is switched to FSDP with the recipe's plugin: from then on
    ``prepare`` (``fully_shard`` of each block, then the root), ``no_sync``, ``clip_grad_norm_``,
    ``save_state`` / ``load_state`` (``torch.distributed.checkpoint``) and ``get_state_dict``
    take exactly the code path they take on GPUs. Nothing is done on GPUs, for DDP, or when
    accelerate already chose FSDP.

    Args:
        accelerator: a started ``accelerate.Accelerator`` (process group up).
        plugins: what :func:`accelerator_plugins` returned.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = plugins.get("fsdp_plugin")
    state = accelerator.state
    if plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    # both singletons: each later ``AcceleratorState()`` copies the process state's type in
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
