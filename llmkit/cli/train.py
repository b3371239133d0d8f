"""``llmkit train --config recipe.yaml [section.key=value ...]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from llmkit.cli._common import debug, fail, sigterm_as_interrupt, user_errors


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
        metavar="latest|PATH",
        help="Continue from a checkpoint: `latest` (the newest of this run), a checkpoint "
        "directory or a run directory. Model, optimizer, scheduler, RNGs and data position "
        "are restored.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print parameters, estimated memory, tokens per step and steps; train nothing.",
    ),
) -> None:
    """Train a causal LM on data from `llmkit prepare`; the run goes to runs/NAME.

    OVERRIDES: recipe values as section.key=value, e.g. train.learning_rate=3e-4
    model.n_layer=2 name=my-run. Precedence: defaults < recipe < overrides. The resolved config
    is printed and saved as runs/NAME/llmkit_config.yaml; metrics go to runs/NAME/metrics.jsonl,
    checkpoints to runs/NAME/checkpoints. Several processes: `torchrun --nproc_per_node N -m
    llmkit train ...` or `accelerate launch -m llmkit train ...`.
    """
    from llmkit.training.loop import TrainingInterrupted, train

    try:
        with sigterm_as_interrupt():
            final = train(
                config,
                overrides or [],
                overwrite=overwrite,
                progress=not no_progress,
                resume=resume,
                dry_run=dry_run,
            )
    except TrainingInterrupted as err:
        if debug():
            raise
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # end a live progress bar's line
        raise fail(str(err), code=130) from None
    if json_out:
        typer.echo(json.dumps(final))


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""
    app.command("train")(train_command)
