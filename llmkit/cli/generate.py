"""``llmkit generate [PROMPT ...]``: continue prompts with a causal LM, streamed or as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from llmkit.cli._common import user_errors
from llmkit.errors import UserError


def read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The prompts to run: the arguments, then each non-empty line of ``--prompts-file``
    (``-`` for standard input); with neither, the non-empty lines of standard input when it is
    not a terminal.

    Raises:
        UserError: the prompts file is unreadable or not UTF-8, or there is no prompt at all.
    """
    found = list(prompts or [])
    if prompts_file is not None:
        if str(prompts_file) == "-":
            found += _lines(sys.stdin.read())
        else:
            try:
                found += _lines(prompts_file.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise UserError(f"{prompts_file} does not exist", "check --prompts-file") from None
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{prompts_file} is not UTF-8 text (byte {err.start})",
                    "give a text file with one prompt per line",
                ) from None
            except OSError as err:
                raise UserError(f"cannot read {prompts_file}: {err.strerror}") from None
    elif not found and not sys.stdin.isatty():
        found += _lines(sys.stdin.read())
    if not found:
        raise UserError(
            "no prompt given",
            'pass one (llmkit generate "Once upon a time"), --prompts-file FILE, or pipe lines in',
        )
    return found


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@user_errors
def generate_command(
    prompts: list[str] = typer.Argument(
        None,
        help='Prompts to continue ("" starts from the beginning of a document).',
        show_default=False,
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Model directory, .gguf file or Hub id. Default: $LLMKIT_MODEL, else the newest "
        "finished run under ./runs, else gpt2.",
        show_default=False,
    ),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(200, "--top-k", help="Sample among the k likeliest; 0 = all."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold; 1 = off."),
    seed: int = typer.Option(None, "--seed", help="Same seed, same text.", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    json_out: bool = typer.Option(
        False, "--json", help="One JSON object per prompt on stdout, no streaming."
    ),
    prompts_file: Path = typer.Option(
        None,
        "--prompts-file",
        "-f",
        help="A file with one prompt per line ('-': stdin).",
        show_default=False,
    ),
) -> None:
    """Continue prompts with a causal language model.

    Text streams to stdout as it is generated (prompt, then continuation); token counts and
    tokens/s go to stderr. With no prompt argument, prompts are read from standard input, one
    per line.
    """
    from llmkit.generation.generate import GenerationSettings, generate_completions

    texts = read_prompts(prompts, prompts_file)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )

    def print_json(result) -> None:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))

    generate_completions(
        texts,
        model=model,
        settings=settings,
        stream=not json_out,
        device=device,
        dtype=dtype,
        on_result=print_json if json_out else None,
    )


def register(app: typer.Typer) -> None:
    """Add the ``generate`` command to ``app``."""
    app.command("generate")(generate_command)
