"""``llmkit eval --model MODEL --data DIR_OR_FILE``: loss, perplexity and bits per byte."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from llmkit.cli._common import user_errors


@contextmanager
def _progress_bar(enabled: bool) -> Iterator:
    """A ``progress(done, total)`` callback drawing a transient bar on stderr, or None."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "scoring",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("scoring", total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def results_table(result: dict):
    """A rich table of one evaluation: model, data, tokens, loss, perplexity, bits per byte."""
    from rich.table import Table

    table = Table(title="llmkit eval")
    table.add_column("model", overflow="fold")
    table.add_column("data", overflow="fold")
    for name in ("tokens", "loss (nats/token)", "perplexity", "bits per byte"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row(
        result["model"],
        result["data"],
        f"{result['tokens']:,}",
        f"{result['loss']:.4f}",
        f"{result['perplexity']:.2f}",
        f"{result['bits_per_byte']:.4f}",
    )
    return table


@user_errors
def eval_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model directory, .gguf file or Hub id.", show_default=False
    ),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="A prepared directory (scored block by block), a text file or a directory of .txt.",
        show_default=False,
    ),
    split: str = typer.Option("validation", "--split", help="Split of prepared data."),
    max_length: int = typer.Option(
        None,
        "--max-length",
        help="Tokens per window for text (default: the model's positions).",
        show_default=False,
    ),
    stride: int = typer.Option(
        None,
        "--stride",
        help="New tokens scored per window (default: --max-length); smaller = more context.",
        show_default=False,
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows or blocks per forward pass."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
) -> None:
    """Measure loss (nats/token), perplexity and bits per UTF-8 byte of a model.

    Every token is scored exactly once: prepared blocks like validation in training, text with
    sliding windows of --max-length tokens advancing by --stride.
    """
    from llmkit.evaluation.evaluate import evaluate

    with _progress_bar(sys.stderr.isatty()) as progress:
        result = evaluate(
            model,
            data,
            split=split,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    if json_out:
        typer.echo(json.dumps(result))
    else:
        from rich.console import Console

        Console().print(results_table(result))


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to ``app``."""
    app.command("eval")(eval_command)
