"""Chat and instruction data for supervised fine-tuning (SPEC §2 "Chat and instruction data").

From a JSON record to the training tensors, in four pure steps:

1. :func:`conversation_from_record`: a record in one of four formats becomes a list of
   ``{"role", "content"}`` messages — ``messages`` (the OpenAI / Hugging Face chat format),
   ShareGPT's ``conversations`` of ``{"from", "value"}`` turns, ``prompt``/``response`` (or
   ``prompt``/``completion``), or Alpaca's ``instruction``/``input``/``output`` (Taori et al.
   2023, Stanford Alpaca, ``alpaca_data.json``) — one small transform per format, each ending
   in the same checks (:data:`RECORD_TRANSFORMS`);
2. :func:`ensure_chat_template`: the tokenizer's own chat template, or a named default
   (``chatml``) installed with its marker tokens;
3. :func:`render_with_labels`: the conversation rendered with the template and tokenized exactly
   as ``tokenizer.apply_chat_template(messages, tokenize=True)`` does, with labels equal to the
   token ids on the assistant's answers (and their end-of-turn token) and ``-100`` everywhere
   else, so that the loss falls on the answers only;
4. :class:`llmkit.data.pack.SFTPacker`: whole conversations packed into rows of ``block_size``
   tokens with ``position_ids`` that restart at 0 for each conversation.

How a packed row is fed to a model so that each conversation attends only to itself is in
:func:`packed_attention_mask`'s docstring.

Finding the answers uses the template's own ``{% generation %}`` markers where it has them, and
otherwise works for any template by rendering prefixes of the conversation (:func:`answer_spans`
gives the rules and why): the character span of assistant turn ``i`` runs from the end of the
conversation before it rendered with ``add_generation_prompt=True`` (or, where the generation
prompt adds a blank line or an opened think block, from where that prompt and the rendered
answer part) to the end of its end-of-turn marker; an earlier answer that the template renders
differently once later turns exist (Qwen3) is found by its text in the whole rendering. Tokens
overlapping a span (by the tokenizer's character offsets) are the answer's. Rendering the
prefixes ``messages[:i]`` is the method of allenai/open-instruct (``open_instruct/
finetune.py``, ``encode_with_messages_format``), which counts the prefixes' tokens; mapping
character spans to tokens by offsets instead is the rule of transformers'
``return_assistant_tokens_mask`` (``tokenization_utils_base.py``, ``apply_chat_template``), and
stays right when a token straddles a turn's edge.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmkit.core.prepared import IGNORE_INDEX
from llmkit.data.choices import TRAIN_ON
from llmkit.errors import UserError
from llmkit.templates import end_of_turn_token as end_of_turn_token  # one rule, re-exported
from llmkit.templates import (  # every template failure is one line
    generation_spans,
    has_generation_markers,
    render_chat,
)
from llmkit.templates import special_token_texts as _special_strings

#: Roles a message may have.
ROLES = ("system", "user", "assistant")
#: The record formats :func:`conversation_from_record` reads, by name.
CHAT_FORMATS = ("messages", "sharegpt", "prompt-response", "alpaca")
_RESPONSE_KEYS = ("response", "completion")


# ---------------------------------------------------------------------------------------------
# Records to conversations.


#: ShareGPT's speakers (the ``from`` of a turn) and the roles they become. Only these three:
#: ShareGPT dumps also hold ``bing``, ``chatgpt``, ``tool``, ``function_call``... whose meaning
#: varies from set to set, so they are refused rather than guessed.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def detect_chat_format(record: Any) -> str | None:
    """The chat format of a record: ``"messages"``, ``"sharegpt"``, ``"prompt-response"``,
    ``"alpaca"``, or None.

    Only the presence of the keys is looked at (``messages``; ``conversations``; ``prompt``;
    ``instruction``), in that order of precedence; :func:`conversation_from_record` checks the
    values.
    """
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record:
        return "prompt-response"
    if "instruction" in record:
        return "alpaca"
    return None


def _text(record: dict, key: str, where: str, *, required: bool = True) -> str | None:
    """``record[key]`` as a non-blank string (None when absent and not required)."""
    if key not in record or record[key] is None:
        if required:
            fields = ", ".join(sorted(record)[:8]) or "none"
            raise UserError(
                f"{where}: no field {key!r} (fields: {fields})",
                "a chat record needs messages, conversations, prompt/response or "
                "instruction/output",
                reason="missing field",
            )
        return None
    value = record[key]
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field {key!r} is {type(value).__name__}, not a string",
            reason="bad chat record",
        )
    if required and not value.strip():
        raise UserError(
            f"{where}: field {key!r} is empty", "every turn needs some text", reason="empty text"
        )
    return value


def _with_system(record: dict, where: str, prompt: str, answer: str) -> list[dict[str, str]]:
    system = _text(record, "system", where, required=False)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return [
        *messages,
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]


def _check_messages(messages: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise UserError(
            f"{where}: field {field!r} is {type(messages).__name__}, not a list",
            'expected "messages": [{"role": "user", "content": "..."}, ...]'
            if field == "messages"
            else 'expected "conversations": [{"from": "human", "value": "..."}, ...]',
            reason="bad chat record",
        )
    if not messages:
        raise UserError(
            f"{where}: field {field!r} is empty",
            "a conversation needs messages",
            reason="empty text",
        )
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(
                f"{where}: message {i} is {type(message).__name__}, not an object",
                'each message is {"role": ..., "content": ...}',
                reason="bad chat record",
            )
        role = message.get("role")
        if role not in ROLES:
            what = "has no 'role'" if role is None else f"has role {role!r}"
            raise UserError(
                f"{where}: message {i} {what}", f"roles are {', '.join(ROLES)}", reason="bad role"
            )
        content = message.get("content")
        if not isinstance(content, str):
            what = "no 'content'" if content is None else f"content {type(content).__name__}"
            raise UserError(
                f"{where}: message {i} ({role}) has {what}, not a string",
                "content must be plain text",
                reason="bad chat record",
            )
        if not content.strip():
            raise UserError(
                f"{where}: message {i} ({role}) is empty",
                "every turn needs text",
                reason="empty text",
            )
        if role == "system" and i != 0:
            raise UserError(
                f"{where}: message {i} is a system message after the first message",
                "a system message may only come first",
                reason="bad turn order",
            )
        out.append({"role": role, "content": content})
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise UserError(
            f"{where}: the conversation does not start with a user message",
            "after an optional system message, the user speaks first",
            reason="bad turn order",
        )
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(
            f"{where}: no assistant message (nothing to learn from)",
            "each conversation needs at least one assistant answer",
            reason="no assistant message",
        )
    return out


def _from_messages(record: dict, where: str) -> list[dict[str, str]]:
    """``messages``: already ``{"role", "content"}`` turns."""
    return _check_messages(record["messages"], where)


def _from_sharegpt(record: dict, where: str) -> list[dict[str, str]]:
    """ShareGPT: ``conversations`` of ``{"from", "value"}`` turns, speakers mapped by
    :data:`SHAREGPT_ROLES`."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        return _check_messages(turns, where, "conversations")  # raises: not a list
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(
                f"{where}: conversations[{i}] is {type(turn).__name__}, not an object",
                'each ShareGPT turn is {"from": ..., "value": ...}',
                reason="bad chat record",
            )
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            what = "has no 'from' role" if speaker is None else f"has the unknown role {speaker!r}"
            raise UserError(
                f"{where}: conversations[{i}] {what}",
                f"ShareGPT roles are {', '.join(SHAREGPT_ROLES)} (as user, assistant, system)",
                reason="bad role",
            )
        value = turn.get("value")
        if not isinstance(value, str):
            what = "no 'value'" if value is None else f"a value of type {type(value).__name__}"
            raise UserError(
                f"{where}: conversations[{i}] ({speaker}) has {what}, not a string",
                "value must be plain text",
                reason="bad chat record",
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return _check_messages(messages, where, "conversations")


def _from_prompt_response(record: dict, where: str) -> list[dict[str, str]]:
    """``prompt`` and ``response`` (or ``completion``), optional ``system``."""
    prompt = _text(record, "prompt", where)
    key = next((k for k in _RESPONSE_KEYS if k in record), "response")
    return _with_system(record, where, prompt, _text(record, key, where))


def _from_alpaca(record: dict, where: str) -> list[dict[str, str]]:
    """Alpaca: the instruction, then a blank line and the input when there is one."""
    instruction = _text(record, "instruction", where)
    extra = _text(record, "input", where, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return _with_system(record, where, prompt, _text(record, "output", where))


#: One transform per record format (:data:`CHAT_FORMATS`): ``(record, where) -> messages``.
RECORD_TRANSFORMS: dict[str, Callable[[dict, str], list[dict[str, str]]]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt-response": _from_prompt_response,
    "alpaca": _from_alpaca,
}


def conversation_from_record(record: Any, *, where: str) -> list[dict[str, str]]:
    """The conversation held by one JSON record, as ``[{"role", "content"}, ...]``.

    Formats (see :func:`detect_chat_format`; other fields of the record are ignored):

    - ``messages``: a list of ``{"role", "content"}`` objects, roles ``system``, ``user`` and
      ``assistant``; a system message only first; the first other message is the user's; at
      least one assistant message. Other keys of a message (``name``...) are dropped.
    - ShareGPT: ``conversations``, a list of ``{"from", "value"}`` objects; ``from`` is
      ``human`` (user), ``gpt`` (assistant) or ``system``, any other is refused
      (:data:`SHAREGPT_ROLES`); then as ``messages``. The format of the Vicuna training set
      (lm-sys/FastChat, ``fastchat/data``), read by axolotl and LLaMA-Factory.
    - ``prompt`` and ``response`` (or ``completion``), optional ``system``: one exchange.
    - Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system``: the prompt
      is the instruction, followed by a blank line and the input when the input is not empty.

    Texts are kept as they are (no stripping); every text must be a non-blank string.

    Args:
        record: the parsed JSON value of one line.
        where: the record's place, ``file:line``, put at the start of every error message.

    Returns:
        New message dicts with exactly the keys ``role`` and ``content``.

    Raises:
        UserError: one line naming ``where`` and what is wrong: not an object, none of the
            formats, a field missing, not a string or blank, an unknown role (a ShareGPT
            ``from`` other than human, gpt, system), a system message after the first, no
            user message first, no assistant message.
    """
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object, found {type(record).__name__}",
            "each line must be one JSON object",
            reason="not an object",
        )
    kind = detect_chat_format(record)
    if kind is None:
        fields = ", ".join(sorted(record)[:8]) or "none"
        raise UserError(
            f"{where}: not a chat record (fields: {fields})",
            "expected messages, conversations (ShareGPT), prompt/response or "
            "instruction/input/output",
            reason="not a chat record",
        )
    return RECORD_TRANSFORMS[kind](record, where)


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    """A plain-text form of a conversation, ``role: content`` per message, blank-line separated.

    For the document stages that look at text as a whole — exact and near-duplicate detection,
    length and quality filters — so that they treat a conversation like a document. Not what
    the model sees (that is the chat template's rendering).
    """
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def map_contents(
    messages: Sequence[dict[str, str]], fn: Callable[[str], str]
) -> list[dict[str, str]]:
    """The conversation with ``fn`` applied to every message's content (roles unchanged).

    For the per-text stages: Unicode normalization, PII redaction.
    """
    return [{"role": m["role"], "content": fn(m["content"])} for m in messages]


# ---------------------------------------------------------------------------------------------
# Chat templates.


@dataclass(frozen=True)
class ChatTemplate:
    """A named default chat template.

    Attributes:
        name: the name :func:`ensure_chat_template` takes.
        template: the Jinja template, in the form of ``tokenizer.chat_template``.
        special_tokens: the marker tokens the template writes, added to a tokenizer that lacks
            them.
        end_of_turn: the token that ends every turn (the stop token when generating).
    """

    name: str
    template: str
    special_tokens: tuple[str, ...]
    end_of_turn: str


#: ChatML, the format of OpenAI's Chat Markup Language as used by Qwen and SmolLM2:
#: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, generation prompt
#: ``<|im_start|>assistant\n``; no BOS.
CHATML = ChatTemplate(
    name="chatml",
    template=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
)
CHAT_TEMPLATES: dict[str, ChatTemplate] = {CHATML.name: CHATML}
#: ``ensure_chat_template``'s answer when the tokenizer's own template is kept.
OWN_TEMPLATE = "tokenizer"


def ensure_chat_template(tokenizer: Any, name: str | None = None) -> str:
    """Give ``tokenizer`` a chat template; return which one it uses.

    ``name`` None (or ``"auto"``) keeps the tokenizer's own ``chat_template`` when it has one
    (an instruct model's) and installs ChatML otherwise. ``"tokenizer"`` requires the own one.
    A name from :data:`CHAT_TEMPLATES` (``"chatml"``) installs that template even over an own
    one.

    Installing a template adds its marker tokens (``<|im_start|>``, ``<|im_end|>``) as special
    tokens when the vocabulary lacks them: **the vocabulary then grows** (``len(tokenizer)``),
    and a pretrained model's embeddings must be resized to match
    (``model.resize_token_embeddings(len(tokenizer))``) before training; the new rows start
    untrained. A tokenizer trained by llmkit can hold them from the start
    (:func:`llmkit.core.tokenizer.train_bpe_tokenizer` with ``extra_special_tokens=
    CHATML.special_tokens``), and then nothing is added.

    Modifies ``tokenizer`` in place (its ``chat_template``, its added tokens); saved with it by
    ``save_pretrained``.

    Returns:
        ``"tokenizer"`` (own template kept) or the installed template's name (``"chatml"``).

    Raises:
        UserError: an unknown name, or ``"tokenizer"`` for a tokenizer without a template.
    """
    own = getattr(tokenizer, "chat_template", None)
    if name in (None, "auto"):
        if own:
            return OWN_TEMPLATE
        name = CHATML.name
    if name == OWN_TEMPLATE:
        if not own:
            raise UserError(
                "the tokenizer has no chat template of its own",
                f"use --chat-template {' or '.join(CHAT_TEMPLATES)} (or auto)",
            )
        return OWN_TEMPLATE
    if name not in CHAT_TEMPLATES:
        choices = ", ".join(["auto", OWN_TEMPLATE, *CHAT_TEMPLATES])
        raise UserError(f"unknown chat template {name!r}", f"choose one of {choices}")
    spec = CHAT_TEMPLATES[name]
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    missing = [t for t in spec.special_tokens if t not in added]
    if missing:  # grows the vocabulary only by the tokens it does not hold at all
        tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
    tokenizer.chat_template = spec.template
    return spec.name


# ---------------------------------------------------------------------------------------------
# Rendering with labels.


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool, where: str) -> str:
    return render_chat(tokenizer, messages, add_generation_prompt=generation, where=where)


def _control_pattern(tokenizer: Any) -> re.Pattern | None:
    """One regex matching any of the tokenizer's special tokens as text (None when it has none)."""
    specials = _special_strings(tokenizer)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _check_no_control_tokens(pattern: re.Pattern | None, messages: Sequence[dict], where: str):
    if pattern is None:
        return
    for i, message in enumerate(messages):
        found = pattern.search(message["content"])
        if found:
            raise UserError(
                f"{where}: message {i} ({message['role']}) contains the special token "
                f"{found.group()!r}",
                "remove it from the text: the tokenizer would read it as a chat marker",
                reason="special token in text",
            )


#: How :func:`answer_spans` found each trained answer, by name: the keys of the manifest's
#: ``answers_located`` count (see :func:`answer_spans`). ``not_trained`` counts the earlier
#: answers a template rewrites once a later turn follows and that could not be found.
LOCATE_RULES = (
    "generation_markers",
    "prefix",
    "common_prefix",
    "prompt_text",
    "in_rendering",
    "not_trained",
)


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _locate_answer(
    tokenizer: Any, messages: list[dict[str, str]], i: int, text: str, cursor: int, where: str
) -> tuple[tuple[int, int] | None, str]:
    """Assistant message ``i``'s span in ``text`` (the whole conversation rendered) and the
    rule that found it (:func:`answer_spans`); ``(None, why)`` when it cannot be located.

    Raises:
        UserError: the template does not write the answer even when it is the latest turn, or
            its generation prompt opens the turn with another header than the rendered answer.
    """
    content = messages[i]["content"].strip()
    before = _render(tokenizer, messages[:i], True, where)  # what generation starts from
    through = _render(tokenizer, messages[: i + 1], False, where)  # answer i as the latest turn
    stop = len(through.rstrip())
    start = _common_prefix(before, through)
    rule = "prefix" if start == len(before) else "common_prefix"
    if rule != "prefix":
        context = _render(tokenizer, messages[:i], False, where)
        if before.startswith(context) and start < len(context):
            # The turns before answer i render differently once it follows (Qwen3 writes an
            # answer's think block only while it is the latest): the answer starts after the
            # last copy of the generation prompt's text (less trailing whitespace) before it.
            prompt = before[len(context) :]
            last = through.rfind(content, 0, stop)
            ends = [
                found + len(opening)
                for opening in (prompt, prompt.rstrip())
                if opening.strip() and (found := through.rfind(opening, 0, max(last, 0))) >= 0
            ]
            if last < 0 or not ends:
                return None, (
                    "renders the turns before it differently once it follows and does not write "
                    "its generation prompt before it"
                )
            start, rule = ends[0], "prompt_text"
    answer = through[start:stop]
    if content not in answer:
        raise UserError(
            f"{where}: the chat template does not write assistant message {i} after its "
            "generation prompt (it drops or rewrites the answer), so the answer cannot be located",
            "use a template that writes the assistant's text, or --chat-template chatml",
            reason="template inconsistent",
        )
    if rule == "common_prefix" and not answer.lstrip().startswith(content):
        raise UserError(
            f"{where}: the chat template's generation prompt ends {before[start:]!r} where its "
            f"rendered answer {i} has {answer[: answer.find(content)]!r}, so the answer cannot "
            "be located",
            "use a template whose generation prompt opens the assistant's turn as it is "
            "rendered, or --chat-template chatml",
            reason="template inconsistent",
        )
    if start >= cursor and text.startswith(through[:stop]):  # rendered stably
        return (start, stop), rule
    # Rendered differently once later turns follow (Qwen3 drops the think block of answers
    # before the last user turn), after the same context: the longest ending of the answer, from
    # a line start, that the whole rendering has there (the template dropped a leading part);
    # else the answer's text found there, extended through the end-of-turn text after it.
    if start < cursor or not text.startswith(through[:start]):
        return None, "renders the turns before it differently once later turns follow"
    tail = answer[answer.rfind(content) + len(content) :].strip()  # e.g. "<|im_end|>"
    line_starts = [0] + [k + 1 for k, char in enumerate(answer) if char == "\n"]
    for k in line_starts:
        piece = answer[k:]
        if piece.strip() != tail and text.startswith(piece, start):
            return (start, start + len(piece)), "in_rendering"
    found = text.find(content, start)
    gap = text[start:found]
    if found < 0 or (tail in gap if tail else gap.strip()):
        return None, "renders it differently once later turns follow and its text is not there"
    end = found + len(content)
    rest = text[end:]
    if tail and rest.lstrip().startswith(tail):
        end += len(rest) - len(rest.lstrip()) + len(tail)
    return (start, end), "in_rendering"


def answer_spans(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    train_on: str = "assistant",
    where: str = "conversation",
    _control: re.Pattern | None | bool = True,
    located: dict[str, int] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that are trained on.

    For ``train_on="all"``, one span over the whole text. For ``train_on="assistant"``, one
    span per assistant answer, found by the first of these rules that applies (its name is
    counted in ``located``; :data:`LOCATE_RULES`):

    - ``generation_markers``: the template marks the assistant's text with
      ``{% generation %}...{% endgeneration %}`` — its own mask, as transformers'
      ``return_assistant_tokens_mask`` uses it (:func:`llmkit.templates.generation_spans`), taken
      as the template writes it (each span exactly; a template whose blocks leave out the
      end-of-turn token trains no end-of-turn).
    - ``prefix``: ``render(messages[:i], add_generation_prompt=True)`` is a prefix of
      ``render(messages[:i+1])``, itself a prefix of the whole rendering; the span runs from the
      end of the first to the end of the second less trailing whitespace — the answer and the
      end-of-turn marker after it (``<|im_end|>``), no role marker, generation prompt or
      trailing newline. The rule of every template that renders turns the same whatever
      follows (ChatML, Llama 3...); earlier llmkit versions accepted only this one.
    - ``common_prefix``: the generation prompt adds something the rendered answer does not
      repeat — a blank line (``<|im_start|>assistant\n\n``) or an opened think block
      (``<think>\n``): the span starts where the two renderings part, provided the rendered
      answer starts there with the message's text (after whitespace).
    - ``prompt_text``: the turns *before* answer ``i`` render differently once it follows
      (two answers in a row under Qwen3: the first loses its think block): the span starts
      after the last copy of the generation prompt's text (or that text less trailing
      whitespace) before the answer.
    - ``in_rendering``: the template renders answer ``i`` differently once a later turn
      exists (Qwen3 writes a think block only for answers after the last user message, and
      drops the reasoning of earlier ones): the context before the answer is the same, so the
      span starts there and holds the longest ending of the answer as rendered when latest,
      from a line start, that the whole rendering has there (the template dropped a leading
      part); failing that, the answer's text found there, extended through the end-of-turn
      text the template writes after an answer (``<|im_end|>``) when it follows. This trains
      what the whole rendering holds at that place — the earlier answer without its think
      block, as the template's ``{% generation %}`` mask of Qwen3 does.
    - ``not_trained``: an earlier answer that cannot be found in the whole rendering (a
      template that rewrites it, e.g. to ``...``) is left out and counted; the final answer
      never is: a conversation whose final answer cannot be located is refused.

    Why this order and not one rule: the prefix rule is exact (the spans are what a model
    continuing the generation prompt would write) and is kept where it applies, so templates
    that worked before give the same labels; the others relax only the two shapes popular
    templates have (a generation prompt that is not the rendered answer's start; earlier turns
    rewritten) and train what the template actually renders at each place, as its own
    ``{% generation %}`` mask would. Rendering the prefixes is the method of allenai/open-
    instruct (``open_instruct/finetune.py``, ``encode_with_messages_format``). Locating each
    answer's text in the full rendering alone was not chosen as the main rule: it cannot tell
    the role header from the answer (a think block the model writes, or not) nor an answer's
    text from the same text elsewhere, which the rendered prefixes settle. Cost: two renders
    per answer (three where the generation prompt is not a prefix).

    Args:
        tokenizer: a tokenizer with a chat template (:func:`ensure_chat_template`).
        messages: a conversation from :func:`conversation_from_record`.
        train_on: ``"assistant"`` or ``"all"``.
        where: the conversation's place (``file:line``), for error messages.
        _control: internal: the control-token pattern, computed once per batch by
            :func:`render_batch_with_labels`.
        located: a dict to count the rule of each answer into (keys from
            :data:`LOCATE_RULES`); None: not counted.

    Returns:
        ``(text, spans)``: the full rendering (``add_generation_prompt=False``) and a list of
        ``(start, end)`` character offsets into it, in order, not overlapping.

    Raises:
        UserError: no chat template; ``train_on`` unknown; a message contains one of the
            tokenizer's special tokens as text; the template raises on the conversation; an
            assistant message comes first; or an answer truly cannot be located, named by the
            template's feature: the template does not write the answer's text when it is the
            latest turn, its generation prompt opens the turn with another header than the
            rendered answer, or the final answer is rendered differently than when it is the
            latest turn and its text is not in the whole rendering.
    """
    if train_on not in TRAIN_ON:
        raise UserError(f"train_on {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template",
            "give it one with ensure_chat_template (the chatml default) or use an instruct model",
        )
    messages = list(messages)
    pattern = _control_pattern(tokenizer) if _control is True else _control
    _check_no_control_tokens(pattern, messages, where)
    text = _render(tokenizer, messages, False, where)
    if train_on == "all":
        return text, [(0, len(text))]
    if messages and messages[0]["role"] == "assistant":
        raise UserError(
            f"{where}: the conversation starts with an assistant message",
            "the user speaks first",
            reason="assistant first",
        )
    counts: dict[str, int] = {}
    spans: list[tuple[int, int]] = []
    if has_generation_markers(tokenizer):
        _, marked = generation_spans(tokenizer, messages, where=where)
        spans = [(s, e) for s, e in marked if e > s]
        counts["generation_markers"] = len(spans)
    if not spans:
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in answers:
            span, rule = _locate_answer(
                tokenizer, messages, i, text, spans[-1][1] if spans else 0, where
            )
            if span is None:
                if i == answers[-1]:
                    raise UserError(
                        f"{where}: the chat template {rule}, so the final assistant message {i} "
                        "cannot be located",
                        "end the conversation with the assistant's answer, or use "
                        "--chat-template chatml",
                        reason="template inconsistent",
                    )
                rule = "not_trained"
            else:
                spans.append(span)
            counts[rule] = counts.get(rule, 0) + 1
    if located is not None:
        for rule, n in counts.items():
            located[rule] = located.get(rule, 0) + n
    return text, spans


def labels_from_offsets(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Labels for tokenized text: the token id where a token overlaps a span, else -100.

    A token overlaps span ``(s, e)`` when ``token_start < e`` and ``token_end > s`` (a token
    that straddles a span's edge, such as `` Hello`` after ``Answer:``, is a target: it holds
    answer text). Both lists are in order, so one pass suffices.

    Args:
        input_ids: the token ids, length T.
        offsets: ``(start, end)`` character offsets of each token (T of them).
        spans: ``(start, end)`` character spans, sorted and disjoint.

    Returns:
        T labels.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    k = 0
    for j, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0] and start < spans[k][1]:
            labels[j] = int(input_ids[j])
    return labels


def tokenize_with_labels(
    tokenizer: Any, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize rendered conversations in one batched call and label the tokens in ``spans``.

    The second half of :func:`render_batch_with_labels`, for a caller that runs
    :func:`answer_spans` itself, one conversation at a time, to skip the ones that fail
    (``--on-error skip``) and still tokenize in batches.

    Args:
        texts: N rendered conversations (``answer_spans(...)[0]``).
        spans: N lists of character spans (``answer_spans(...)[1]``).

    Returns:
        ``(input_ids, labels)``: N lists of token ids (``add_special_tokens=False``, as
        ``apply_chat_template`` tokenizes) and N lists of labels (:func:`labels_from_offsets`).

    Raises:
        UserError: a slow tokenizer (no character offsets).
    """
    if not texts:
        return [], []
    try:
        enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:  # a slow (Python) tokenizer has no offsets
        raise UserError(
            "chat data needs a fast tokenizer (one with character offsets)",
            "use a tokenizer that has a tokenizer.json",
        ) from err
    ids = [list(map(int, row)) for row in enc["input_ids"]]
    labels = [
        labels_from_offsets(row, offsets, row_spans)
        for row, offsets, row_spans in zip(ids, enc["offset_mapping"], spans, strict=True)
    ]
    return ids, labels


def render_batch_with_labels(
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    train_on: str = "assistant",
    wheres: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """:func:`render_with_labels` for many conversations, tokenized in one batched call.

    Args:
        conversations: N conversations.
        train_on: ``"assistant"`` or ``"all"``.
        wheres: N places (``file:line``) for error messages; default ``conversation K``.

    Returns:
        ``(input_ids, labels)``: two lists of N lists of ints, pairwise of equal length.

    Raises:
        UserError: see :func:`answer_spans` (the first conversation that fails stops the
            batch); a slow tokenizer.
    """
    if wheres is None:
        wheres = [f"conversation {k}" for k in range(len(conversations))]
    pattern = _control_pattern(tokenizer)
    rendered = [
        answer_spans(tokenizer, c, train_on=train_on, where=w, _control=pattern)
        for c, w in zip(conversations, wheres, strict=True)
    ]
    return tokenize_with_labels(
        tokenizer, [text for text, _ in rendered], [spans for _, spans in rendered]
    )


def render_with_labels(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    train_on: str = "assistant",
    where: str = "conversation",
) -> tuple[list[int], list[int]]:
    """A conversation as token ids and labels for supervised fine-tuning.

    The ids are those of ``tokenizer.apply_chat_template(messages, tokenize=True)``: the
    template's text tokenized with ``add_special_tokens=False``, since a template writes its
    own BOS when the model wants one (no double BOS). The labels are ``-100`` on every token
    that is not part of an assistant answer — system and user text, role markers, the
    generation prompt, newlines between turns — and equal the token id on each answer's tokens
    and on the end-of-turn token after it (ChatML's ``<|im_end|>``), found by
    :func:`answer_spans` and :func:`labels_from_offsets`. ``train_on="all"`` labels every
    token with its id.

    Labels are not shifted: ``labels[t]`` is the target of position ``t-1``
    (``llmkit.core.scoring.split_batch`` shifts).

    Args:
        tokenizer: a fast tokenizer with a chat template (:func:`ensure_chat_template`).
        messages: a conversation from :func:`conversation_from_record`.
        train_on: ``"assistant"`` or ``"all"``.
        where: the conversation's place (``file:line``), for error messages.

    Returns:
        ``(input_ids, labels)``: two lists of T ints.

    Raises:
        UserError: see :func:`answer_spans`; a slow tokenizer (no character offsets).
    """
    ids, labels = render_batch_with_labels(tokenizer, [messages], train_on=train_on, wheres=[where])
    return ids[0], labels[0]


# ---------------------------------------------------------------------------------------------
# Feeding packed rows to a model.


def packed_attention_mask(position_ids, dtype=None):
    """A 4D attention mask that keeps each packed conversation to itself.

    How to feed a packed row (verified for ``LlamaForCausalLM`` and ``GPT2LMHeadModel``, sdpa
    and eager attention, transformers 5.24, in ``tests/data/test_sft.py``):

    - **preferred**: ``model(input_ids=x, position_ids=p, attention_mask=None,
      use_cache=False)``, ``p`` sliced like the inputs (``position_ids[:, :-1]`` for inputs
      ``input_ids[:, :-1]``). transformers then finds the conversations from the restarts of
      ``position_ids`` (``masking_utils.find_packed_sequence_indices``, row by row, any batch
      size) and builds a block-diagonal causal mask. ``use_cache=False`` is required: by
      default (``config.use_cache=True``) the model creates an empty cache, and transformers
      only looks for packed sequences when there is no cache — the conversations would then
      see each other. A 2D ``attention_mask`` (even all ones) also turns the detection off.
      ``flash_attention_2`` reads the restarts only for a batch of one row
      (``modeling_flash_attention_utils._is_packed_sequence``): with it, flatten a
      micro-batch to shape (1, B*T) first.
    - **fallback**, for a model without that detection: ``model(input_ids=x,
      position_ids=p, attention_mask=packed_attention_mask(p, dtype=model.dtype))`` — a 4D
      mask is used as given.

    Args:
        position_ids: (B, T) integer tensor; a new conversation starts wherever a position is
            not the previous one plus 1 (transformers' rule).
        dtype: None for a boolean mask (True = may attend; for sdpa), or a floating dtype for
            an additive mask (0 = may attend, the dtype's minimum = may not; eager attention
            needs this form, in the model's dtype).

    Returns:
        (B, 1, T, T) tensor: query t may attend to key s when ``s <= t`` and both are in the
        same conversation.
    """
    import torch

    start = position_ids[:, :1] - 1
    segment = (torch.diff(position_ids, prepend=start, dim=-1) != 1).cumsum(-1)  # (B, T)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    allowed = allowed[:, None]  # (B, 1, T, T)
    if dtype is None or dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
