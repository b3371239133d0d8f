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


# --------------------------------------------------------------------------- SFT packing
X = -100
#: (input_ids, labels) conversations: A trained on all its tokens, B and C on their answers,
#: D longer than a row of 8, E with nothing to learn, F the last.
CONVERSATIONS = [
    ([11, 12, 13], [11, 12, 13]),
    ([21, 22, 23, 24], [X, X, 23, 24]),
    ([31, 32], [X, 32]),
    ([41] * 10, [X] * 3 + [41] * 7),
    ([51, 52, 53], [X, X, X]),
    ([61, 62, 63, 64, 65, 66], [X, 62, 63, 64, 65, 66]),
]


def _pack_all(packer, conversations, per_batch):
    parts = [
        packer.add(conversations[i : i + per_batch])
        for i in range(0, len(conversations), per_batch)
    ]
    parts.append(packer.flush())
    return {
        k: np.concatenate([p[k] for p in parts]) for k in ("input_ids", "labels", "position_ids")
    }


@pytest.mark.parametrize("per_batch", [1, 2, 6])
def test_sft_rows_truncate_layout_and_counters(per_batch):
    from llmkit.data.pack import SFTPacker

    packer = SFTPacker(8, pad_token_id=0)
    rows = _pack_all(packer, CONVERSATIONS, per_batch)
    assert rows["input_ids"].dtype == np.int32
    assert rows["input_ids"].tolist() == [
        [11, 12, 13, 21, 22, 23, 24, 0],  # A B, 1 pad: C does not fit in the last slot
        [31, 32, 0, 0, 0, 0, 0, 0],  # C, then D (truncated to 8) needs a row of its own
        [41] * 8,  # D cut to block_size; E has no target and is not written
        [61, 62, 63, 64, 65, 66, 0, 0],  # F, padded by flush
    ]
    assert rows["labels"].tolist() == [
        [X, 12, 13, X, X, 23, 24, X],  # A's first label is -100 (nothing of its own before it)
        [X, 32, X, X, X, X, X, X],
        [X, X, X, 41, 41, 41, 41, 41],
        [X, 62, 63, 64, 65, 66, X, X],
    ]
    assert rows["position_ids"].tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0],
        [0, 1, 0, 1, 2, 3, 4, 5],  # padding is a segment of its own, from 0
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 3, 4, 5, 0, 1],
    ]
    assert packer.stats() == {
        "conversations": 6,
        "truncated": 1,
        "dropped": 0,
        "no_answer": 1,
        "rows": 4,
        "tokens": 23,
        "answer_tokens": 15,
        "pad_tokens": 9,
        "cut_tokens": 5,  # 2 of D, 3 of E
    }
    assert packer.rows * 8 == packer.tokens + packer.pad_tokens
    assert packer.answer_tokens == int((rows["labels"] != X).sum())
    assert CONVERSATIONS[0][1] == [11, 12, 13]  # the caller's labels are not changed


def test_sft_rows_drop_rule():
    from llmkit.data.pack import SFTPacker

    packer = SFTPacker(8, pad_token_id=99, overlong="drop")
    rows = _pack_all(packer, CONVERSATIONS, 6)
    assert rows["input_ids"].tolist() == [
        [11, 12, 13, 21, 22, 23, 24, 99],
        [31, 32, 61, 62, 63, 64, 65, 66],  # D dropped: F fits after C
    ]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert rows["labels"][1].tolist() == [X, 32, X, 62, 63, 64, 65, 66]
    assert packer.stats() == {
        "conversations": 6,
        "truncated": 0,
        "dropped": 1,
        "no_answer": 1,
        "rows": 2,
        "tokens": 15,
        "answer_tokens": 10,
        "pad_tokens": 1,
        "cut_tokens": 13,
    }
    assert packer.flush()["input_ids"].shape == (0, 8)


def test_truncation_that_leaves_no_answer_is_not_written():
    from llmkit.data.pack import SFTPacker

    packer = SFTPacker(4, pad_token_id=0)
    long_prompt = ([1, 2, 3, 4, 5, 6], [X, X, X, X, X, 6])
    assert packer.add([long_prompt])["input_ids"].shape == (0, 4)
    assert packer.flush()["input_ids"].shape == (0, 4)
    assert (packer.no_answer, packer.truncated, packer.rows, packer.cut_tokens) == (1, 0, 0, 6)


def test_sft_rows_do_not_depend_on_batching_and_keep_every_conversation_whole():
    from llmkit.data.pack import SFTPacker

    rng = np.random.default_rng(0)
    convs = []
    for _ in range(60):
        n = int(rng.integers(2, 40))
        ids = rng.integers(1, 500, size=n).tolist()
        cut = int(rng.integers(1, n))
        convs.append((ids, [X] * cut + ids[cut:]))
    results = []
    for per_batch in (1, 7, 60):
        packer = SFTPacker(32, pad_token_id=0)
        results.append((_pack_all(packer, convs, per_batch), packer.stats()))
    (rows, stats), *others = results
    for other_rows, other_stats in others:
        assert other_stats == stats
        assert all((other_rows[k] == rows[k]).all() for k in rows)
    # cut each row into its conversations at the position restarts: in order, whole
    written = [(ids, lab) for ids, lab in convs if any(x != X for x in lab[1:32])]
    kept = [(ids[:32], lab[:32]) for ids, lab in written]
    assert stats["no_answer"] == len(convs) - len(kept) > 0
    found = []
    for ids, lab, pos in zip(rows["input_ids"], rows["labels"], rows["position_ids"], strict=True):
        starts = [t for t in range(32) if pos[t] == 0] + [32]
        for a, b in zip(starts, starts[1:], strict=False):
            if (lab[a:b] == X).all() and (ids[a:b] == 0).all():
                continue  # padding
            found.append((ids[a:b].tolist(), lab[a:b].tolist()))
    assert [f[0] for f in found] == [k[0] for k in kept]
    assert [f[1] for f in found] == [[X] + k[1][1:] for k in kept]
    assert stats["truncated"] == sum(len(ids) > 32 for ids, _ in written) > 0
    assert stats["rows"] * 32 == stats["tokens"] + stats["pad_tokens"]


def test_sft_packer_rejects_bad_input():
    from llmkit.data.pack import SFTPacker

    with pytest.raises(ValueError, match="block_size"):
        SFTPacker(0, pad_token_id=0)
    with pytest.raises(ValueError, match="overlong"):
        SFTPacker(4, pad_token_id=0, overlong="split")
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        SFTPacker(4, pad_token_id=0).add([([1, 2, 3], [X, 2])])
    empty = SFTPacker(4, pad_token_id=0).add([])
    assert {k: v.shape for k, v in empty.items()} == {
        "input_ids": (0, 4),
        "labels": (0, 4),
        "position_ids": (0, 4),
    }
