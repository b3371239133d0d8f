"""Packing: documents with one EOS each, concatenated and cut into block_size blocks."""

from __future__ import annotations

import numpy as np
import pytest

from llmkit.data.pack import Packer
from llmkit.data.pipeline import encode_batch

DOCS = ["a b c", "d e", "f g h i"]


@pytest.fixture(scope="module")
def letters_tokenizer():
    """A word-level tokenizer: a..i are ids 1..9, <eos> is 0, no special token added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{c: i for i, c in enumerate("abcdefghi", start=1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("docs_per_batch", [1, 2, 3])
def test_issue_example_whatever_the_batch_size(letters_tokenizer, docs_per_batch):
    packer = Packer(4)
    blocks: list[list[int]] = []
    for start in range(0, len(DOCS), docs_per_batch):
        ids = encode_batch(DOCS[start : start + docs_per_batch], letters_tokenizer, eos_token_id=0)
        out = packer.add(ids)
        assert out.dtype == np.int32 and out.shape[1:] == (4,)
        blocks.extend(out.tolist())
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert packer.tail.tolist() == []
    assert (packer.tokens_in, packer.blocks_out, packer.tail_tokens) == (12, 3, 0)


def test_encode_batch_ends_every_document_with_one_eos(letters_tokenizer):
    assert encode_batch(DOCS, letters_tokenizer, eos_token_id=0) == [
        [1, 2, 3, 0],
        [4, 5, 0],
        [6, 7, 8, 9, 0],
    ]


@pytest.mark.parametrize("block_size", [1, 3, 5, 7, 64])
@pytest.mark.parametrize("docs_per_batch", [1, 4, 50])
def test_blocks_plus_tail_are_all_tokens_in_order(block_size, docs_per_batch):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 1000, size=rng.integers(1, 20))) + [0] for _ in range(50)]
    everything = [t for d in docs for t in d]
    packer = Packer(block_size)
    blocks = [packer.add(docs[i : i + docs_per_batch]) for i in range(0, 50, docs_per_batch)]
    stacked = np.concatenate(blocks)
    assert stacked.shape == (len(everything) // block_size, block_size)
    assert stacked.ravel().tolist() + packer.tail.tolist() == everything
    assert packer.tail_tokens == len(everything) % block_size
    assert packer.tokens_in == len(everything)


def test_flat_tokens_and_documents_give_the_same_blocks():
    docs = [[5, 6, 0], [7, 0], [8, 9, 10, 11, 0]]
    by_docs, flat = Packer(3), Packer(3)
    a = by_docs.add(docs)
    b = np.concatenate([flat.add_tokens([5, 6, 0, 7]), flat.add_tokens([0, 8, 9, 10, 11, 0])])
    assert a.tolist() == b.tolist() == [[5, 6, 0], [7, 0, 8], [9, 10, 11]]
    assert by_docs.tail.tolist() == flat.tail.tolist() == [0]


def test_empty_batches_and_bad_block_size():
    packer = Packer(2)
    assert packer.add([]).shape == (0, 2)
    assert packer.add([[1]]).shape == (0, 2)
    assert packer.add([[2, 3]]).tolist() == [[1, 2]]
    assert packer.tail.tolist() == [3]
    with pytest.raises(ValueError, match="block_size"):
        Packer(0)
