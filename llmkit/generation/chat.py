"""An interactive chat with an instruct model: history, ``/reset``, ``/exit`` (SPEC §4).

Each user line is appended to the conversation, the whole conversation is rendered with the
model's chat template (:func:`~llmkit.generation.prompts.encode_chat`) and the reply streamed
as it is generated (only text that can no longer change: the streamed reply is exactly the
reply kept), then kept in the history. The same loop reads a terminal or a script's
standard input: one user message per line.

When the conversation no longer fits in the model's positions with ``max_new_tokens`` more,
the oldest exchanges are dropped (the system message is kept), and a note says so on stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from llmkit.core.loading import model_max_positions
from llmkit.errors import UserError
from llmkit.generation.batching import Completion, complete
from llmkit.generation.prompts import chat_messages, encode_chat
from llmkit.generation.settings import GenerationSettings

COMMANDS = "/reset clears the history, /exit (or end of input) ends the session"


@dataclass
class ChatSession:
    """A conversation with a loaded model.

    Args:
        model, tokenizer: the loaded model (in eval mode) and its tokenizer, which must have a
            chat template.
        settings: decoding settings for each reply.
        system: the system message, kept across ``/reset`` (None: none).
    """

    model: Any
    tokenizer: Any
    settings: GenerationSettings
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    """The user and assistant messages so far (the system message not included)."""

    def __post_init__(self) -> None:
        encode_chat(self.tokenizer, chat_messages("", self.system))  # no template: fail now

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history.clear()

    def _fit(self, messages: list[dict[str, str]], err: TextIO) -> list[int]:
        """Token ids of the conversation, dropping the oldest exchanges until it fits."""
        positions = model_max_positions(self.model)
        budget = None if positions is None else positions - self.settings.max_new_tokens
        dropped = 0
        while True:
            ids = encode_chat(self.tokenizer, messages)
            if budget is None or len(ids) <= budget:
                break
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:  # only the new message is left: it cannot fit
                raise UserError(
                    f"the message is {len(ids)} tokens with the chat template; with "
                    f"--max-new-tokens {self.settings.max_new_tokens} that is more than the "
                    f"model's {positions} positions",
                    f"the message and the chat template must fit in {budget} tokens (the model's "
                    f"{positions} positions minus --max-new-tokens "
                    f"{self.settings.max_new_tokens}): shorten it, or lower --max-new-tokens",
                )
            messages = messages[:first] + messages[first + 2 :]  # drop one user+assistant pair
            dropped += 1
        if dropped:
            self.history[:] = [m for m in messages if m["role"] != "system"][:-1]
            err.write(f"[dropped the {dropped} oldest exchange(s) to fit the context]\n")
        return ids

    def reply(self, message: str, *, out: TextIO, err: TextIO) -> Completion:
        """Answer ``message``: stream the reply to ``out`` and keep both in the history.

        Raises:
            UserError: the message alone (with the system message) does not fit the context.
        """
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*system, *self.history, {"role": "user", "content": message}]
        ids = self._fit(messages, err)
        result = complete(
            self.model, self.tokenizer, "", self.settings, stream_to=out, prompt_ids=ids
        )
        out.write("\n")
        out.flush()
        self.history += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": result.completion.strip()},
        ]
        return result


def chat_loop(
    session: ChatSession,
    inp: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    interactive: bool | None = None,
) -> int:
    """Read user messages from ``inp`` one line at a time and answer each; return the number of
    replies. ``/reset`` clears the history, ``/exit`` or the end of input ends the loop.

    A message that cannot fit in the context prints one ``error:`` line on ``err`` and the
    session goes on when interactive; from a script (not interactive) the
    :class:`~llmkit.errors.UserError` is raised, so the command exits with status 2 after the
    replies already written. ``interactive`` (default: ``inp`` is a terminal) shows a ``you>``
    prompt and the per-reply speed on ``err``.
    """
    inp = inp or sys.stdin
    out = out or sys.stdout
    err = err or sys.stderr
    if interactive is None:
        interactive = inp.isatty()
    if interactive:
        err.write(f"[chat: {COMMANDS}]\n")
    replies = 0
    while True:
        if interactive:
            err.write("you> ")
            err.flush()
        line = inp.readline()
        if not line:
            break
        message = line.rstrip("\n")
        command = message.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            err.write("[history cleared]\n")
            continue
        if command.startswith("/"):
            err.write(f"[unknown command {command}; {COMMANDS}]\n")
            continue
        try:
            result = session.reply(message, out=out, err=err)
        except UserError as error:
            if not interactive:  # a script: stop with status 2 (SPEC §6), replies so far kept
                raise
            err.write(f"error: {error}\n")
            continue
        replies += 1
        if interactive:
            err.write(
                f"[{result.new_tokens} tokens, {result.tokens_per_sec:.1f} tokens/s, "
                f"stopped by {result.finish_reason}]\n"
            )
        err.flush()
    return replies
