"""Packing: concatenate tokenized documents and cut the stream into blocks (SPEC §2, stage 6).

Every document already ends with its EOS token (see :func:`llmkit.data.pipeline.encode_batch`),
so the concatenation is ``doc_1 EOS doc_2 EOS ...``. It is cut into rows of exactly
``block_size`` tokens; what is left at the end of the split (fewer than ``block_size`` tokens)
is the one *tail*, reported and not written. No other token is lost, and the blocks do not
depend on how the documents were batched on their way in.

Chat data is packed differently (:class:`SFTPacker`): a conversation is never cut between two
rows, so that its label mask and its positions stay whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from llmkit.core.prepared import IGNORE_INDEX
from llmkit.data.choices import OVERLONG_RULES

TOKEN_DTYPE = np.int32


class Packer:
    """Cut a stream of token ids into blocks of ``block_size`` tokens, carrying the remainder.

    >>> p = Packer(4)
    >>> p.add([[1, 2, 3, 0], [4, 5, 0]]).tolist()
    [[1, 2, 3, 0]]
    >>> p.add([[6, 7, 8, 9, 0]]).tolist()
    [[4, 5, 0, 6], [7, 8, 9, 0]]
    >>> p.tail.tolist()
    []

    Attributes:
        block_size: tokens per block.
        tokens_in: tokens added so far.
        blocks_out: blocks returned so far.
    """

    def __init__(self, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1 token, got {block_size}")
        self.block_size = block_size
        self.tokens_in = 0
        self.blocks_out = 0
        self._rest = np.empty(0, dtype=TOKEN_DTYPE)

    def add(self, documents: Iterable[Sequence[int]]) -> np.ndarray:
        """Add tokenized documents (each a sequence of ids, EOS included); return full blocks.

        Returns:
            int32 array of shape (n_blocks, block_size); ``n_blocks`` may be 0.
        """
        parts = [np.asarray(doc, dtype=TOKEN_DTYPE).ravel() for doc in documents]
        if not parts:
            return self.add_tokens(np.empty(0, dtype=TOKEN_DTYPE))
        return self.add_tokens(np.concatenate(parts))

    def add_tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Add a flat run of token ids (documents already concatenated); return full blocks.

        Returns:
            int32 array of shape (n_blocks, block_size); ``n_blocks`` may be 0.
        """
        ids = np.asarray(ids, dtype=TOKEN_DTYPE).ravel()
        self.tokens_in += int(ids.size)
        buffer = np.concatenate([self._rest, ids]) if self._rest.size else ids
        n_blocks = buffer.size // self.block_size
        cut = n_blocks * self.block_size
        self._rest = buffer[cut:].copy()
        self.blocks_out += n_blocks
        return buffer[:cut].reshape(n_blocks, self.block_size)

    @property
    def tail(self) -> np.ndarray:
        """The tokens not yet in a block (fewer than ``block_size``), as an int32 array."""
        return self._rest.copy()

    @property
    def tail_tokens(self) -> int:
        """Number of tokens in :attr:`tail`."""
        return int(self._rest.size)


class SFTPacker:
    """Pack whole conversations into rows of exactly ``block_size`` tokens (greedy, in order).

    Each conversation (its ``input_ids`` and ``labels`` from
    :func:`llmkit.data.sft.render_with_labels`) goes at the end of the current row when it fits
    in the room left; otherwise the current row is closed — its rest filled with padding — and
    the conversation starts a new row. A conversation longer than ``block_size`` is cut to its
    first ``block_size`` tokens (``overlong="truncate"``, the default) or left out
    (``"drop"``); either way it is counted. The rows do not depend on how the conversations
    were batched on their way in.

    Each row has three int32 columns of ``block_size``:

    - ``input_ids``: the conversations' tokens, then ``pad_token_id`` to the end;
    - ``labels``: the conversations' labels, except that the first label of every conversation
      is -100 (its first token has nothing of its own before it to be predicted from: in a row
      it would be predicted from the previous conversation's last token); -100 on padding;
    - ``position_ids``: ``0, 1, ..., n-1`` for each conversation of n tokens, and
      ``0, 1, ..., k-1`` for the k padding tokens (the padding is a segment of its own, which
      attends only to itself).

    A model sees each conversation alone when it is given ``position_ids`` and no 2D attention
    mask; see :func:`llmkit.data.sft.packed_attention_mask`. Padding never enters the loss
    (its labels are -100, and so is the label of the first token after it).

    A conversation left with no label other than -100 (its answers truncated away, or none) is
    not written: nothing could be learnt from it.

    >>> p = SFTPacker(6, pad_token_id=0)
    >>> rows = p.add([([5, 6, 7], [-100, 6, 7]), ([8, 9, 10, 11], [-100, -100, 10, 11])])
    >>> rows["input_ids"].tolist(), rows["labels"].tolist(), rows["position_ids"].tolist()
    ([[5, 6, 7, 0, 0, 0]], [[-100, 6, 7, -100, -100, -100]], [[0, 1, 2, 0, 1, 2]])
    >>> p.flush()["input_ids"].tolist()
    [[8, 9, 10, 11, 0, 0]]

    Counters (attributes, and :meth:`stats` for the manifest), all in conversations or tokens:

    - ``conversations``: conversations given to :meth:`add`;
    - ``truncated``: written cut to ``block_size`` (``overlong="truncate"``);
    - ``dropped``: left out for being longer than ``block_size`` (``overlong="drop"``);
    - ``no_answer``: left out for having no target label (after truncation);
    - ``rows``: rows returned;
    - ``tokens``: conversation tokens written (padding excluded);
    - ``answer_tokens``: labels other than -100 written (the training targets);
    - ``pad_tokens``: padding tokens written; ``rows * block_size == tokens + pad_tokens``;
    - ``cut_tokens``: tokens not written: cut by truncation, or in a conversation left out.

    Args:
        block_size: tokens per row.
        pad_token_id: the id written on padding (the tokenizer's pad token).
        overlong: ``"truncate"`` or ``"drop"``.

    Raises:
        ValueError: ``block_size`` below 1, an unknown ``overlong`` rule, or (in :meth:`add`)
            a conversation whose ids and labels differ in length.
    """

    COUNTERS = (
        "conversations",
        "truncated",
        "dropped",
        "no_answer",
        "rows",
        "tokens",
        "answer_tokens",
        "pad_tokens",
        "cut_tokens",
    )

    def __init__(self, block_size: int, *, pad_token_id: int, overlong: str = "truncate"):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1 token, got {block_size}")
        if overlong not in OVERLONG_RULES:
            raise ValueError(f"overlong must be one of {', '.join(OVERLONG_RULES)}: {overlong!r}")
        self.block_size = block_size
        self.pad_token_id = int(pad_token_id)
        self.overlong = overlong
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self._new_row()

    def _new_row(self) -> None:
        self._ids = np.full(self.block_size, self.pad_token_id, dtype=TOKEN_DTYPE)
        self._labels = np.full(self.block_size, IGNORE_INDEX, dtype=TOKEN_DTYPE)
        self._pos = np.zeros(self.block_size, dtype=TOKEN_DTYPE)
        self._fill = 0

    def _close_row(self, out: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        pad = self.block_size - self._fill
        self._pos[self._fill :] = np.arange(pad, dtype=TOKEN_DTYPE)
        out.append((self._ids, self._labels, self._pos))
        self.pad_tokens += pad
        self.rows += 1
        self._new_row()

    def _rows(self, out: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        shape = (len(out), self.block_size)
        if not out:
            empty = np.empty(shape, dtype=TOKEN_DTYPE)
            return {"input_ids": empty, "labels": empty.copy(), "position_ids": empty.copy()}
        return {
            "input_ids": np.stack([r[0] for r in out]),
            "labels": np.stack([r[1] for r in out]),
            "position_ids": np.stack([r[2] for r in out]),
        }

    def add(
        self, conversations: Iterable[tuple[Sequence[int], Sequence[int]]]
    ) -> dict[str, np.ndarray]:
        """Add ``(input_ids, labels)`` conversations; return the rows they completed.

        Returns:
            ``{"input_ids", "labels", "position_ids"}``, each an int32 array of shape
            (n_rows, block_size); ``n_rows`` may be 0.
        """
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        T = self.block_size
        for input_ids, labels in conversations:
            ids = np.asarray(input_ids, dtype=TOKEN_DTYPE).ravel()
            lab = np.array(labels, dtype=TOKEN_DTYPE).ravel()  # a copy: changed below
            if ids.size != lab.size:
                raise ValueError(f"a conversation has {ids.size} input_ids but {lab.size} labels")
            self.conversations += 1
            n = int(ids.size)
            truncated = n > T
            if truncated and self.overlong == "drop":
                self.dropped += 1
                self.cut_tokens += n
                continue
            if truncated:
                ids, lab = ids[:T], lab[:T]
            if lab.size:
                lab[0] = IGNORE_INDEX
            if not (lab != IGNORE_INDEX).any():
                self.no_answer += 1
                self.cut_tokens += n
                continue
            self.truncated += int(truncated)
            self.cut_tokens += n - int(ids.size)
            m = int(ids.size)
            if self._fill + m > T:
                self._close_row(out)
            end = self._fill + m
            self._ids[self._fill : end] = ids
            self._labels[self._fill : end] = lab
            self._pos[self._fill : end] = np.arange(m, dtype=TOKEN_DTYPE)
            self._fill = end
            self.tokens += m
            self.answer_tokens += int((lab != IGNORE_INDEX).sum())
            if self._fill == T:
                self._close_row(out)
        return self._rows(out)

    def flush(self) -> dict[str, np.ndarray]:
        """Close the last, partly filled row (padded to ``block_size``) and return it.

        Returns:
            The same columns as :meth:`add`, with 1 row, or 0 when no row was open.
        """
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if self._fill:
            self._close_row(out)
        return self._rows(out)

    def stats(self) -> dict[str, int]:
        """The counters, by name (see the class docstring)."""
        return {name: int(getattr(self, name)) for name in self.COUNTERS}
