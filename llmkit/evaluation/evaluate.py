"""Perplexity and bits per byte of a causal LM on a prepared split or on text (SPEC §5).

Two ways to cut the tokens into model inputs, both scoring every target token exactly once:

- **blocks** (a directory from ``llmkit prepare``): each block of T tokens is one input and scores
  its T-1 next-token targets with the function validation during training calls
  (:func:`llmkit.core.scoring.score_blocks`).
  Prepared chat data carries ``labels`` (-100 where not scored) and ``position_ids`` (packed
  conversations): only the answers are scored, each conversation seeing only itself.
- **sliding windows** (a text file or a directory of ``.txt``): each document is tokenized whole,
  its BOS (or EOS) token put in front as context so that the first text token is scored too, and
  windows of ``max_length`` tokens move ``stride`` tokens at a time; in each window only the new
  tokens are scored, the earlier ones are context (:func:`plan_windows`, :func:`score_windows`).
  This is the method of the Hugging Face guide "Perplexity of fixed-length models", with two
  corrections: the first token of a window has no context inside that window, so a window scores
  at most ``max_length - 1`` tokens (the default ``stride = max_length`` gives windows that
  overlap by one token); and the result is total nats over total scored tokens, not a mean of
  per-window means.

All totals go through :class:`llmkit.core.metrics.NLLSums`: ``loss`` is nats per token,
``perplexity = exp(loss)``, ``bits_per_byte = nats / (ln 2 × UTF-8 bytes of the scored tokens)``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from llmkit.core.metrics import NLLSums, nll_sums, shift_labels
from llmkit.core.prepared import IGNORE_INDEX
from llmkit.core.scoring import score_blocks
from llmkit.errors import UserError
from llmkit.evaluation.checks import check_windows
from llmkit.runtime import announce_threads

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each batch (windows or blocks)."""


class Window(NamedTuple):
    """One model input cut from a token sequence: tokens ``[begin, end)``, of which the last
    ``n_scored`` are targets; the ones before are context only."""

    begin: int
    end: int
    n_scored: int


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Cut a sequence of ``n_tokens`` tokens into windows that score tokens 1..n_tokens-1 once.

    Token 0 (the BOS put in front) is context only. The first window is ``[0, max_length)``
    and scores tokens 1..max_length-1; each next window ends ``stride`` tokens later (at most
    ``max_length - 1``, so that its first token is context), starts ``max_length`` tokens before
    its end, and scores the tokens after the previous window's end. Every window but a short
    first one is therefore ``max_length`` long, with ``max_length - n_scored`` tokens of context.

    Example: ``plan_windows(10, 4, 2)`` is ``[(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]``.

    Args:
        n_tokens: sequence length in tokens, the leading BOS included.
        max_length: tokens per window (the model's context), at least 2.
        stride: new tokens scored per window, 1..max_length.

    Returns:
        The windows in order; empty when ``n_tokens < 2`` (nothing to score).

    Raises:
        UserError: ``max_length < 2``, or ``stride`` outside 1..max_length.
    """
    check_windows(max_length, stride)
    if n_tokens < 2:
        return []
    step = min(stride, max_length - 1)
    end = min(max_length, n_tokens)
    windows = [Window(0, end, end - 1)]
    while end < n_tokens:
        new_end = min(end + step, n_tokens)
        windows.append(Window(max(0, new_end - max_length), new_end, new_end - end))
        end = new_end
    return windows


def _logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, vocab_size) logits of ``model``, any callable returning an object with ``.logits``.

    ``position_ids`` (B, T) is passed only when given: packed rows, with ``attention_mask``
    None (as :func:`llmkit.core.scoring.score_blocks` calls the model).
    """
    kwargs: dict[str, Any] = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
    ).logits


class _EvalMode:
    """Put a module in eval mode and inference mode for a block, restoring training after."""

    def __init__(self, model: Any):
        self.model = model
        self.was_training = bool(getattr(model, "training", False))
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        if self.was_training:
            self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.inference.__exit__(*exc)
        if self.was_training:
            self.model.train()


def _token_bytes(token_bytes: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(token_bytes, dtype=torch.long, device=device)


def _window_batches(
    docs: Sequence[Sequence[int]],
    max_length: int,
    stride: int,
    batch_size: int,
    pad_id: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Yield ``(input_ids, attention_mask, targets, n_windows)``, each (B, T), B ≤ batch_size.

    Windows shorter than the longest in the batch are padded on the right: padding has
    attention 0 and target -100, and with causal attention it cannot change the real positions.
    """
    plan = [(doc, w) for doc in docs for w in plan_windows(len(doc), max_length, stride)]
    for start in range(0, len(plan), batch_size):
        chunk = plan[start : start + batch_size]
        width = max(w.end - w.begin for _, w in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for row, (doc, w) in enumerate(chunk):
            length = w.end - w.begin
            tokens = torch.as_tensor(doc[w.begin : w.end], dtype=torch.long)
            input_ids[row, :length] = tokens
            attention_mask[row, :length] = 1
            labels[row, length - w.n_scored : length] = tokens[length - w.n_scored :]
        # labels mark which tokens are scored; targets[t] = labels[t+1] is what logits[t] predict
        yield input_ids, attention_mask, shift_labels(labels), len(chunk)


def score_windows(
    model: Any,
    docs: Sequence[Sequence[int]],
    token_bytes: Any,
    *,
    max_length: int,
    stride: int,
    batch_size: int,
    device: str | torch.device,
    pad_id: int = 0,
    progress: Progress | None = None,
) -> NLLSums:
    """Summed NLL of token sequences with the sliding-window method (:func:`plan_windows`).

    Args:
        model: a causal LM, or any callable ``model(input_ids=, attention_mask=, use_cache=)``
            returning an object whose ``.logits`` is (B, T, vocab_size).
        docs: token id sequences, each starting with a context-only token (BOS); tokens
            1..len-1 of each are scored exactly once.
        token_bytes: (vocab_size,) UTF-8 bytes per token id.
        max_length: tokens per window.
        stride: new tokens scored per window (context per window: ``max_length - stride``).
        batch_size: windows per forward pass; the result does not depend on it.
        device: where the model is.
        pad_id: id put in padding positions (never attended to nor scored).
        progress: called with (windows done, total windows) after each batch.

    Returns:
        Total nats, scored tokens (Σ len(doc) - 1) and their bytes.

    Raises:
        UserError: bad ``max_length`` / ``stride`` (see :func:`plan_windows`).
    """
    device = torch.device(device)
    total = sum(len(plan_windows(len(d), max_length, stride)) for d in docs)
    bytes_per_id = _token_bytes(token_bytes, device)
    sums = NLLSums()
    done = 0
    with _EvalMode(model):
        for input_ids, attention_mask, targets, count in _window_batches(
            docs, max_length, stride, batch_size, pad_id
        ):
            logits = _logits(model, input_ids.to(device), attention_mask.to(device))
            sums.add(nll_sums(logits, targets.to(device), bytes_per_id))
            done += count
            if progress is not None:
                progress(done, total)
    return sums


def read_texts(path: str | Path) -> list[tuple[str, str]]:
    """The documents of a text file (one document) or a directory (each ``*.txt`` under it,
    sorted by path, one document each), as ``(file name, text)``.

    Raises:
        UserError: the path is missing; a directory has no ``.txt`` file; a file is not UTF-8,
            looks binary (NUL bytes) or cannot be read; all the text is empty.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{p} does not exist", "give a text file, a directory of .txt or a prepared directory"
        )
    files = sorted(q for q in p.rglob("*.txt") if q.is_file()) if p.is_dir() else [p]
    if not files:
        raise UserError(
            f"{p} has no .txt file and is not a prepared data directory",
            "give a text file, a directory of .txt files, or the output of `llmkit prepare`",
        )
    docs = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{f} is not valid UTF-8 (byte {err.start})", "convert it to UTF-8 text"
            ) from None
        except OSError as err:
            raise UserError(f"cannot read {f}: {err.strerror}") from None
        if "\x00" in text:
            raise UserError(f"{f} looks binary (it holds NUL bytes)", "give a text file")
        docs.append((str(f), text))
    if not any(text for _, text in docs):
        raise UserError(f"{p} is empty: no text to score", "give a file with some text")
    return docs


def _model_vocab_size(model: Any) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)


def _eval_prepared(
    lm: Any,
    tokenizer: Any,
    data: Path,
    split: str,
    batch_size: int,
    progress: Progress | None,
    trust_remote_code: bool = False,
    model_name: str = "the model",
) -> NLLSums:
    from llmkit.core.loading import model_max_positions
    from llmkit.core.prepared import SPLITS, check_same_vocabulary, load_prepared
    from llmkit.core.tokenizer import token_byte_lengths

    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    prepared = load_prepared(data, trust_remote_code=trust_remote_code)
    blocks = getattr(prepared, split)
    if blocks is None or len(blocks) == 0:
        raise UserError(
            f"the {split} split of {data} has no blocks",
            "use --split train, or prepare with a validation fraction",
        )
    block_size = len(blocks[0]["input_ids"])
    positions = model_max_positions(lm)
    if positions is not None and block_size > positions:
        raise UserError(
            f"blocks of {data} are {block_size} tokens, more than the model's {positions} "
            "positions",
            "prepare the data with a smaller --block-size",
        )
    vocab = _model_vocab_size(lm)
    if vocab is not None and len(prepared.tokenizer) > vocab:
        raise UserError(
            f"the tokenizer of {data} has {len(prepared.tokenizer)} tokens, more than the "
            f"model's vocabulary of {vocab}",
            "evaluate on data prepared with the model's tokenizer",
        )
    # the same check as llmkit train: scores of ids the model never saw would be meaningless
    check_same_vocabulary(prepared.tokenizer.get_vocab(), tokenizer.get_vocab(), data, model_name)
    token_bytes = token_byte_lengths(prepared.tokenizer)
    announce_threads()  # the work starts: a busy machine's thread count is said now
    return score_blocks(lm, blocks, token_bytes, batch_size, lm.device, progress=progress)


def _eval_text(
    lm: Any,
    tokenizer: Any,
    texts: list[tuple[str, str]],
    max_length: int | None,
    stride: int | None,
    batch_size: int,
    progress: Progress | None,
) -> NLLSums:
    from llmkit.core.loading import model_max_positions
    from llmkit.core.tokenizer import token_byte_lengths

    positions = model_max_positions(lm)
    window = None
    if max_length is None:
        if positions is None:
            raise UserError(
                "the model's config does not give its number of positions",
                "pass --max-length N",
            )
        max_length = positions
        window = f"the model's {positions} positions (no --max-length given)"
    elif positions is not None and max_length > positions:
        raise UserError(
            f"--max-length {max_length} is more than the model's {positions} positions",
            f"use --max-length {positions} or less",
        )
    stride = max_length if stride is None else stride
    check_windows(max_length, stride, window)  # before tokenizing
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    docs = []
    for _, text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if ids:
            docs.append([start, *ids])
    token_bytes = token_byte_lengths(tokenizer)
    announce_threads()
    return score_windows(
        lm,
        docs,
        token_bytes,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        device=lm.device,
        pad_id=tokenizer.pad_token_id or 0,
        progress=progress,
    )


def evaluate(
    model: str,
    data: str,
    *,
    split: str = "validation",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a model on prepared data or text.

    Args:
        model: a model directory, ``.gguf`` file or Hub id.
        data: a directory from ``llmkit prepare`` (its ``split`` is scored block by block), or
            a text file / directory of ``.txt`` files (sliding windows).
        split: ``validation`` or ``train``, for prepared data.
        max_length: tokens per window for text (default: the model's positions).
        stride: new tokens scored per window for text (default: ``max_length``); smaller gives
            each token more context and costs ``max_length / stride`` times more compute.
        batch_size: blocks or windows per forward pass (does not change the result).
        device, dtype: see :func:`llmkit.core.loading.load_model_and_tokenizer`.
        progress: called with (done, total) after each batch.
        trust_remote_code: let a model (or the data's tokenizer) that ships Python code of its
            own run it; False (default) refuses it and runs none of its code.

    Returns:
        ``{"model", "data", "loss" (nats/token), "perplexity", "bits_per_byte",
        "tokens" (scored), "bytes" (UTF-8 bytes of the scored tokens)}``.

    Raises:
        UserError: a model that does not load; data missing, empty, not UTF-8 or binary; a
            split with no blocks; blocks or ``max_length`` over the model's positions; a
            tokenizer larger than the model's vocabulary; ``stride`` outside 1..max_length.
    """
    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.core.prepared import is_prepared

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    if not is_prepared(data) and max_length is not None:
        plan_windows(2, max_length, max_length if stride is None else stride)  # fail early
    path = Path(data)
    prepared = is_prepared(path)
    texts = None if prepared else read_texts(path)  # bad data fails before the model loads
    if prepared and (max_length is not None or stride is not None):
        sys.stderr.write(
            "warning: --max-length and --stride apply to text; prepared blocks are scored whole\n"
        )
    lm, tokenizer, source = load_model_and_tokenizer(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if prepared:
        sums = _eval_prepared(
            lm, tokenizer, path, split, batch_size, progress, trust_remote_code, source
        )
    else:
        sums = _eval_text(lm, tokenizer, texts, max_length, stride, batch_size, progress)
    if sums.tokens == 0:
        raise UserError(f"{data} gave no token to score", "give more text")
    metrics = sums.metrics()
    return {
        "model": source,
        "data": str(data),
        "loss": metrics["loss"],
        "perplexity": metrics["ppl"],
        "bits_per_byte": metrics["bpb"],
        "tokens": sums.tokens,
        "bytes": sums.bytes,
    }


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that ``"".join(pieces)`` is the decoded text.

    A token that ends inside a multi-byte UTF-8 character adds "" and the token that completes
    the character carries it (decoding the prefix up to each token, held back at U+FFFD).
    """
    pieces: list[str] = []
    shown = ""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:i]), clean_up_tokenization_spaces=False)
        ready = text if i == len(ids) else text.rstrip("\ufffd")
        if not ready.startswith(shown):  # a decoder that rewrites earlier text: fall back
            ready = shown + tokenizer.decode([ids[i - 1]], clean_up_tokenization_spaces=False)
        pieces.append(ready[len(shown) :])
        shown = ready
    return pieces


def token_probabilities(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    top: int = 0,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The probability the model gives each token of ``text`` after the ones before it.

    The chain rule made visible: ``log P(text) = Σ_i log P(x_i | x_<i)``. The text is tokenized
    without special tokens and the BOS (else EOS) token put in front as context, as in
    :func:`evaluate`, so the first token is scored too and the total equals ``-loss × tokens``
    of ``evaluate`` on the same text. Texts longer than the context are scored with sliding
    windows of ``max_length`` tokens (default: the model's positions), each token once.

    Args:
        model: a loaded causal LM (or any callable as for :func:`score_windows`).
        tokenizer: its tokenizer.
        text: the text to score (not empty).
        top: also list the ``top`` most likely tokens at each position (0: none).
        max_length: tokens per window.

    Returns:
        ``{"text", "tokens": [{"id", "token" (the text it adds), "prob", "logprob" (nats),
        "top": [{"id", "token", "prob"}]}], "logprob" (Σ, nats), "n_tokens", "loss"
        (nats/token), "perplexity", "bytes" (UTF-8 of the text), "bits_per_byte"}``.

    Raises:
        UserError: empty text; ``top`` negative.
    """
    from llmkit.core.loading import model_max_positions

    if not text:
        raise UserError("--tokens '' is empty", "give some text to score")
    if top < 0:
        raise UserError(f"--top {top} is negative", "use e.g. --top 5")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [start, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    max_length = max_length or model_max_positions(model) or len(ids)
    max_length = min(max_length, max(len(ids), 2))
    device = getattr(model, "device", torch.device("cpu"))
    logprobs = torch.empty(len(ids) - 1)  # (N,) log P(x_i | x_<i), i = 1..N
    tops: list[tuple[torch.Tensor, torch.Tensor]] = []  # per window: (n, top) values, indices
    with _EvalMode(model):
        for w in plan_windows(len(ids), max_length, max_length):
            window = torch.tensor([ids[w.begin : w.end]], dtype=torch.long, device=device)  # (1, T)
            logits = _logits(model, window, torch.ones_like(window))[0].float()  # (T, vocab_size)
            T = w.end - w.begin
            # logits[t] predicts window token t+1: the scored tokens are the last n_scored
            lp = torch.log_softmax(logits[T - 1 - w.n_scored : T - 1], dim=-1)  # (n, vocab_size)
            targets = window[0, T - w.n_scored :]  # (n,)
            logprobs[w.end - w.n_scored - 1 : w.end - 1] = lp.gather(1, targets[:, None])[
                :, 0
            ].cpu()
            if top:
                values, indices = lp.topk(min(top, lp.shape[-1]), dim=-1)  # (n, top)
                tops.append((values.cpu(), indices.cpu()))
    pieces = token_pieces(tokenizer, ids[1:])
    top_values = torch.cat([v for v, _ in tops]) if tops else None
    top_ids = torch.cat([i for _, i in tops]) if tops else None
    tokens = []
    for i, (tid, piece) in enumerate(zip(ids[1:], pieces, strict=True)):
        entry: dict[str, Any] = {
            "id": tid,
            "token": piece,
            "prob": math.exp(float(logprobs[i])),
            "logprob": float(logprobs[i]),
        }
        if top_values is not None:
            entry["top"] = [
                {
                    "id": int(j),
                    "token": tokenizer.decode([int(j)], clean_up_tokenization_spaces=False),
                    "prob": math.exp(float(v)),
                }
                for v, j in zip(top_values[i], top_ids[i], strict=True)
            ]
        tokens.append(entry)
    total = float(logprobs.double().sum())
    n_bytes = len(text.encode("utf-8"))
    n = len(tokens)
    return {
        "text": text,
        "tokens": tokens,
        "logprob": total,
        "n_tokens": n,
        "loss": -total / n,
        "perplexity": math.exp(-total / n) if -total / n < 700 else float("inf"),
        "bytes": n_bytes,
        "bits_per_byte": -total / (math.log(2) * n_bytes),
    }


def token_view(
    model: str,
    text: str,
    *,
    top: int = 0,
    max_length: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load ``model`` and return :func:`token_probabilities` of ``text``, with ``"model"``
    (``trust_remote_code``: see :func:`evaluate`)."""
    from llmkit.core.loading import load_model_and_tokenizer

    if not text:
        raise UserError("--tokens '' is empty", "give some text to score")
    lm, tokenizer, source = load_model_and_tokenizer(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    announce_threads()
    return {
        "model": source,
        **token_probabilities(lm, tokenizer, text, top=top, max_length=max_length),
    }
