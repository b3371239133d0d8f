"""``llmkit generate [PROMPT ...]``: continue prompts with a causal LM, streamed or as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from llmkit.cli._common import (
    check_device_dtype,
    stdin_text,
    threads_option,
    trust_remote_code_option,
    user_errors,
    utf8_text,
)
from llmkit.errors import UserError, json_error_text
from llmkit.generation.settings import GenerationSettings  # no torch: the flags' defaults

DEFAULTS = GenerationSettings()


def read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The prompts to run: the arguments, then those of ``--prompts-file`` (``-`` for standard
    input); with neither, those of standard input when it is not a terminal.

    A file holds one prompt per non-empty line, or JSON Lines with a ``prompt`` field per object
    (recognised when its first non-empty line starts with ``{``).

    Raises:
        UserError: the prompts file is unreadable, not UTF-8, malformed JSON Lines (file and
            line named) or holds no prompt; there is no prompt at all.
    """
    found = [utf8_text(p, f"prompt {i}") for i, p in enumerate(prompts or [], start=1)]
    if prompts_file is not None:
        name = "standard input" if str(prompts_file) == "-" else str(prompts_file)
        if str(prompts_file) == "-":
            text = stdin_text()
        else:
            try:
                text = prompts_file.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise UserError(f"{prompts_file} does not exist", "check --prompts-file") from None
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{prompts_file} is not UTF-8 text (byte {err.start})",
                    "give a text file with one prompt per line",
                ) from None
            except OSError as err:
                raise UserError(
                    f"cannot read {prompts_file}: {err.strerror}",
                    "give --prompts-file a text file (one prompt per line), or - for standard "
                    "input",
                ) from None
        from_file = _parse_prompts(text, name)
        if not from_file:
            raise UserError(
                f"{name} holds no prompt (it is empty or blank)",
                "write one prompt per line, or JSON Lines with a prompt field",
            )
        found += from_file
    elif not found and not sys.stdin.isatty():
        found += _lines(stdin_text())
    if not found:
        raise UserError(
            "no prompt given",
            'pass one (llmkit generate "Once upon a time"), --prompts-file FILE, or pipe lines in',
        )
    return found


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _parse_prompts(text: str, name: str) -> list[str]:
    """Prompts of a prompts file: JSON Lines (``{"prompt": ...}``) or plain lines."""
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return _lines(text)
    found = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise UserError(
                f"{name}, line {number}: not valid JSON ({json_error_text(err)})",
                'write one object per line, e.g. {"prompt": "Once upon a time"}',
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(
                f'{name}, line {number}: no "prompt" string field',
                'write one object per line, e.g. {"prompt": "Once upon a time"}',
            )
        found.append(record["prompt"])
    return found


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
    max_new_tokens: int = typer.Option(
        DEFAULTS.max_new_tokens, "--max-new-tokens", help="Tokens to generate."
    ),
    temperature: float = typer.Option(
        DEFAULTS.temperature, "--temperature", "-t", help="0 = greedy."
    ),
    top_k: int = typer.Option(
        DEFAULTS.top_k, "--top-k", help="Sample among the k likeliest; 0 = all."
    ),
    top_p: float = typer.Option(
        DEFAULTS.top_p, "--top-p", help="Nucleus sampling threshold; 1 = off."
    ),
    repetition_penalty: float = typer.Option(
        DEFAULTS.repetition_penalty,
        "--repetition-penalty",
        help="Penalty on tokens already present; 1 = off.",
    ),
    num_return_sequences: int = typer.Option(
        1, "--num-return-sequences", "-n", help="Completions per prompt (sampling only)."
    ),
    stop: list[str] = typer.Option(
        None, "--stop", help="Stop string (repeatable).", show_default=False
    ),
    seed: int = typer.Option(None, "--seed", help="Same seed, same text.", show_default=False),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Prompts per forward pass."),
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template."),
    system: str = typer.Option(
        None, "--system", help="System message (implies --chat).", show_default=False
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    json_out: bool = typer.Option(
        False, "--json", help="One JSON object per output on stdout, no streaming."
    ),
    prompts_file: Path = typer.Option(
        None,
        "--prompts-file",
        "-f",
        help="A file with one prompt per line, or JSONL with a prompt field ('-': stdin).",
        show_default=False,
    ),
    threads: int = threads_option(),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Continue prompts with a causal language model.

    PROMPTS: texts to continue ("" starts from the beginning of a document). With none, prompts
    come from --prompts-file (one per line, or JSON Lines with a "prompt" field; '-' is standard
    input) or, when piped, from standard input, one per line.

    --model: a model directory (from llmkit train or save_pretrained), a .gguf file or a Hub id;
    default $LLMKIT_MODEL, else the newest finished run under ./runs, else gpt2.
    --max-new-tokens N: new tokens per completion (the prompt is not counted).
    --temperature 0 is greedy; --top-k 0 and --top-p 1 are no limit; --repetition-penalty 1 is
    off; --num-return-sequences N samples N completions per prompt; --seed S: same seed, same
    text. --stop STR (repeatable): a completion ends just before the first stop string; every
    EOS id of the tokenizer and the model's generation_config also ends it, and so does the
    chat template's end-of-turn token (e.g. <|im_end|>) when the template has one.
    --batch-size B: prompts per forward pass, left-padded (greedy outputs do not depend on it).
    --chat wraps each prompt in the model's chat template (the one saved with the model or
    run) as a user message; --system TEXT adds a system message (and implies --chat).
    --device auto|cpu|cuda|mps, --dtype auto|float32|bfloat16|float16.

    Text streams to stdout as it is generated (prompt, then continuation; batches of more than
    one are printed as they finish); token counts and tokens/s go to stderr. --json prints one
    object per completion instead: prompt, completion, prompt_tokens, new_tokens, finish_reason
    (eos, stop or length), stop, index, seconds and tokens_per_sec.
    """
    from llmkit.runtime import check_threads

    # Every flag is checked before torch is imported (seconds): a mistake is one line at once.
    check_threads(threads)
    check_device_dtype(device, dtype)
    settings = GenerationSettings.from_flags(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_return_sequences,
        stop=stop,
    )
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    texts = read_prompts(prompts, prompts_file)
    from llmkit.generation.generate import generate_completions
    from llmkit.runtime import apply_threads

    apply_threads(threads)

    def print_json(result) -> None:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))

    generate_completions(
        texts,
        model=model,
        settings=settings,
        batch_size=batch_size,
        chat=chat,
        system=system,
        stream=not json_out,
        device=device,
        dtype=dtype,
        on_result=print_json if json_out else None,
        trust_remote_code=trust_remote_code,
    )


def register(app: typer.Typer) -> None:
    """Add the ``generate`` command to ``app``."""
    app.command("generate")(generate_command)
