"""``llmkit train --config recipe.yaml [section.key=value ...]``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from llmkit.cli._common import debug, fail, sigterm_as_interrupt, user_errors
from llmkit.errors import UserError


@user_errors
def train_command(
    overrides: list[str] = typer.Argument(
        None,
        help="Overrides of recipe values, e.g. train.learning_rate=3e-4 model.n_layer=2.",
        show_default=False,
    ),
    config: Path = typer.Option(
        None, "--config", "-c", help="A YAML recipe (see recipes/); defaults apply without one."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run dir."),
    json_out: bool = typer.Option(False, "--json", help="Print the final metrics as JSON."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    resume: str = typer.Option(
        None,
        "--resume",
        metavar="latest|best|PATH",
        help="Continue from a checkpoint: `latest` (the newest of this run), `best` (its best "
        "validation's), a checkpoint directory or a run directory. Model, optimizer, "
        "scheduler, RNGs and data position are restored.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print parameters, estimated memory, tokens per step and steps; train nothing.",
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        help="CPU threads for torch (default: torch's, fewer on a busy machine; "
        "OMP_NUM_THREADS also sets it).",
        show_default=False,
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Let model.name_or_path (or the data's tokenizer) run Python code of its own "
        "(auto_map); the same as model.trust_remote_code=true. Off: such a model is refused.",
    ),
) -> None:
    """Train a causal LM on data from `llmkit prepare`; the run goes to runs/NAME.

    OVERRIDES: recipe values as section.key=value, e.g. train.learning_rate=3e-4
    model.n_layer=2 name=my-run. Precedence: defaults < recipe < overrides. The resolved config
    is printed and saved as runs/NAME/llmkit_config.yaml; metrics go to runs/NAME/metrics.jsonl,
    checkpoints to runs/NAME/checkpoints. On a machine with several GPUs it starts one
    process per visible GPU by itself (choose them with CUDA_VISIBLE_DEVICES); several
    machines or CPU processes: `torchrun --nproc_per_node N -m llmkit train ...` or
    `accelerate launch -m llmkit train ...`. FSDP / DeepSpeed: distributed.strategy=...
    """
    if trust_remote_code:
        overrides = [*(overrides or []), "model.trust_remote_code=true"]
    with _reported_by_main_process():
        check_before_torch(config, overrides, threads, resume)
    nproc = _gpus_to_launch()
    if nproc:
        args = _train_args(overrides, config, overwrite, json_out, no_progress, resume, dry_run)
        raise typer.Exit(_launch_per_gpu(nproc, args, threads))

    from llmkit.runtime import apply_threads
    from llmkit.training.loop import TrainingInterrupted, train

    if _main_process() or threads is not None:
        apply_threads(threads)
    try:
        with _reported_by_main_process(), sigterm_as_interrupt():
            final = train(
                config,
                overrides or [],
                overwrite=overwrite,
                progress=not no_progress,
                resume=resume,
                dry_run=dry_run,
            )
    except TrainingInterrupted as err:
        _exit_interrupted(err)
    if json_out and _main_process():
        typer.echo(json.dumps(final))


@contextmanager
def _reported_by_main_process() -> Iterator[None]:
    """A :class:`UserError` in the block is printed by the main process only (as one line, by
    :func:`~llmkit.cli._common.user_errors`); another rank exits with status 2 in silence, so
    that N processes do not print the same line N times."""
    try:
        yield
    except UserError:
        if _main_process() or debug():
            raise
        raise typer.Exit(2) from None


def _exit_interrupted(err: BaseException) -> NoReturn:
    """Stop after an interrupted run (Ctrl-C, SIGTERM): status 130; the main process prints
    the interruption's one line (what was saved, how to resume)."""
    if debug():
        raise err
    if not _main_process():
        raise typer.Exit(130) from None
    if sys.stderr.isatty():
        sys.stderr.write("\n")  # end a live progress bar's line
    raise fail(str(err), code=130) from None


def _launch_per_gpu(nproc: int, args: list[str], threads: int | None) -> int:
    """Start ``llmkit train args`` once per GPU under torchrun; returns its exit status."""
    from llmkit.training.distributed import relaunch

    sys.stderr.write(f"llmkit train: {nproc} GPUs visible, one process each (torchrun)\n")
    if threads is not None:
        args = ["--threads", str(threads), *args]
    return relaunch(nproc, args)


def check_before_torch(
    config: Path | None,
    overrides: list[str] | None,
    threads: int | None,
    resume: str | None = None,
):
    """Everything about the flags that needs no torch: ``--threads``, the recipe (file, keys,
    values), its data directory (a ``llmkit prepare`` output) and what ``--resume`` names (a
    checkpoint exists). Returns the recipe.

    Raises:
        UserError: the first problem, in one line, within a fraction of a second.
    """
    from llmkit.core.prepared import read_manifest
    from llmkit.runtime import check_threads
    from llmkit.training.config import load_recipe

    check_threads(threads)
    recipe = load_recipe(config, list(overrides or []))
    try:
        read_manifest(recipe.data.path)
    except UserError as err:
        if "path" not in recipe.data.model_fields_set:  # neither the recipe nor an override
            if config is None:
                why, fix = "no --config given", "pass --config recipes/NAME.yaml, or"
            else:
                why, fix = f"{config} sets no data.path", f"add data.path to {config}, or pass"
            raise UserError(
                f"{err.message} ({why}: the built-in defaults read data.path={recipe.data.path})",
                f"{fix} data.path=DIR of a `llmkit prepare` output",
            ) from None
        raise
    if resume:
        from llmkit.training.checkpoint import resolve_resume

        resolve_resume(resume, recipe.run_dir)
    return recipe


def _main_process() -> bool:
    """True unless a launcher started this process with a rank other than 0."""
    return os.environ.get("RANK", "0") == "0"


def _gpus_to_launch() -> int | None:
    """GPUs to start one process each on, when ``llmkit train`` runs alone on a machine with
    more than one; None otherwise (a CPU, one GPU, or already under torchrun / accelerate)."""
    from llmkit.training.distributed import LAUNCHER_ENV, processes_to_launch

    if any(key in os.environ for key in LAUNCHER_ENV):
        return None  # no torch import: a launched worker goes straight to training
    import torch

    return processes_to_launch(os.environ, torch.cuda.device_count())


def _train_args(
    overrides: list[str] | None,
    config: Path | None,
    overwrite: bool,
    json_out: bool,
    no_progress: bool,
    resume: str | None,
    dry_run: bool,
) -> list[str]:
    """The ``llmkit train`` arguments that give these parameters (for each launched worker)."""
    args = []
    if config is not None:
        args += ["--config", str(config)]
    if resume is not None:
        args += ["--resume", resume]
    flags = {
        "--overwrite": overwrite,
        "--json": json_out,
        "--no-progress": no_progress,
        "--dry-run": dry_run,
    }
    args += [flag for flag, on in flags.items() if on]
    return [*args, *(overrides or [])]


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""
    app.command("train")(train_command)
