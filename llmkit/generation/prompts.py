"""Prompts to token ids: plain text, or a conversation through the model's chat template, and
the check that a prompt and its new tokens fit in the model's positions."""

from __future__ import annotations

from typing import Any

from llmkit.core.loading import model_max_positions
from llmkit.errors import UserError
from llmkit.templates import render_chat


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with the tokenizer's usual special tokens (e.g. Llama's BOS).

    An empty prompt starts from the BOS token, or EOS when there is none (GPT-2's
    ``<|endoftext|>`` is both), so that the model generates from the start of a document.
    """
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        bos = tokenizer.bos_token_id
        ids = [bos if bos is not None else tokenizer.eos_token_id]
    return ids


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """``[system?, user]`` messages for one prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation ``messages`` (``{"role", "content"}`` dicts) rendered with the
    tokenizer's chat template, ending with the prompt for the assistant's turn.

    Raises:
        UserError: the tokenizer has no chat template (a base model, not an instruct one); the
            template fails (:func:`llmkit.templates.render_chat`: syntax error, sandbox,
            undefined name...), naming its file.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the model's tokenizer has no chat template (it is not a chat/instruct model)",
            "use `llmkit generate` without --chat/--system, or an instruct model such as "
            "SmolLM2-135M-Instruct",
        )
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of :func:`chat_text`; the template writes its own special tokens (BOS...), so
    the tokenizer adds none."""
    return list(tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def encode_prompts(
    tokenizer: Any, prompts: list[str], *, chat: bool = False, system: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt: :func:`encode_prompt`, or with ``chat`` the prompt as a user
    message (after ``system``, when given) through the chat template (:func:`encode_chat`).

    Raises:
        UserError: ``chat`` and no chat template, or a template that fails.
    """
    if not chat:
        return [encode_prompt(tokenizer, p) for p in prompts]
    return [encode_chat(tokenizer, chat_messages(p, system)) for p in prompts]


def check_fits(model: Any, n_prompt: int, max_new_tokens: int, label: str = "the prompt") -> None:
    """Raise when the prompt and the new tokens do not fit in the model's positions.

    Args:
        n_prompt: prompt length in tokens.
        max_new_tokens: tokens to generate.

    Raises:
        UserError: ``n_prompt + max_new_tokens`` exceeds the model's positions.
    """
    positions = model_max_positions(model)
    if positions is None or n_prompt + max_new_tokens <= positions:
        return
    room = positions - n_prompt
    limit = positions - max_new_tokens  # the longest prompt that fits with these new tokens
    if room > 0:
        hint = f"use --max-new-tokens {room} or less, or a shorter prompt"
    elif limit > 0:
        hint = (
            f"shorten the prompt to {limit} tokens or fewer (the model's {positions} "
            f"positions minus --max-new-tokens {max_new_tokens})"
        )
    else:
        hint = f"use --max-new-tokens below {positions} and a shorter prompt"
    tokens = "token" if n_prompt == 1 else "tokens"
    raise UserError(
        f"{label} is {n_prompt} {tokens}; with --max-new-tokens {max_new_tokens} that is "
        f"{n_prompt + max_new_tokens}, more than the model's {positions} positions",
        hint,
    )


def prompt_labels(n: int) -> list[str]:
    """How errors name each of ``n`` prompts: "the prompt", or "prompt 1", "prompt 2"..."""
    return ["the prompt"] if n == 1 else [f"prompt {i + 1}" for i in range(n)]
