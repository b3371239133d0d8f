"""Tokenize and pack for ``llmkit prepare``: documents to token ids with one EOS each, blocks
of a packed split, conversations rendered with their labels, and the pretrained tokenizer.

Pure functions of a batch (no processes, no files): :mod:`llmkit.data.pipeline` runs them over
the splits (``datasets.map``, on worker processes for large corpora).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from llmkit.data.pack import Packer, SFTPacker
from llmkit.errors import UserError

#: Documents per batch in the encode and pack steps (memory holds one batch of documents).
BATCH_DOCUMENTS = 1000

#: Text (UTF-8 bytes) per batch in the tokenizer-training, encode and pack steps: a batch
#: holds at most BATCH_DOCUMENTS documents and, when they are long, only as many as fit in
#: this much text (at least one; :func:`batch_rows`). Encoding takes about 200 bytes per token
#: while a batch is in flight (the Rust encodings, then the ids as Python ints): measured here,
#: 16 MiB batches of 1 MiB documents peaked at 1.2 GB, so 4 MiB keeps it near 0.3 GB.
BATCH_BYTES = 4 << 20


def _encode_raw(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: the Rust encoder, without offsets
        encodings = backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def tokenizer_appends_eos(tokenizer) -> bool:
    """True when ``tokenizer`` itself ends an encoded text with its EOS token."""
    eos = tokenizer.eos_token_id
    with_special = _encode_raw(tokenizer, ["a"], True)[0]
    without = _encode_raw(tokenizer, ["a"], False)[0]
    return bool(with_special) and with_special[-1] == eos and (not without or without[-1] != eos)


def encode_batch(
    texts: list[str], tokenizer, *, eos_token_id: int, append_eos: bool = True
) -> list[list[int]]:
    """Token ids of each document, with exactly one EOS at its end.

    The tokenizer's own special tokens are added (a tokenizer that adds BOS gives one BOS per
    document); ``eos_token_id`` is appended when ``append_eos`` is true, which it must be
    unless the tokenizer already appends EOS itself (:func:`tokenizer_appends_eos`).

    Args:
        texts: a batch of documents.
        tokenizer: a ``transformers`` tokenizer (the fast Rust encoder is used when present).
        eos_token_id: the id that ends each document.
        append_eos: append ``eos_token_id`` to each document.

    Returns:
        One list of token ids per document.
    """
    ids = _encode_raw(tokenizer, texts, True)
    if append_eos:
        for row in ids:
            row.append(eos_token_id)
    return ids


def _encode_for_map(batch: dict, tokenizer, eos_token_id: int, append_eos: bool) -> dict:
    """``datasets.map`` form of :func:`encode_batch` (top level, so that it pickles)."""
    ids = encode_batch(batch["text"], tokenizer, eos_token_id=eos_token_id, append_eos=append_eos)
    return {"input_ids": ids}


def _block_rows(
    encoded, packer: Packer, advance: Callable, batch_size: int = BATCH_DOCUMENTS
) -> Iterator[dict]:
    """Rows ``{"input_ids"}`` of full blocks of an encoded split (documents in order)."""
    import pyarrow.compute as pc

    for table in encoded.with_format("arrow").iter(batch_size=batch_size):
        flat = pc.list_flatten(table.column("input_ids")).to_numpy()
        for block in packer.add_tokens(flat):
            yield {"input_ids": block}
        advance(table.num_rows)


@contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=false`` for the duration (restored after): set before forking
    worker processes, each with a pickled tokenizer running one thread, so that `tokenizers`
    does not warn about a fork after its thread pool started."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def batch_rows(max_document_bytes: int) -> int:
    """Documents per batch when the longest is ``max_document_bytes`` long:
    :data:`BATCH_DOCUMENTS`, or fewer so that a batch holds about :data:`BATCH_BYTES` of text
    at most (never fewer than 1)."""
    return max(1, min(BATCH_DOCUMENTS, BATCH_BYTES // max(1, int(max_document_bytes))))


def chat_training_text(messages: Sequence[dict[str, str]]) -> str:
    """What a byte-level BPE trained for chat data learns from one conversation: each message
    as ``role\n content\n`` — the text ChatML writes between its marker tokens (which are
    special tokens of the tokenizer, never merged with text)."""
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def encode_chat_batch(
    conversations: Sequence[str], wheres: Sequence[str], tokenizer, *, train_on: str
) -> dict[str, list]:
    """Render and tokenize a batch of conversations with their labels (the encode step).

    Each conversation (its JSON list of messages) is rendered with the tokenizer's chat
    template and its trained character spans found (:func:`llmkit.data.sft.answer_spans`, one
    at a time, so that one bad conversation does not stop the others); the renderings are then
    tokenized in one batched call (:func:`llmkit.data.sft.tokenize_with_labels`).

    Args:
        conversations: N conversations, each a JSON list of ``{"role", "content"}``.
        wheres: their places (``file:line``) for error messages.
        tokenizer: a fast tokenizer with a chat template.
        train_on: ``"assistant"`` (labels on the answers and their end-of-turn token only) or
            ``"all"``.

    Returns:
        Columns of N rows: ``input_ids`` and ``labels`` (lists of ints of equal length; empty
        for a conversation that failed), ``error`` and ``hint`` (None, or the UserError's
        message and hint of a conversation that failed to render), ``reason`` (None, or the
        error's reason code, :attr:`llmkit.errors.UserError.reason`), ``located`` (JSON of how
        its answers were found, ``{rule: count}``, :data:`llmkit.data.sft.LOCATE_RULES`).
    """
    from llmkit.data.sft import answer_spans, tokenize_with_labels

    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    errors: list[str | None] = []
    hints: list[str | None] = []
    reasons: list[str | None] = []
    located: list[str | None] = []
    for conversation, where in zip(conversations, wheres, strict=True):
        counts: dict[str, int] = {}
        try:
            text, found = answer_spans(
                tokenizer, json.loads(conversation), train_on=train_on, where=where, located=counts
            )
        except UserError as err:
            errors.append(err.message)
            hints.append(err.hint)
            reasons.append(err.reason)
            located.append(None)
            continue
        reasons.append(None)
        located.append(json.dumps(counts))
        texts.append(text)
        spans.append(found)
        errors.append(None)
        hints.append(None)
    ids, labels = tokenize_with_labels(tokenizer, texts, spans)
    encoded = iter(zip(ids, labels, strict=True))
    out_ids: list[list[int]] = []
    out_labels: list[list[int]] = []
    for error in errors:
        row_ids, row_labels = ([], []) if error is not None else next(encoded)
        out_ids.append(row_ids)
        out_labels.append(row_labels)
    return {
        "input_ids": out_ids,
        "labels": out_labels,
        "error": errors,
        "hint": hints,
        "reason": reasons,
        "located": located,
    }


def _encode_chat_for_map(batch: dict, tokenizer, train_on: str) -> dict:
    """``datasets.map`` form of :func:`encode_chat_batch` (top level, so that it pickles)."""
    return encode_chat_batch(batch["text"], batch["where"], tokenizer, train_on=train_on)


def _sft_rows(
    encoded,
    packer: SFTPacker,
    *,
    on_error: str,
    skipped: dict,
    first: list,
    advance,
    located: dict | None = None,
) -> Iterator[dict]:
    """Rows ``{"input_ids", "labels", "position_ids"}`` of the packed conversations of an
    encoded split, in order. A conversation that failed to render stops the run
    (``on_error="fail"``: the first one in order, so the error does not depend on
    ``num_proc``) or is counted in ``skipped`` by its reason code (``"skip"``; the error's
    ``reason`` field, else ``"render failed"``; its message in ``first`` when it is the
    first). How the answers were located is summed into ``located``."""

    def rows_of(block: dict) -> Iterator[dict]:
        for i in range(len(block["input_ids"])):
            yield {k: block[k][i] for k in ("input_ids", "labels", "position_ids")}

    for batch in encoded.iter(batch_size=BATCH_DOCUMENTS):
        conversations = []
        for ids, labels, error, hint, code in zip(
            batch["input_ids"],
            batch["labels"],
            batch["error"],
            batch["hint"],
            batch["reason"],
            strict=True,
        ):
            if error is not None:
                if on_error != "skip":
                    raise UserError(error, hint, reason=code)
                reason = code or "render failed"  # every record error carries its code
                skipped[reason] = skipped.get(reason, 0) + 1
                if not first:
                    first.append(error)
                continue
            conversations.append((ids, labels))
        for counts in batch["located"] if located is not None else ():
            for rule, n in json.loads(counts or "{}").items():
                located[rule] = located.get(rule, 0) + n
        yield from rows_of(packer.add(conversations))
        advance(len(batch["error"]))
    yield from rows_of(packer.flush())


def load_pretrained_tokenizer(name: str, *, trust_remote_code: bool = False):
    """A pretrained tokenizer, read as the model's own loader reads it:
    :func:`llmkit.core.loading.load_source_tokenizer`.

    A directory (or Hub id, online) is :func:`llmkit.core.tokenizer.load_tokenizer`; a
    ``.gguf`` model file is its cached conversion when there is a current one, else its
    metadata with llmkit's corrections (SmolLM2's digit split), so that the ids prepare writes
    are the ids the model sees whether the cache is warm or cold.

    ``trust_remote_code``: see :func:`llmkit.core.tokenizer.load_tokenizer` (False: a
    tokenizer that needs its own Python code is refused, never run).

    Raises:
        UserError: nothing loadable at ``name``; a ``.gguf`` without the gguf package; a
            tokenizer that needs its own code without ``trust_remote_code``.
    """
    from llmkit.core.loading import load_source_tokenizer

    return load_source_tokenizer(name, trust_remote_code=trust_remote_code)


def _chat_tokenizer(tok, template: str, name: str) -> dict:
    """Give a pretrained tokenizer its chat template (:func:`llmkit.data.sft.
    ensure_chat_template`) before anything is read; returns ``{"resolved", "added_tokens"}``.

    Raises:
        UserError: a slow tokenizer (no character offsets to place the labels); the template
            asked for cannot be had.
    """
    from llmkit.data.sft import ensure_chat_template

    if not getattr(tok, "is_fast", False):
        raise UserError(
            f"the tokenizer at {name} is a slow (Python) tokenizer: chat data needs a fast one",
            "use a tokenizer directory that holds tokenizer.json",
        )
    before = set(tok.get_vocab())
    resolved = ensure_chat_template(tok, template)
    added = sorted(set(tok.get_vocab()) - before)
    return {"resolved": resolved, "added_tokens": added}
