"""Text generation's entry points: prompts in, completions out, streamed to the terminal as
they come (SPEC §4).

- :func:`generate` — the library call (``llmkit.generate``): prompts in, completion strings out.
- :func:`generate_completions` — loads the model once and returns
  :class:`~llmkit.generation.batching.Completion` records (text, new tokens, tokens/s); the
  CLI uses it.
- :func:`run_prompts` — the same on a loaded model: every prompt encoded and checked first,
  then ``batch_size`` at a time, streamed or not.

The other concerns live beside this module:

- :mod:`llmkit.generation.settings` — :class:`GenerationSettings`, the decoding settings,
  validated on construction and built from flags in one place
  (:meth:`GenerationSettings.from_flags`); no torch.
- :mod:`llmkit.generation.prompts` — prompts and conversations to token ids; the context check.
- :mod:`llmkit.generation.batching` — one left-padded ``model.generate`` call for a batch
  (:func:`complete_batch`), its EOS ids, each row cut at its end; :func:`complete` is the
  batch of one, streamed.
- :mod:`llmkit.generation.decoding` — ids to text: the continuation after the prompt, stop
  strings, and streaming only text that can no longer change.
- :mod:`llmkit.generation.chat` — the interactive ``chat`` session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch

from llmkit.core.loading import load_model_and_tokenizer
from llmkit.errors import UserError
from llmkit.generation.batching import (
    Completion,
    complete,
    complete_batch,
)
from llmkit.generation.cpu_path import auto_cpu_path
from llmkit.generation.prompts import (
    check_fits,
    encode_prompts,
    prompt_labels,
)
from llmkit.generation.settings import GenerationSettings
from llmkit.runtime import announce_threads


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
    ids = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    labels = prompt_labels(len(ids))
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
        device, dtype: see ``load_model_and_tokenizer``; ``dtype`` ``auto`` on a CPU is float32
            unless a calibration on this machine finds bfloat16 faster and greedy-equal
            (:func:`llmkit.generation.cpu_path.auto_cpu_path`).
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
    lm, _choice = auto_cpu_path(lm, tokenizer, dtype, err=err)  # --dtype auto on a CPU
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


_DEFAULTS = GenerationSettings()


def generate(
    prompts: str | list[str],
    *,
    model: str | None = None,
    max_new_tokens: int = _DEFAULTS.max_new_tokens,
    temperature: float = _DEFAULTS.temperature,
    top_k: int | None = _DEFAULTS.top_k,
    top_p: float = _DEFAULTS.top_p,
    seed: int | None = None,
    repetition_penalty: float = _DEFAULTS.repetition_penalty,
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
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``. ``auto`` is bfloat16 on a CUDA
            GPU that supports it; on a CPU float32, unless a calibration of this model on this
            machine (once, cached) found bfloat16 at least 1.1× faster *and* giving the same
            greedy tokens on its prompts (:mod:`llmkit.generation.cpu_path`); bfloat16 may then
            still differ from float32 on other prompts: pass ``float32`` for exact float32.
        trust_remote_code: let a model that ships Python code of its own (``auto_map``) run
            it; False (default) refuses such a model and runs none of its code.

    Returns:
        The completions, without their prompts: ``num_return_sequences`` per prompt, in order.

    Raises:
        UserError: bad settings, a model that does not load, a prompt longer than the context,
            no chat template.
    """
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
