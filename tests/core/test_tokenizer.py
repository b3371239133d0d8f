"""Tokenizers: exact round trips, byte counts, and one BOS / one EOS per document."""

from __future__ import annotations

import pytest

from llmkit.core.tokenizer import load_tokenizer, token_byte_lengths, train_bpe_tokenizer
from llmkit.data.pipeline import encode_batch, tokenizer_appends_eos
from llmkit.errors import UserError

ROUND_TRIP = [
    "",
    "   ",
    "\n\n",
    "e\u0301",  # e + combining acute (NFD): must come back decomposed, not as é
    "caf\u00e9",
    *("hello" + " " * k + "world" for k in range(1, 9)),
    "\tTabs\tand\r\nCRLF\r\n",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。",
    "emoji 👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "<|endoftext|> is text here? no: a special token",
]


@pytest.fixture(scope="module")
def reloaded_tokenizer(tiny_tokenizer, tmp_path_factory):
    """The tiny tokenizer after save_pretrained and load_tokenizer (what train/eval use)."""
    out = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(out)
    return load_tokenizer(out)


@pytest.mark.parametrize("which", ["trained", "reloaded"])
@pytest.mark.parametrize("text", ROUND_TRIP[:-1])
def test_round_trip_is_exact(tiny_tokenizer, reloaded_tokenizer, which, text):
    tok = tiny_tokenizer if which == "trained" else reloaded_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # byte-level BPE: the bytes of the tokens add up to the UTF-8 bytes of the text
    assert int(token_byte_lengths(tok)[ids].sum()) == len(text.encode("utf-8"))


def test_trained_tokenizer_adds_no_special_token_and_parses_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer.encode("hello", add_special_tokens=True)
    assert eos not in ids
    assert not tokenizer_appends_eos(tiny_tokenizer)
    # A literal "<|endoftext|>" in raw text becomes the EOS token (GPT-2 behaviour).
    assert tiny_tokenizer.encode(ROUND_TRIP[-1], add_special_tokens=False)[0] == eos


def test_vocab_size_is_respected_and_checked():
    docs = ["the quick brown fox jumps over the lazy dog"] * 50
    tok = train_bpe_tokenizer(iter(docs), vocab_size=280)
    assert 257 <= len(tok) <= 280
    with pytest.raises(UserError, match="at least 257"):
        train_bpe_tokenizer(iter(docs), vocab_size=100)


def _template_tokenizer(single: str):
    """A word-level tokenizer over a..e with BOS <s> and EOS </s> added by ``single``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i for i, c in enumerate("abcde", start=3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("single", ["<s> $A", "<s> $A </s>"])
def test_one_bos_and_one_eos_per_document(single):
    tok = _template_tokenizer(single)
    appends = tokenizer_appends_eos(tok)
    assert appends == single.endswith("</s>")
    texts = ["a b", "c", "d e a"]
    ids = encode_batch(texts, tok, eos_token_id=tok.eos_token_id, append_eos=not appends)
    assert ids == [[1, 3, 4, 2], [1, 5, 2], [1, 6, 7, 3, 2]]
    # the fast path gives what the tokenizer's own __call__ gives
    plain = tok(texts, add_special_tokens=True)["input_ids"]
    assert [row[: len(p)] for row, p in zip(ids, plain, strict=True)] == plain


def test_extra_special_tokens_for_chat_markers(tmp_path):
    """A tokenizer trained for chat data holds ChatML's markers from the start: ids 1 and 2,
    never split or merged with text, 0 bytes each, kept through save and load."""
    docs = ["<|im_start|>user\nhello world<|im_end|>\n"] * 30 + ["the quick brown fox"] * 30
    markers = ("<|im_start|>", "<|im_end|>")
    tok = train_bpe_tokenizer(iter(docs), vocab_size=300, extra_special_tokens=markers)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", *markers]) == [0, 1, 2]
    text = "<|im_start|>user\nhello<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert (ids[0], ids[-1]) == (1, 2) and not {0, 1, 2} & set(ids[1:-1])
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids
    assert token_byte_lengths(again)[[0, 1, 2]].tolist() == [0, 0, 0]
    assert int(token_byte_lengths(again)[ids].sum()) == len("user\nhello")
    with pytest.raises(UserError, match="at least 259"):
        train_bpe_tokenizer(iter(docs), vocab_size=258, extra_special_tokens=markers)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("file", "tokenizer {x} is a file, not a tokenizer directory"),
        ("empty", "{x} holds no tokenizer (none of tokenizer.json, tokenizer_config.json, ...)"),
        ("missing", "tokenizer {x} does not exist"),
        (
            "hub",
            "cannot load a tokenizer from {x}: there is no such directory, the Hub is not "
            "reachable (HF_HUB_OFFLINE is set) and {x} is not in the local Hugging Face cache",
        ),
    ],
)
def test_what_cannot_be_a_tokenizer_is_named_as_such(tmp_path, monkeypatch, what, message):
    """transformers said "the config file at 'x.txt' is not a valid JSON file" for a file,
    "Couldn't instantiate the backend tokenizer from one of: " for an empty directory, and
    retried the Hub five times (about 40 s) for an unknown name while offline."""
    from huggingface_hub import constants

    from llmkit.core.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    x = {"file": "notes.txt", "empty": "emptydir", "missing": "./nowhere", "hub": "nope-llmkit"}[
        what
    ]
    if what == "file":
        (tmp_path / x).write_text("not a tokenizer\n")
    elif what == "empty":
        (tmp_path / x).mkdir()
    with pytest.raises(UserError) as err:
        load_tokenizer(x)
    assert err.value.message == message.format(x=x)
    assert "tokenizer.json" in err.value.hint
