"""Text generation: prompts in, completions out, streamed to the terminal as they come (SPEC §4).

The pieces, from the outside in:

- :func:`generate` — the library call (``llmkit.generate``): prompts in, completion strings out.
- :func:`generate_completions` — loads the model once and returns :class:`Completion` records
  (text, new tokens, tokens/s); the CLI uses it.
- :func:`complete_batch` — a batch of prompts on an already loaded model: encode, check the
  context, left-pad, run ``model.generate`` once, cut each row at its own end, decode.
  :func:`complete` is the batch of one, streamed.
- :class:`GenerationSettings` (:mod:`llmkit.generation.settings`) — the decoding settings,
  validated on construction, turned into ``model.generate`` keyword arguments by
  :meth:`GenerationSettings.generate_kwargs`.
- :class:`TextStream` — a transformers streamer that writes the decoded continuation to a file.

Batches are padded on the left with an attention mask, so the last real token of every row sits
at the same place and each row's positions count from its own first token (transformers derives
``position_ids`` from the mask): each output equals that prompt's output alone. A batched sequence
ends at the first of its own EOS ids (all of the tokenizer's and of ``generation_config``'s, which
may be a list), its first stop string, or ``max_new_tokens`` new tokens; after it ends
``model.generate`` fills its row with padding, which is cut off here.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from llmkit.core.loading import (
    load_model_and_tokenizer,
    model_max_positions,
    silence_padding_warning,
)
from llmkit.errors import UserError
from llmkit.generation.settings import GenerationSettings  # defined there: no torch
from llmkit.runtime import announce_threads
from llmkit.templates import render_chat

# Decoding options shared by the streamer and the final text, so both give the same string.
# No clean-up of spaces: text already written to the terminal cannot be taken back.
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


@dataclass
class Completion:
    """One prompt's result."""

    prompt: str
    completion: str
    """The generated text, without the prompt and without special tokens."""
    new_tokens: int
    """Tokens generated, an EOS included, padding after the end not."""
    seconds: float
    """Wall time of the ``model.generate`` call that made it (its whole batch; prompt
    processing included)."""
    finish_reason: str
    """``eos`` (the model ended the text), ``stop`` (a stop string; the completion ends before
    it) or ``length`` (``max_new_tokens`` reached)."""
    token_ids: list[int] = field(default_factory=list, repr=False)
    """The new token ids, up to the end of this sequence."""
    prompt_tokens: int = 0
    """Tokens of the prompt as fed to the model (chat template included)."""
    index: int = 0
    """Which of the ``num_return_sequences`` completions of this prompt (0-based)."""
    stop: str | None = None
    """The stop string that ended it, when ``finish_reason`` is ``stop``."""

    @property
    def tokens_per_sec(self) -> float:
        """New tokens of this completion per second of its batch's generation."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """The JSON record ``llmkit generate --json`` prints."""
        out = asdict(self)
        out.pop("token_ids")
        out["tokens_per_sec"] = round(self.tokens_per_sec, 2)
        out["seconds"] = round(self.seconds, 4)
        return out


def decode_continuation(tokenizer: Any, context_ids: list[int], new_ids: list[int]) -> str:
    """The text of ``new_ids`` as it reads after ``context_ids``.

    Decoding the new ids together with the last context token keeps a leading space that a
    SentencePiece decoder drops at the start of a string ("is" + "▁Paris" → " Paris").

    Args:
        context_ids: token ids that precede (the prompt's last token is enough).
        new_ids: the generated ids.
    """
    ctx = list(context_ids[-1:])
    prefix = tokenizer.decode(ctx, **_DECODE)
    full = tokenizer.decode(ctx + list(new_ids), **_DECODE)
    if full.startswith(prefix):
        return full[len(prefix) :]
    return tokenizer.decode(list(new_ids), **_DECODE)


def find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in ``text``: ``(index, stop)``, or None. At equal index the
    longest stop string wins."""
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(stop) > len(best[1]))):
            best = (i, stop)
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class TextStream(BaseStreamer):
    """A ``model.generate`` streamer that writes the continuation to ``out`` as tokens arrive.

    The first ``put`` (the prompt, shape (1, T)) is skipped: the caller writes the prompt.
    Text that may still change is held back: a trailing U+FFFD (the first bytes of a UTF-8
    character split across tokens), and with ``stop`` strings any ending that may be the start
    of one; once a stop string appears, nothing from it on is written. Without stop strings the
    decoding restarts from the last token after a newline or every 16 tokens (when nothing is
    held back), so the cost per token stays flat however long the text.

    Args:
        tokenizer: decodes ids.
        out: a text file (``sys.stdout``); flushed after each write.
        context_ids: the prompt's ids (the last one is kept as decoding context).
        stop: stop strings (see :class:`GenerationSettings`).
    """

    def __init__(
        self, tokenizer: Any, out: TextIO, context_ids: list[int], stop: list[str] | None = None
    ):
        self.tokenizer = tokenizer
        self.out = out
        self.context = list(context_ids[-1:])
        self.stops = list(stop or [])
        self.pending: list[int] = []
        self.written = 0  # characters of decode_continuation(context, pending) already written
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        """Receive token ids: (1, T) for the prompt, then (1,) per generated token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.pending.extend(value.reshape(-1).tolist())
        text = decode_continuation(self.tokenizer, self.context, self.pending)
        found = find_stop(text, self.stops)
        if found is not None:
            self._write(text[self.written : found[0]])
            self.written, self.stopped = found[0], True
            return
        ready = text.rstrip("\ufffd")
        ready = ready[: len(ready) - _held_back(ready, self.stops)]
        self._write(ready[self.written :])
        self.written = len(ready)
        settled = len(ready) == len(text)  # nothing held back
        if not self.stops and settled and (ready.endswith("\n") or len(self.pending) >= 16):
            self.context, self.pending, self.written = self.pending[-1:], [], 0

    def end(self) -> None:
        """Write whatever was held back (up to a stop string)."""
        if not self.stopped:
            text = decode_continuation(self.tokenizer, self.context, self.pending)
            self._write(text[self.written :])
        self.context, self.pending, self.written = [], [], 0
        self.prompt_seen = self.stopped = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


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


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """``[system?, user]`` messages for one prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


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


_PROBE = "llmkit end-of-turn probe"


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (EOS, BOS, PAD...) and every added
    token marked special (chat markers such as ``<|im_end|>`` are usually only the latter)."""
    found = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for tid, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            found.add(int(tid))
    return found


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The chat template's end-of-turn token, when the template uses one: ``[id]`` or ``[]``.

    Found by rendering a user message and an assistant answer with the tokenizer's own
    ``chat_template`` and reading the first token after the answer: when it is a special token
    (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, Phi-3's
    ``<|end|>``), a model trained on such conversations ends its answers with it, whatever
    the config's ``eos_token_id`` says. No template, a template that fails on this
    conversation, or plain text after the answer: ``[]``.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    try:
        cached = _END_OF_TURN.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == template:
        return list(cached[1])
    found = _find_end_of_turn(tokenizer)
    try:
        _END_OF_TURN[tokenizer] = (template, found)
    except TypeError:
        pass
    return list(found)


# tokenizer -> (chat_template, end-of-turn ids): rendering the template costs ~1 ms a call
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _find_end_of_turn(tokenizer: Any) -> list[int]:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": _PROBE},
    ]
    try:
        text = render_chat(tokenizer, messages)
    except UserError:  # a template with rules of its own (roles, alternation): no guess
        return []
    if not isinstance(text, str) or _PROBE not in text:
        return []
    after = text[text.index(_PROBE) + len(_PROBE) :]
    ids = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after else []
    if ids and int(ids[0]) in _special_ids(tokenizer):
        return [int(ids[0])]
    return []


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a sequence, in this order, without repeats:
    ``generation_config.eos_token_id`` (an int or a list, as in Llama 3's
    ``[128001, 128008, 128009]``), the tokenizer's ``eos_token_id``, and the chat template's
    end-of-turn token (:func:`end_of_turn_ids`; ChatML's ``<|im_end|>``), so that a model
    fine-tuned on chat data stops at the end of its answer even when its config names another
    EOS."""
    found: list[int] = []
    for eos in (
        getattr(model.generation_config, "eos_token_id", None),
        tokenizer.eos_token_id,
        end_of_turn_ids(tokenizer),
    ):
        if eos is None:
            continue
        for e in eos if isinstance(eos, (list, tuple)) else [eos]:
            if int(e) not in found:
                found.append(int(e))
    return found


_eos_ids = eos_ids  # the name used before


class StopOnStrings(StoppingCriteria):
    """Ends each row of a batch as soon as its new text contains one of ``stops``.

    ``model.generate`` calls it after every step with ``input_ids`` of shape (B, T0 + t): the
    ``prompt_width`` prompt columns (left-padded), then t new tokens. Only rows not yet done are
    decoded; a done row stays done and ``generate`` pads it from then on.
    """

    def __init__(self, tokenizer: Any, stops: list[str], prompt_width: int, eos: list[int]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.width = prompt_width
        self.eos = set(eos)
        self.done: torch.Tensor | None = None  # (B,) bool

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        B = input_ids.shape[0]
        if self.done is None:
            self.done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.width :]  # (B, t)
        for row in range(B):
            if self.done[row]:
                continue
            ids = new[row].tolist()
            if ids and ids[-1] in self.eos:
                self.done[row] = True  # EOS: generate ends the row itself; no more decoding
                continue
            context = [int(input_ids[row, self.width - 1])]  # the prompt's last token
            text = decode_continuation(self.tokenizer, context, ids)
            if find_stop(text, self.stops) is not None:
                self.done[row] = True
        return self.done.clone()


def _finish(
    tokenizer: Any, prompt_ids: list[int], row: list[int], eos: set[int], stops: list[str]
) -> tuple[list[int], str, str, str | None]:
    """Cut one generated row at its end: ``(kept ids, text, finish_reason, stop string)``.

    The row ends at its first EOS (kept, and counted as a new token); a stop string inside the
    text before it ends it earlier, at the token that completed the stop string, and the text is
    cut just before the stop string. Whatever ``generate`` padded after the end is dropped.
    """
    end = next((i for i, t in enumerate(row) if t in eos), None)
    body = row if end is None else row[:end]
    if stops:
        text = decode_continuation(tokenizer, prompt_ids, body)
        found = find_stop(text, stops)
        if found is not None:
            # the fewest tokens whose text already holds a stop string (containment only grows)
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if find_stop(decode_continuation(tokenizer, prompt_ids, body[:mid]), stops):
                    hi = mid
                else:
                    lo = mid + 1
            return body[:lo], text[: found[0]], "stop", found[1]
    if end is None:
        return row, decode_continuation(tokenizer, prompt_ids, row), "length", None
    kept = row[: end + 1]
    return kept, decode_continuation(tokenizer, prompt_ids, body), "eos", None


def _labels(n: int) -> list[str]:
    """How errors name each of ``n`` prompts."""
    return ["the prompt"] if n == 1 else [f"prompt {i + 1}" for i in range(n)]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each (B, T) with T the longest row: each row padded on
    the left with ``pad_id``, the mask 0 on padding and 1 on tokens."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask


def complete_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    prompt_ids: list[list[int]] | None = None,
    streamer: BaseStreamer | None = None,
    labels: list[str] | None = None,
) -> list[Completion]:
    """Generate completions of a batch of prompts in one ``model.generate`` call.

    Args:
        model: a causal LM (``model.generate``), in eval mode.
        tokenizer: its tokenizer (a pad token set).
        prompts: the texts to continue (B of them); "" starts from BOS/EOS.
        settings: decoding settings.
        prompt_ids: the token ids to feed instead of encoding ``prompts`` (a chat template
            already applied); ``prompts`` is then what the records show.
        streamer: passed to ``model.generate`` (batch of one only).
        labels: how errors name each prompt ("prompt 3").

    Returns:
        B × ``num_return_sequences`` completions, grouped by prompt in order. Each stops at its
        first EOS id, its first stop string, or ``max_new_tokens`` new tokens.

    Raises:
        UserError: a prompt and ``max_new_tokens`` exceed the model's positions.
    """
    ids = prompt_ids if prompt_ids is not None else [encode_prompt(tokenizer, p) for p in prompts]
    labels = labels or _labels(len(ids))
    for row, label in zip(ids, labels, strict=True):
        check_fits(model, len(row), settings.max_new_tokens, label)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    input_ids, attention_mask = left_pad(ids, pad)  # (B, T0)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    width = input_ids.shape[1]
    extra: dict[str, Any] = {}
    if settings.stop:
        extra["stopping_criteria"] = StoppingCriteriaList(
            [StopOnStrings(tokenizer, settings.stop, width, eos)]
        )
    if settings.seed is not None:
        torch.manual_seed(settings.seed)  # seeds every device, cuda included
    # The mask is always passed, but transformers' generate may drop an all-ones mask before the
    # forward, which then warns when the prompt is the EOS (= pad) token alone (``generate ""``).
    silence_padding_warning(model)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pad_token_id=pad,
            eos_token_id=eos or None,
            streamer=streamer,
            **extra,
            **settings.generate_kwargs(),
        )  # (B × num_return_sequences, T0 + new)
    seconds = time.perf_counter() - start
    n = settings.num_return_sequences
    results = []
    eos_set = set(eos)
    for r, row in enumerate(out[:, width:].tolist()):
        p = r // n
        kept, text, reason, stop = _finish(tokenizer, ids[p], row, eos_set, settings.stop)
        results.append(
            Completion(
                prompt=prompts[p],
                completion=text,
                new_tokens=len(kept),
                seconds=seconds,
                finish_reason=reason,
                token_ids=kept,
                prompt_tokens=len(ids[p]),
                index=r % n,
                stop=stop,
            )
        )
    return results


def complete(
    model: Any,
    tokenizer: Any,
    prompt: str,
    settings: GenerationSettings,
    *,
    stream_to: TextIO | None = None,
    label: str = "the prompt",
    prompt_ids: list[int] | None = None,
    echo_prompt: bool = True,
) -> Completion:
    """Generate one completion of ``prompt`` with a loaded model (a batch of one).

    Args:
        model: a causal LM (``model.generate``), in eval mode.
        tokenizer: its tokenizer (a pad token set).
        prompt: the text to continue; "" starts from BOS/EOS.
        settings: decoding settings (``num_return_sequences`` must be 1).
        stream_to: when given, the prompt then the continuation are written there as the tokens
            arrive (no newline at the end).
        echo_prompt: write the prompt before the continuation (False for a chat reply, which
            does not continue the user's text).
        label: how errors name this prompt ("prompt 3").
        prompt_ids: ids to feed instead of encoding ``prompt`` (a chat template applied).

    Returns:
        The :class:`Completion`; generation stops at EOS, a stop string or after
        ``max_new_tokens``.

    Raises:
        UserError: the prompt and ``max_new_tokens`` exceed the model's positions.
    """
    ids = prompt_ids if prompt_ids is not None else encode_prompt(tokenizer, prompt)
    check_fits(model, len(ids), settings.max_new_tokens, label)
    streamer = None
    if stream_to is not None:
        if echo_prompt:
            stream_to.write(prompt)
            stream_to.flush()
        streamer = TextStream(tokenizer, stream_to, ids, stop=settings.stop)
    (result,) = complete_batch(
        model, tokenizer, [prompt], settings, prompt_ids=[ids], streamer=streamer, labels=[label]
    )
    return result


def peak_memory_mb(device: Any = None) -> float | None:
    """Peak memory of this process so far, in MiB: on a CUDA device the most torch has had
    allocated there (``torch.cuda.max_memory_allocated``), else the peak resident set size of
    the process (``getrusage``'s ``ru_maxrss``: KiB on Linux, bytes on macOS). None when
    neither can be read (e.g. Windows)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _stats_line(results: list[Completion], device: Any = None) -> str:
    """``[N tokens in S s, X tokens/s, peak memory M MiB, stopped by R]`` for one batch (its
    new tokens summed)."""
    tokens = sum(r.new_tokens for r in results)
    seconds = results[0].seconds
    rate = tokens / seconds if seconds > 0 else float("inf")
    reasons = sorted({r.finish_reason for r in results})
    unit = "token" if tokens == 1 else "tokens"
    rows = f", batch of {len(results)}" if len(results) > 1 else ""
    peak = peak_memory_mb(device)
    memory = f", peak memory {peak:,.0f} MiB" if peak is not None else ""
    return (
        f"[{tokens} {unit} in {seconds:.2f} s, {rate:.1f} tokens/s{rows}{memory}, "
        f"stopped by {'/'.join(reasons)}]\n"
    )


def run_prompts(
    lm: Any,
    tokenizer: Any,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    batch_size: int = 1,
    chat: bool = False,
    system: str | None = None,
    stream: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    on_result: Callable[[Completion], None] | None = None,
) -> list[Completion]:
    """Complete ``prompts`` with a loaded model, ``batch_size`` prompts per ``generate`` call.

    Every prompt is encoded and checked against the context before any is generated. With
    ``stream``, a batch of one prompt and one sequence is written token by token; larger batches
    are written when they finish (each completion after its prompt — with ``chat``, the reply
    alone — a blank line between).

    Args:
        chat: wrap each prompt as a user message (after ``system``, when given) in the model's
            chat template; ``system`` alone implies it.
        Others: as for :func:`generate_completions`.

    Raises:
        UserError: ``batch_size`` < 1; no chat template; a prompt does not fit in the context.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    out = out or sys.stdout
    err = err or sys.stderr
    chat = chat or system is not None
    ids = [
        encode_chat(tokenizer, chat_messages(p, system)) if chat else encode_prompt(tokenizer, p)
        for p in prompts
    ]
    labels = _labels(len(ids))
    for row, label in zip(ids, labels, strict=True):
        check_fits(lm, len(row), settings.max_new_tokens, label)
    token_stream = stream and batch_size == 1 and settings.num_return_sequences == 1
    results: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        if stream and start > 0:
            out.write("\n")
        if token_stream:
            batch = [
                complete(
                    lm,
                    tokenizer,
                    prompts[start],
                    settings,
                    stream_to=out,
                    label=labels[start],
                    prompt_ids=ids[start],
                    echo_prompt=not chat,
                )
            ]
            out.write("\n")
        else:
            batch = complete_batch(
                lm,
                tokenizer,
                prompts[start:end],
                settings,
                prompt_ids=ids[start:end],
                labels=labels[start:end],
            )
            if stream:
                # a chat reply stands alone; a completion continues its prompt
                out.write(
                    "\n".join(("" if chat else r.prompt) + r.completion + "\n" for r in batch)
                )
        if stream:
            out.flush()
            err.write(_stats_line(batch, getattr(lm, "device", None)))
            err.flush()
        for result in batch:
            if on_result is not None:
                on_result(result)
        results.extend(batch)
    return results


def generate_completions(
    prompts: str | list[str],
    *,
    model: str | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 1,
    chat: bool = False,
    system: str | None = None,
    stream: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    out: TextIO | None = None,
    err: TextIO | None = None,
    on_result: Callable[[Completion], None] | None = None,
    trust_remote_code: bool = False,
) -> list[Completion]:
    """Load a model once and complete the prompts, ``batch_size`` at a time.

    Args:
        prompts: one prompt or a list.
        model: see :func:`llmkit.core.loading.load_model_and_tokenizer` (None: the
            default search).
        settings: decoding settings (defaults: :class:`GenerationSettings`).
        batch_size: prompts per ``model.generate`` call (left-padded; the outputs do not
            depend on it under greedy decoding).
        chat: apply the model's chat template to each prompt (a user message).
        system: a system message for the chat template (implies ``chat``).
        stream: write each prompt and its continuation to ``out`` as it is generated, a
            newline after each, and ``N tokens, X tokens/s`` per batch to ``err``.
        device, dtype: see ``load_model_and_tokenizer``.
        out, err: where streamed text and the statistics go (default stdout, stderr).
        on_result: called with each completion as soon as its batch is done (``--json``).
        trust_remote_code: see ``load_model_and_tokenizer`` (False: a model that needs its own
            Python code is refused).

    Raises:
        UserError: no prompt; bad ``batch_size``; the model does not load; no chat template;
            a prompt does not fit in the context.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given", 'pass one, e.g. llmkit generate "Once upon a time"')
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    settings = settings or GenerationSettings()
    lm, tokenizer, _source = load_model_and_tokenizer(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    announce_threads()  # a busy machine: the thread count chosen by the CLI, said now
    return run_prompts(
        lm,
        tokenizer,
        prompts,
        settings,
        batch_size=batch_size,
        chat=chat,
        system=system,
        stream=stream,
        out=out,
        err=err,
        on_result=on_result,
    )


def generate(
    prompts: str | list[str],
    *,
    model: str | None = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float = 1.0,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    stop: list[str] | None = None,
    batch_size: int = 1,
    chat: bool = False,
    system: str | None = None,
    stream: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> list[str]:
    """Continue each prompt with a causal language model.

    Args:
        prompts: one prompt or a list; "" starts from the BOS/EOS token.
        model: a ``save_pretrained`` directory, a ``.gguf`` file or a Hub id; None tries
            ``$LLMKIT_MODEL``, the newest finished run under ``./runs/``, then ``gpt2``.
        max_new_tokens: most tokens generated per prompt (the prompt not counted).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the k most likely tokens (None or 0: all).
        top_p: nucleus sampling threshold in (0, 1].
        seed: seed set before each batch; the same seed gives the same text.
        repetition_penalty: CTRL's penalty on tokens already present (1 = off).
        num_return_sequences: completions per prompt (sampling only).
        stop: stop strings; each completion ends just before the first one it produces.
        batch_size: prompts per ``model.generate`` call (left padding + attention mask).
        chat: apply the model's chat template (each prompt a user message).
        system: system message for the chat template (implies ``chat``).
        stream: print each prompt and its continuation to stdout as tokens arrive, and
            the token count and tokens/s to stderr.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``...
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        trust_remote_code: let a model that ships Python code of its own (``auto_map``) run
            it; False (default) refuses such a model and runs none of its code.

    Returns:
        The completions, without their prompts: ``num_return_sequences`` per prompt, in order.

    Raises:
        UserError: bad settings, a model that does not load, a prompt longer than the context,
            no chat template.
    """
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_return_sequences,
        stop=list(stop or []),
    )
    results = generate_completions(
        prompts,
        model=model,
        settings=settings,
        batch_size=batch_size,
        chat=chat,
        system=system,
        stream=stream,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    return [r.completion for r in results]
