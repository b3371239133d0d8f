"""Blocks cut per shard from running token totals equal llmkit.data.pack.Packer's, row by row."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llmkit.data.distributed.pack import running_offsets, shard_blocks, split_stats
from llmkit.data.pack import Packer
from llmkit.data.pipeline import encode_batch


@pytest.fixture(scope="module")
def encoded(shakespeare, tiny_tokenizer):
    docs = shakespeare.read_text(encoding="utf-8")[:200_000].split("\n\n")
    return encode_batch(docs, tiny_tokenizer, eos_token_id=tiny_tokenizer.eos_token_id)


def _shards(encoded, n, rng):
    cuts = sorted(rng.randrange(len(encoded) + 1) for _ in range(n - 1))
    bounds = [0, *cuts, len(encoded)]
    return [encoded[bounds[k] : bounds[k + 1]] for k in range(n)]


@pytest.mark.parametrize("block_size", [7, 128, 1024, 5000])
@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_per_shard_blocks_equal_packer(encoded, block_size, n):
    rng = random.Random(n * 1000 + block_size)
    shards = _shards(encoded, n, rng)
    flat = [np.concatenate([np.asarray(d) for d in s]) if s else np.empty(0) for s in shards]
    counts = [f.size for f in flat]
    offsets = running_offsets(counts)
    total = sum(counts)
    got = [
        shard_blocks(flat[s], offsets[s], total, block_size, following=flat[s + 1 :])
        for s in range(n)
    ]
    packer = Packer(block_size)
    ref = np.concatenate([packer.add(encoded[i : i + 333]) for i in range(0, len(encoded), 333)])
    mine = np.concatenate(got)
    assert mine.dtype == ref.dtype == np.int32
    assert mine.shape == ref.shape and ref.shape[0] > 0
    assert (mine == ref).all()
    assert split_stats(total, block_size) == {
        "tokens": packer.tokens_in,
        "blocks": packer.blocks_out,
        "tail_tokens": packer.tail_tokens,
    }
    # the next shards are read only as far as needed: under one block
    reads = []

    def following(s):
        for f in flat[s + 1 :]:
            reads.append(f.size)
            yield f

    for s in range(n):
        reads.clear()
        shard_blocks(flat[s], offsets[s], total, block_size, following=following(s))
        assert sum(reads[:-1]) < block_size


def test_counts_that_disagree_with_the_tokens_are_an_error():
    with pytest.raises(ValueError, match="tokens short"):
        shard_blocks(np.arange(5), 0, 10, 8, following=[np.arange(2)])
