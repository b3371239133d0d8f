"""``llmkit chat``: an interactive session with an instruct model, history, /reset and /exit."""

from __future__ import annotations

import typer

from llmkit.cli._common import (
    Utf8Lines,
    check_device_dtype,
    threads_option,
    trust_remote_code_option,
    user_errors,
)
from llmkit.generation.settings import CHAT_DEFAULTS  # no torch: the flags' defaults


@user_errors
def chat_command(
    model: str = typer.Option(
        None, "--model", "-m", help="Model directory, .gguf file or Hub id.", show_default=False
    ),
    system: str = typer.Option(None, "--system", help="System message.", show_default=False),
    max_new_tokens: int = typer.Option(
        CHAT_DEFAULTS.max_new_tokens, "--max-new-tokens", help="Tokens per reply."
    ),
    temperature: float = typer.Option(
        CHAT_DEFAULTS.temperature, "--temperature", "-t", help="0 = greedy."
    ),
    top_k: int = typer.Option(
        CHAT_DEFAULTS.top_k, "--top-k", help="Sample among the k likeliest; 0 = all."
    ),
    top_p: float = typer.Option(
        CHAT_DEFAULTS.top_p, "--top-p", help="Nucleus sampling threshold; 1 = off."
    ),
    repetition_penalty: float = typer.Option(
        CHAT_DEFAULTS.repetition_penalty,
        "--repetition-penalty",
        help="Penalty on tokens already present; 1 = off.",
    ),
    stop: list[str] = typer.Option(
        None, "--stop", help="Stop string (repeatable).", show_default=False
    ),
    seed: int = typer.Option(None, "--seed", help="Same seed, same replies.", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    threads: int = threads_option(),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Chat with an instruct model through its chat template, keeping the history.

    Type a message and press Enter; the reply streams to stdout and ends at the chat template's
    end-of-turn token (e.g. <|im_end|>) or an EOS. The template is the one saved with the model
    (a run of llmkit train on chat data carries the one it was trained with). /reset clears the
    history (the --system message stays), /exit or end of input (Ctrl-D) ends the session. From
    a script, pipe one message per line into standard input: replies go to stdout, one per message.

    --model: a model directory, .gguf file or Hub id whose tokenizer has a chat template
    (default $LLMKIT_MODEL, else the newest finished run, else gpt2). --system TEXT: the system
    message. --max-new-tokens N per reply; --temperature 0 is greedy; --top-k, --top-p,
    --repetition-penalty, --stop (repeatable) and --seed as for llmkit generate. When the
    conversation outgrows the model's context, the oldest exchanges are dropped.
    --device auto|cpu|cuda|mps, --dtype auto|float32|bfloat16|float16.
    """
    from llmkit.generation.settings import GenerationSettings
    from llmkit.runtime import check_threads

    check_threads(threads)  # the flags first, before torch is imported
    check_device_dtype(device, dtype)
    settings = GenerationSettings.from_flags(
        CHAT_DEFAULTS,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        stop=stop,
    )
    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.generation.chat import ChatSession, chat_loop
    from llmkit.generation.cpu_path import auto_cpu_path
    from llmkit.runtime import announce_threads, apply_threads

    apply_threads(threads)
    lm, tokenizer, _source = load_model_and_tokenizer(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    lm, _choice = auto_cpu_path(lm, tokenizer, dtype)  # --dtype auto on a CPU: calibrated
    session = ChatSession(lm, tokenizer, settings, system=system)  # checks the template
    announce_threads()
    chat_loop(session, Utf8Lines())


def register(app: typer.Typer) -> None:
    """Add the ``chat`` command to ``app``."""
    app.command("chat")(chat_command)
