"""Next-token scoring of prepared blocks: one function for training validation and ``llmkit eval``.

:func:`split_batch` turns a batch of blocks into model inputs and targets, the same way for a
training step and for scoring; :func:`score_blocks` sums the NLL of those targets over a
split. Validation during training (``llmkit.training.fit``) and ``llmkit eval --data DIR``
(``llmkit.evaluation.evaluate``) both call :func:`score_blocks`, so their numbers agree to the
last bit on the same model and blocks (nanochat's ``loss_eval.py::evaluate_bpb`` is shared by
its training and evaluation in the same way). This module imports neither job.
"""

from __future__ import annotations

from typing import Any

import torch

from llmkit.core.metrics import NLLSums, nll_sums
from llmkit.core.prepared import IGNORE_INDEX

#: The columns of a prepared split that are read: ``input_ids`` always; ``labels`` and
#: ``position_ids`` when ``llmkit prepare`` wrote them (chat / instruction data).
BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")


def block_columns(dataset: Any) -> list[str]:
    """The :data:`BLOCK_COLUMNS` that a prepared split has, in that order."""
    return [c for c in BLOCK_COLUMNS if c in dataset.column_names]


def split_batch(
    batch: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs and next-token targets of a batch of blocks.

    Args:
        batch: ``input_ids`` (B, T); optionally ``labels`` (B, T), the Hugging Face convention
            (``labels[:, t]`` is the id of token t where it is a target, -100 where no loss is
            wanted; default: every token is a target), and ``position_ids`` (B, T), restarting
            at 0 where a packed conversation begins.

    Returns:
        ``inputs``: ``input_ids`` (B, T-1) = ids[:, :-1], plus ``position_ids`` (B, T-1) =
        position_ids[:, :-1] when given (with no attention mask, transformers then attends only
        within each packed sequence: ``masking_utils.find_packed_sequence_indices``), and
        ``use_cache=False`` (a cache would turn that detection off, and costs memory);
        ``targets`` (B, T-1) = labels[:, 1:]: position t predicts token t+1, so a block of T
        tokens gives T-1 targets and no position is wasted; with ``position_ids``, -100 where
        a conversation starts (nothing before it in its own conversation predicts it).
    """
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    inputs: dict[str, Any] = {"input_ids": ids[:, :-1], "use_cache": False}
    targets = labels[:, 1:].long()
    positions = batch.get("position_ids")
    if positions is not None:
        inputs["position_ids"] = positions[:, :-1].long()
        # the first token of a packed conversation has no context of its own (the end of the
        # previous one cannot predict it): never a target, whatever its label says
        starts = positions[:, 1:] != positions[:, :-1] + 1  # (B, T-1)
        targets = targets.masked_fill(starts, IGNORE_INDEX)
    return inputs, targets


def _row_reader(blocks: Any):
    """``get(i, j)``: rows i..j-1 of a prepared split or an (N, T) tensor / id lists, as a
    dict of (B, T) tensors."""
    if hasattr(blocks, "with_format"):
        rows = blocks.with_format("torch", columns=block_columns(blocks))
        return lambda i, j: rows[i:j]
    return lambda i, j: {"input_ids": torch.as_tensor(blocks[i:j])}


@torch.no_grad()
def score_blocks(
    model: Any,
    blocks: Any,
    token_bytes: Any,
    batch_size: int,
    device: str | torch.device,
    *,
    progress=None,
    extra_forwards: int = 0,
    filler: Any = None,
) -> NLLSums:
    """Summed next-token NLL over the targets of fixed-length blocks.

    Each batch goes through :func:`split_batch`, exactly as in a training step: a block of T
    tokens feeds its first T-1 and scores its T-1 next tokens; with a ``labels`` column only
    targets whose label is not -100 count (in the nats, the token count and the bytes, so bits
    per byte is over the UTF-8 bytes of the scored tokens only); with ``position_ids`` the
    model is called without an attention mask, from which transformers builds a
    block-diagonal causal mask, and the first token of each packed conversation is not scored.

    Args:
        model: a causal LM, or any callable ``model(input_ids=, use_cache=)`` (and
            ``position_ids=`` for packed data) returning an object whose ``.logits`` is
            (B, T-1, vocab_size). Put in eval mode for the call (its mode is restored after).
        blocks: a ``datasets.Dataset`` with an ``input_ids`` column of equal-length rows (and
            optionally ``labels`` and ``position_ids``), or a (N, T) tensor / sequence of
            equal-length id lists.
        token_bytes: (vocab_size,) UTF-8 bytes per token id
            (:func:`llmkit.core.tokenizer.token_byte_lengths`).
        batch_size: blocks per forward pass.
        device: where the model is.
        progress: called with (blocks done, total blocks) after each batch.
        extra_forwards: forward passes to run on one row after the real ones, results
            discarded, so that every process runs the same number (FSDP and ZeRO-3 gather
            parameters in each forward: a process that stops early would hang the others).
        filler: the blocks whose first row those passes read; default ``blocks``.

    Returns:
        Total nats, scored target tokens and their UTF-8 bytes (for loss, perplexity, bits per
        byte: :class:`llmkit.core.metrics.NLLSums`).
    """
    from llmkit.core.loading import silence_padding_warning

    # Packed blocks hold EOS (= pad) as real text and no attention mask is passed on purpose.
    silence_padding_warning(model)
    get = _row_reader(blocks)
    n = len(blocks)
    bytes_per_id = torch.as_tensor(token_bytes, dtype=torch.long).to(device)
    sums = NLLSums()
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        for start in range(0, n, batch_size):
            got = get(start, min(start + batch_size, n))
            batch = {k: v.long().to(device) for k, v in got.items()}  # each (B, T)
            inputs, targets = split_batch(batch)
            logits = model(**inputs).logits  # (B, T-1, vocab_size)
            sums.add(nll_sums(logits, targets, bytes_per_id))
            if progress is not None:
                progress(min(start + batch_size, n), n)
        if extra_forwards:
            one = _row_reader(blocks if filler is None else filler)(0, 1)
            one = {k: v.long().to(device) for k, v in one.items()}  # each (1, T)
            for _ in range(extra_forwards):
                model(**split_batch(one)[0])
    finally:
        if was_training:
            model.train()
    return sums
