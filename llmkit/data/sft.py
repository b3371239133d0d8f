"""Chat and instruction data for supervised fine-tuning (SPEC §2 "Chat and instruction data").

From a JSON record to the training tensors, in four pure steps:

1. :func:`conversation_from_record`: a record in one of three formats becomes a list of
   ``{"role", "content"}`` messages — ``messages`` (the OpenAI / Hugging Face chat format),
   ``prompt``/``response`` (or ``prompt``/``completion``), or Alpaca's
   ``instruction``/``input``/``output`` (Taori et al. 2023, Stanford Alpaca, ``alpaca_data.json``);
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

Finding the answers works for any template, without ``{% generation %}`` markers: the character
span of assistant turn ``i`` runs from the end of the conversation before it rendered with
``add_generation_prompt=True`` to the end of the conversation through it, less trailing
whitespace; tokens overlapping a span (by the tokenizer's character offsets) are the answer's.
Rendering the prefixes ``messages[:i]`` (with the generation prompt before an assistant turn)
is the method of allenai/open-instruct (``open_instruct/finetune.py``,
``encode_with_messages_format``), which counts the prefixes' tokens; mapping character spans to
tokens by offsets instead is the rule of transformers' ``return_assistant_tokens_mask``
(``tokenization_utils_base.py``, ``apply_chat_template``), and stays right when a token
straddles a turn's edge.
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
from llmkit.templates import render_chat  # every template failure is one line
from llmkit.templates import special_token_texts as _special_strings

#: Roles a message may have.
ROLES = ("system", "user", "assistant")
#: The record formats :func:`conversation_from_record` reads, by name.
CHAT_FORMATS = ("messages", "prompt-response", "alpaca")
_RESPONSE_KEYS = ("response", "completion")


# ---------------------------------------------------------------------------------------------
# Records to conversations.


def detect_chat_format(record: Any) -> str | None:
    """The chat format of a record: ``"messages"``, ``"prompt-response"``, ``"alpaca"``, or None.

    Only the presence of the keys is looked at (``messages``; ``prompt``; ``instruction``), in
    that order of precedence; :func:`conversation_from_record` checks the values.
    """
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
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
                "a chat record needs messages, prompt/response or instruction/output",
            )
        return None
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} is {type(value).__name__}, not a string")
    if required and not value.strip():
        raise UserError(f"{where}: field {key!r} is empty", "every turn needs some text")
    return value


def _with_system(record: dict, where: str, prompt: str, answer: str) -> list[dict[str, str]]:
    system = _text(record, "system", where, required=False)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return [
        *messages,
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise UserError(
            f"{where}: field 'messages' is {type(messages).__name__}, not a list",
            'expected "messages": [{"role": "user", "content": "..."}, ...]',
        )
    if not messages:
        raise UserError(f"{where}: field 'messages' is empty", "a conversation needs messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(
                f"{where}: message {i} is {type(message).__name__}, not an object",
                'each message is {"role": ..., "content": ...}',
            )
        role = message.get("role")
        if role not in ROLES:
            what = "has no 'role'" if role is None else f"has role {role!r}"
            raise UserError(f"{where}: message {i} {what}", f"roles are {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            what = "no 'content'" if content is None else f"content {type(content).__name__}"
            raise UserError(
                f"{where}: message {i} ({role}) has {what}, not a string",
                "content must be plain text",
            )
        if not content.strip():
            raise UserError(f"{where}: message {i} ({role}) is empty", "every turn needs text")
        if role == "system" and i != 0:
            raise UserError(
                f"{where}: message {i} is a system message after the first message",
                "a system message may only come first",
            )
        out.append({"role": role, "content": content})
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise UserError(
            f"{where}: the conversation does not start with a user message",
            "after an optional system message, the user speaks first",
        )
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(
            f"{where}: no assistant message (nothing to learn from)",
            "each conversation needs at least one assistant answer",
        )
    return out


def conversation_from_record(record: Any, *, where: str) -> list[dict[str, str]]:
    """The conversation held by one JSON record, as ``[{"role", "content"}, ...]``.

    Formats (see :func:`detect_chat_format`; other fields of the record are ignored):

    - ``messages``: a list of ``{"role", "content"}`` objects, roles ``system``, ``user`` and
      ``assistant``; a system message only first; the first other message is the user's; at
      least one assistant message. Other keys of a message (``name``...) are dropped.
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
            formats, a field missing, not a string or blank, an unknown role, a system
            message after the first, no user message first, no assistant message.
    """
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object, found {type(record).__name__}",
            "each line must be one JSON object",
        )
    kind = detect_chat_format(record)
    if kind == "messages":
        return _check_messages(record["messages"], where)
    if kind == "prompt-response":
        prompt = _text(record, "prompt", where)
        key = next((k for k in _RESPONSE_KEYS if k in record), "response")
        return _with_system(record, where, prompt, _text(record, key, where))
    if kind == "alpaca":
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return _with_system(record, where, prompt, _text(record, "output", where))
    fields = ", ".join(sorted(record)[:8]) or "none"
    raise UserError(
        f"{where}: not a chat record (fields: {fields})",
        "expected messages, prompt/response or instruction/input/output",
    )


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
            )


def answer_spans(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    train_on: str = "assistant",
    where: str = "conversation",
    _control: re.Pattern | None | bool = True,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that are trained on.

    For ``train_on="assistant"``, one span per assistant message: from the end of
    ``render(messages[:i], add_generation_prompt=True)`` to the end of
    ``render(messages[:i+1])`` with trailing whitespace removed — the answer, the end-of-turn
    marker the template writes after it (``<|im_end|>``), and no role marker, generation
    prompt or trailing newline. For ``train_on="all"``, one span over the whole text.

    Args:
        tokenizer: a tokenizer with a chat template (:func:`ensure_chat_template`).
        messages: a conversation from :func:`conversation_from_record`.
        train_on: ``"assistant"`` or ``"all"``.
        where: the conversation's place (``file:line``), for error messages.
        _control: internal: the control-token pattern, computed once per batch by
            :func:`render_batch_with_labels`.

    Returns:
        ``(text, spans)``: the full rendering (``add_generation_prompt=False``) and a list of
        ``(start, end)`` character offsets into it, in order, not overlapping.

    Raises:
        UserError: no chat template; ``train_on`` unknown; a message contains one of the
            tokenizer's special tokens as text; the template raises on the conversation; an
            assistant message comes first; or the template does not render consistently (a
            rendered prefix is not a prefix of the full rendering, or an answer's text is not
            inside its span).
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
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise UserError(
                f"{where}: the conversation starts with an assistant message",
                "the user speaks first",
            )
        before = _render(tokenizer, messages[:i], True, where)
        through = _render(tokenizer, messages[: i + 1], False, where)
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError(
                f"{where}: the chat template does not render message {i} consistently (the "
                "conversation up to it, with the generation prompt, is not a prefix of the "
                "whole), so the answer cannot be located",
                "use a template that renders earlier turns the same whatever follows them, "
                "or --chat-template chatml",
            )
        start = len(before)
        end = start + len(through[start:].rstrip())
        if message["content"].strip() not in text[start:end]:
            raise UserError(
                f"{where}: the chat template does not write assistant message {i} after its "
                "generation prompt, so the answer cannot be located",
                "use another chat template (--chat-template chatml)",
            )
        spans.append((start, end))
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
    and eager attention, transformers 5.24, in ``tests/test_sft.py``):

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
