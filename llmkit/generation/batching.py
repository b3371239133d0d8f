"""A batch of prompts through one ``model.generate`` call, on an already loaded model.

Batches are padded on the left with an attention mask (:func:`left_pad`), so the last real
token of every row sits at the same place and each row's positions count from its own first
token (transformers derives ``position_ids`` from the mask): each output equals that prompt's
output alone. A row ends at the first of its own EOS ids (:func:`eos_ids`: all of the
tokenizer's and of ``generation_config``'s, which may be a list, and the chat template's
end-of-turn token), its first stop string, or ``max_new_tokens`` new tokens; after it ends
``model.generate`` fills its row with padding, which is cut off here
(:func:`~llmkit.generation.decoding.finish_row`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from llmkit.core.loading import silence_padding_warning
from llmkit.generation.decoding import StopOnStrings, TextStream, finish_row
from llmkit.generation.prompts import check_fits, encode_prompt, prompt_labels
from llmkit.generation.settings import GenerationSettings
from llmkit.templates import end_of_turn_ids


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


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a sequence, in this order, without repeats:
    ``generation_config.eos_token_id`` (an int or a list, as in Llama 3's
    ``[128001, 128008, 128009]``), the tokenizer's ``eos_token_id``, and the chat template's
    end-of-turn token (:func:`llmkit.templates.end_of_turn_ids`; ChatML's ``<|im_end|>``), so
    that a model fine-tuned on chat data stops at the end of its answer even when its config
    names another EOS."""
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
    labels = labels or prompt_labels(len(ids))
    for row, label in zip(ids, labels, strict=True):
        check_fits(model, len(row), settings.max_new_tokens, label)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    input_ids, attention_mask = left_pad(ids, pad)  # (B, T0)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    width = input_ids.shape[1]
    n = settings.num_return_sequences
    extra: dict[str, Any] = {}
    if settings.stop:
        rows = [ids[r // n] for r in range(len(ids) * n)]  # generate repeats each prompt n times
        extra["stopping_criteria"] = StoppingCriteriaList(
            [StopOnStrings(tokenizer, settings.stop, width, eos, rows)]
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
    results = []
    eos_set = set(eos)
    for r, row in enumerate(out[:, width:].tolist()):
        p = r // n
        kept, text, reason, stop = finish_row(tokenizer, ids[p], row, eos_set, settings.stop)
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
            arrive (no newline at the end); the continuation written is exactly the
            completion's text (:class:`~llmkit.generation.decoding.TextStream`).
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
