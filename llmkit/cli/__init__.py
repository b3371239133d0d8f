"""The ``llmkit`` command: one thin module per subcommand that parses flags and calls a function.

Start-up stays under 0.3 s because nothing here imports torch, transformers, datasets or
accelerate; each command imports them when it runs (``tests/cli/test_cli.py`` checks this).
"""

from __future__ import annotations

import typer

from llmkit import __version__
from llmkit.cli import cache as _cache
from llmkit.cli import chat as _chat
from llmkit.cli import evaluate as _evaluate
from llmkit.cli import export as _export
from llmkit.cli import generate as _generate
from llmkit.cli import prepare as _prepare
from llmkit.cli import serve as _serve
from llmkit.cli import train as _train
from llmkit.cli._common import OneLineErrors

app = typer.Typer(
    name="llmkit",
    cls=OneLineErrors,  # usage errors: one line, exit 2 (no Usage: block)
    help="Raw text to a trained causal language model, generated text and measured quality.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: the rich help renderer costs ~0.15 s of start-up (SPEC §1 asks < 0.3 s).
    rich_markup_mode=None,
    # Click (>= 8.2) already suggests the closest command; Typer would append the same again.
    suggest_commands=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Raw text to a trained causal language model, generated text and measured quality."""


_prepare.register(app)
_train.register(app)
_generate.register(app)
_evaluate.register(app)
_chat.register(app)
_cache.register(app)
_serve.register(app)
_export.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
