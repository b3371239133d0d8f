"""``llmkit prepare``: raw text to tokenized training blocks (SPEC §2).

Only parses flags and calls :func:`llmkit.data.pipeline.prepare`; heavy libraries are imported
inside the command so that ``llmkit --help`` stays fast.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer

from llmkit.cli._common import user_errors


class SplitOn(str, Enum):
    """How a plain-text file is cut into documents."""

    blank_lines = "blank-lines"
    none = "none"


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``) into KeyboardInterrupt, so the temporary output is removed."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@user_errors
def prepare_command(
    inputs: list[str] = typer.Argument(
        ...,
        metavar="INPUT...",
        help="Files (.txt, .md, .jsonl, .json; optionally .gz/.bz2/.xz), directories "
        "(searched recursively) or glob patterns.",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Directory to write (datasets, tokenizer, manifest.json)."
    ),
    vocab_size: int = typer.Option(
        1024, "--vocab-size", help="Vocabulary size of the trained byte-level BPE, in tokens."
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Use this pretrained tokenizer (directory) instead of training."
    ),
    block_size: int = typer.Option(128, "--block-size", help="Tokens per training block."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of documents held out for validation, in [0, 1)."
    ),
    seed: int = typer.Option(1337, "--seed", help="Seed of the train/validation split."),
    split_on: SplitOn = typer.Option(
        SplitOn.blank_lines,
        "--split-on",
        help="Cut text files into documents on runs of blank lines, or keep each file whole.",
    ),
    text_field: str = typer.Option(
        "text", "--text-field", help="Field of a JSON line that holds the document."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUTPUT if it already holds prepared data."
    ),
    num_proc: int | None = typer.Option(
        None,
        "--num-proc",
        help="Worker processes for tokenizing (default: one process, whose tokenizer uses "
        "every core). The output does not depend on it.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
) -> None:
    """Clean, deduplicate, tokenize and pack raw text into training blocks.

    INPUT: files, directories (searched recursively) or globs of .txt, .md, .jsonl or .json
    (JSON lines), each optionally .gz, .bz2 or .xz. Progress and the summary go to stderr;
    with --json the manifest goes to stdout.
    """
    from llmkit.data.pipeline import prepare

    with _terminate_as_interrupt():
        manifest = prepare(
            inputs,
            output,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            block_size=block_size,
            val_fraction=val_fraction,
            seed=seed,
            split_on=split_on.value,
            text_field=text_field,
            overwrite=overwrite,
            num_proc=num_proc,
        )
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))


def register(app: typer.Typer) -> None:
    """Add the ``prepare`` command to ``app``."""
    app.command("prepare")(prepare_command)
