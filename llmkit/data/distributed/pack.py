"""Packing by running token totals: each shard cuts its own blocks, and the blocks of all
shards in order are the blocks of :class:`llmkit.data.pack.Packer` over the whole split.

The rule of :mod:`llmkit.data.pack`: a split's documents (each ending with its EOS) are
concatenated and cut into rows of ``block_size`` tokens; the one tail left at the end of the
split (fewer than ``block_size`` tokens) is not written. With the token count of every shard
of the split known (in global order), shard ``s`` starts at token ``offset_s`` (the running
total of the shards before it) and owns the blocks that *start* inside its tokens and end
before the split's tail: blocks ``k`` with ``offset_s <= k * block_size < offset_s + n_s`` and
``(k + 1) * block_size <= total``. Its last block may run into the next shards' tokens, of
which it reads at most ``block_size - 1`` (:func:`shard_blocks`). A shard whose tokens all
lie inside a block started earlier writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from llmkit.data.pack import TOKEN_DTYPE


def running_offsets(counts: Sequence[int]) -> list[int]:
    """``offsets[s]`` = tokens in shards ``0..s-1`` (the first token of shard ``s``)."""
    out, total = [], 0
    for n in counts:
        out.append(total)
        total += int(n)
    return out


def block_span(offset: int, n_tokens: int, total: int, block_size: int) -> tuple[int, int]:
    """``(first_block, n_blocks)`` owned by a shard of ``n_tokens`` starting at ``offset`` in a
    split of ``total`` tokens (see the module docstring)."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1 token, got {block_size}")
    full = total // block_size
    first = -(-offset // block_size)
    end = min(-(-(offset + n_tokens) // block_size), full)
    return first, max(0, end - first)


def shard_blocks(
    own: np.ndarray,
    offset: int,
    total: int,
    block_size: int,
    following: Iterable[np.ndarray] = (),
) -> np.ndarray:
    """The blocks of one shard.

    Args:
        own: the shard's tokens for the split, its documents concatenated (1-D).
        offset: tokens of the split before this shard (:func:`running_offsets`).
        total: tokens of the whole split.
        block_size: tokens per block.
        following: the next shards' token arrays, in order, read lazily and only as far as
            the shard's last block needs (at most ``block_size - 1`` tokens).

    Returns:
        int32 array of shape ``(n_blocks, block_size)``.

    Raises:
        ValueError: ``following`` ends before the last block is complete (the counts and the
            tokens disagree).
    """
    own = np.asarray(own, dtype=TOKEN_DTYPE).ravel()
    first, n = block_span(offset, own.size, total, block_size)
    if n == 0:
        return np.empty((0, block_size), dtype=TOKEN_DTYPE)
    start = first * block_size - offset
    stop = (first + n) * block_size - offset
    parts, have = [own], own.size
    it: Iterator[np.ndarray] = iter(following)
    while have < stop:
        nxt = next(it, None)
        if nxt is None:
            raise ValueError(f"the following shards end {stop - have} tokens short of a block")
        nxt = np.asarray(nxt, dtype=TOKEN_DTYPE).ravel()[: stop - have]
        parts.append(nxt)
        have += nxt.size
    buf = np.concatenate(parts) if len(parts) > 1 else own
    return buf[start:stop].reshape(n, block_size)


def split_stats(total: int, block_size: int) -> dict[str, int]:
    """What :class:`~llmkit.data.pack.Packer` reports for a split of ``total`` tokens:
    ``tokens``, ``blocks``, ``tail_tokens``."""
    return {
        "tokens": int(total),
        "blocks": int(total // block_size),
        "tail_tokens": int(total % block_size),
    }


def rows_dataset(columns: dict[str, np.ndarray]):
    """A ``datasets.Dataset`` of the rows of ``columns`` (each an integer array ``(rows,
    width)``, the same ``rows``): one ``List(Value("int32"))`` column each, as ``prepare``
    writes its splits. Zero rows give an empty dataset (``Dataset.from_generator`` refuses
    a generator that yields nothing: "corresponds to no data"). Built from arrow list arrays
    over the flat values, in chunks of at most 2**30 values (arrow's 32-bit list offsets)."""
    import pyarrow as pa
    from datasets import Dataset

    chunked = {}
    for name, arr in columns.items():
        arr = np.ascontiguousarray(arr, dtype=TOKEN_DTYPE)
        n, width = arr.shape
        step = max(1, (1 << 30) // max(1, width))
        chunks = []
        for start in range(0, n, step):
            part = arr[start : start + step]
            offsets = np.arange(0, (len(part) + 1) * width, width, dtype=np.int32)
            chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(part.ravel())))
        chunked[name] = pa.chunked_array(chunks, type=pa.list_(pa.int32()))
    return Dataset(pa.table(chunked))  # features: List(Value("int32")) per column
