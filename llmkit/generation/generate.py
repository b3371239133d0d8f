"""Text generation: prompts in, completions out, streamed to the terminal as they come (SPEC §4).

The pieces, from the outside in:

- :func:`generate` — the library call (``llmkit.generate``): prompts in, completion strings out.
- :func:`generate_completions` — loads the model once and returns :class:`Completion` records
  (text, new tokens, tokens/s); the CLI uses it.
- :func:`complete` — one prompt on an already loaded model: encode, check the context, run
  ``model.generate``, decode.
- :class:`GenerationSettings` — the decoding settings, validated on construction, turned into
  ``model.generate`` keyword arguments by :meth:`GenerationSettings.generate_kwargs`.
- :class:`TextStream` — a transformers streamer that writes the decoded continuation to a file.

One prompt is one ``model.generate`` call (batch of 1): no padding, so each output is exactly what
that prompt gives alone. Batching (left padding), stop strings, chat templates and the per-token
view extend :func:`complete` and :class:`GenerationSettings`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from transformers.generation.streamers import BaseStreamer

from llmkit.errors import UserError
from llmkit.generation.loading import load_model_and_tokenizer, model_max_positions

# Decoding options shared by the streamer and the final text, so both give the same string.
# No clean-up of spaces: text already written to the terminal cannot be taken back.
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


@dataclass
class GenerationSettings:
    """How to pick each next token."""

    max_new_tokens: int = 100
    """Most tokens to generate after the prompt (the prompt is not counted)."""
    temperature: float = 0.8
    """Divides the logits before sampling; 0 means greedy (always the most likely token)."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens; None or 0 for no limit."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability adds up to p; 1 = all."""
    seed: int | None = None
    """Seeds torch before each prompt: the same seed gives the same text."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(
                f"--max-new-tokens {self.max_new_tokens} must be at least 1", "e.g. 100"
            )
        if self.temperature < 0:
            raise UserError(
                f"--temperature {self.temperature} is negative", "use 0 for greedy, or e.g. 0.8"
            )
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} is negative", "use 0 for no limit, or e.g. 200")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} is outside (0, 1]", "use 1 for no limit")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``.

        Greedy passes ``do_sample=False`` and no sampling argument (so transformers does not warn
        that they are unused); sampling passes all three, ``top_k=0`` meaning no limit (the
        model's ``generation_config`` would otherwise fill in its own).
        """
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(
                do_sample=True,
                temperature=float(self.temperature),
                top_k=int(self.top_k or 0),
                top_p=float(self.top_p),
            )
        return kwargs


@dataclass
class Completion:
    """One prompt's result."""

    prompt: str
    completion: str
    """The generated text, without the prompt and without special tokens."""
    new_tokens: int
    """Tokens generated, an EOS included."""
    seconds: float
    """Wall time of ``model.generate`` (prompt processing included)."""
    finish_reason: str
    """``eos`` (the model ended the text) or ``length`` (``max_new_tokens`` reached)."""
    token_ids: list[int] = field(default_factory=list, repr=False)
    """The new token ids."""

    @property
    def tokens_per_sec(self) -> float:
        """New tokens per second of generation."""
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


class TextStream(BaseStreamer):
    """A ``model.generate`` streamer that writes the continuation to ``out`` as tokens arrive.

    The first ``put`` (the prompt, shape (1, T)) is skipped: the caller writes the prompt.
    Text that may still change is held back: a trailing U+FFFD (the first bytes of a UTF-8
    character split across tokens). After a newline the decoding restarts from the last token,
    so the cost per token stays flat.

    Args:
        tokenizer: decodes ids.
        out: a text file (``sys.stdout``); flushed after each write.
        context_ids: the prompt's ids (the last one is kept as decoding context).
    """

    def __init__(self, tokenizer: Any, out: TextIO, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.out = out
        self.context = list(context_ids[-1:])
        self.pending: list[int] = []
        self.written = 0  # characters of decode_continuation(context, pending) already written
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Receive token ids: (1, T) for the prompt, then (1,) per generated token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.pending.extend(value.reshape(-1).tolist())
        text = decode_continuation(self.tokenizer, self.context, self.pending)
        ready = text.rstrip("\ufffd")
        self._write(ready[self.written :])
        self.written = len(ready)
        if ready.endswith("\n") and len(ready) == len(text):
            self.context, self.pending, self.written = self.pending[-1:], [], 0

    def end(self) -> None:
        """Write whatever was held back."""
        text = decode_continuation(self.tokenizer, self.context, self.pending)
        self._write(text[self.written :])
        self.context, self.pending, self.written = [], [], 0
        self.prompt_seen = False

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
    hint = (
        f"use --max-new-tokens {room} or less, or a shorter prompt"
        if room > 0
        else f"shorten the prompt to under {positions} tokens"
    )
    tokens = "token" if n_prompt == 1 else "tokens"
    raise UserError(
        f"{label} is {n_prompt} {tokens}; with --max-new-tokens {max_new_tokens} that is "
        f"{n_prompt + max_new_tokens}, more than the model's {positions} positions",
        hint,
    )


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def complete(
    model: Any,
    tokenizer: Any,
    prompt: str,
    settings: GenerationSettings,
    *,
    stream_to: TextIO | None = None,
    label: str = "the prompt",
) -> Completion:
    """Generate one completion of ``prompt`` with a loaded model.

    Args:
        model: a causal LM (``model.generate``), in eval mode.
        tokenizer: its tokenizer (a pad token set).
        prompt: the text to continue; "" starts from BOS/EOS.
        settings: decoding settings.
        stream_to: when given, the prompt then the continuation are written there as the tokens
            arrive (no newline at the end).
        label: how errors name this prompt ("prompt 3").

    Returns:
        The :class:`Completion`; generation stops at EOS or after ``max_new_tokens``.

    Raises:
        UserError: the prompt and ``max_new_tokens`` exceed the model's positions.
    """
    ids = encode_prompt(tokenizer, prompt)
    check_fits(model, len(ids), settings.max_new_tokens, label)
    device = model.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    attention_mask = torch.ones_like(input_ids)  # (1, T)
    eos = _eos_ids(model, tokenizer)
    streamer = None
    if stream_to is not None:
        stream_to.write(prompt)
        stream_to.flush()
        streamer = TextStream(tokenizer, stream_to, ids)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)  # seeds every device, cuda included
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos or None,
            streamer=streamer,
            **settings.generate_kwargs(),
        )  # (1, T + new)
    seconds = time.perf_counter() - start
    new_ids = out[0, len(ids) :].tolist()  # batch of one: nothing padded after EOS
    finish = "eos" if new_ids and new_ids[-1] in eos else "length"
    return Completion(
        prompt=prompt,
        completion=decode_continuation(tokenizer, ids, new_ids),
        new_tokens=len(new_ids),
        seconds=seconds,
        finish_reason=finish,
        token_ids=new_ids,
    )


def generate_completions(
    prompts: str | list[str],
    *,
    model: str | None = None,
    settings: GenerationSettings | None = None,
    stream: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    out: TextIO | None = None,
    err: TextIO | None = None,
    on_result: Callable[[Completion], None] | None = None,
) -> list[Completion]:
    """Load a model once and complete each prompt in turn.

    Args:
        prompts: one prompt or a list.
        model: see :func:`llmkit.generation.loading.load_model_and_tokenizer` (None: the
            default search).
        settings: decoding settings (defaults: :class:`GenerationSettings`).
        stream: write each prompt and its continuation to ``out`` as it is generated, a
            newline after each, and ``N tokens, X tokens/s`` to ``err``.
        device, dtype: see ``load_model_and_tokenizer``.
        out, err: where streamed text and the statistics go (default stdout, stderr).
        on_result: called with each completion as soon as it is done (``--json`` prints it).

    Raises:
        UserError: no prompt; the model does not load; a prompt does not fit in the context.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given", 'pass one, e.g. llmkit generate "Once upon a time"')
    settings = settings or GenerationSettings()
    out = out or sys.stdout
    err = err or sys.stderr
    lm, tokenizer, _source = load_model_and_tokenizer(model, device=device, dtype=dtype)
    results = []
    for i, prompt in enumerate(prompts):
        label = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if stream and i > 0:
            out.write("\n")
        result = complete(
            lm, tokenizer, prompt, settings, stream_to=out if stream else None, label=label
        )
        if stream:
            out.write("\n")
            out.flush()
            unit = "token" if result.new_tokens == 1 else "tokens"
            err.write(
                f"[{result.new_tokens} {unit} in {result.seconds:.2f} s, "
                f"{result.tokens_per_sec:.1f} tokens/s, stopped by {result.finish_reason}]\n"
            )
            err.flush()
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results


def generate(
    prompts: str | list[str],
    *,
    model: str | None = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    device: str = "auto",
    dtype: str = "auto",
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
        seed: seed set before each prompt; the same seed gives the same text.
        stream: print each prompt and its continuation to stdout as tokens arrive, and
            the token count and tokens/s to stderr.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``...
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.

    Returns:
        The completions, without their prompts, one per prompt.

    Raises:
        UserError: bad settings, a model that does not load, a prompt longer than the context.
    """
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    results = generate_completions(
        prompts, model=model, settings=settings, stream=stream, device=device, dtype=dtype
    )
    return [r.completion for r in results]
