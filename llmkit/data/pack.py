"""Packing: concatenate tokenized documents and cut the stream into blocks (SPEC §2, stage 6).

Every document already ends with its EOS token (see :func:`llmkit.data.pipeline.encode_batch`),
so the concatenation is ``doc_1 EOS doc_2 EOS ...``. It is cut into rows of exactly
``block_size`` tokens; what is left at the end of the split (fewer than ``block_size`` tokens)
is the one *tail*, reported and not written. No other token is lost, and the blocks do not
depend on how the documents were batched on their way in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

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
