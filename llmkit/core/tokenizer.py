"""Tokenizers: train a byte-level BPE on a corpus, load a pretrained one, count bytes per token.

A trained tokenizer is GPT-2's scheme (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", §2.2): byte-level BPE over a 256-symbol base alphabet, so every string
round-trips exactly, with ``<|endoftext|>`` as the one special token (EOS, BOS and padding).
It is saved as a transformers tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) so that
``AutoTokenizer.from_pretrained(DIR)`` loads it. For chat data it can also hold the chat
template's marker tokens (``extra_special_tokens``, e.g. ChatML's ``<|im_start|>`` and
``<|im_end|>``, :data:`llmkit.data.sft.CHATML`), so that no token has to be added later.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import UserError

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    length: int | None = None,
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
):
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: the documents (an iterator is fine; it is consumed once).
        vocab_size: size of the vocabulary in tokens, the 256 byte symbols and the special
            tokens included; must be at least 257 plus the extra special tokens.
        length: number of documents, for the trainer's progress display only.
        min_frequency: a pair must occur this many times to be merged.
        extra_special_tokens: more special tokens, ids 1, 2, ... after ``<|endoftext|>`` (0):
            never split, never merged with text, 0 bytes in :func:`token_byte_lengths`.

    Returns:
        A ``transformers`` fast tokenizer whose EOS, BOS and PAD are ``<|endoftext|>``; no
        special token is added by ``encode`` (documents get their EOS during packing).

    Raises:
        UserError: ``vocab_size`` below 257 plus the extra special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    extra = [t for t in dict.fromkeys(extra_special_tokens) if t != EOS_TOKEN]
    if vocab_size < 257 + len(extra):
        specials = " and ".join([EOS_TOKEN, *extra])
        raise UserError(
            f"--vocab-size {vocab_size} is too small",
            f"a byte-level BPE needs 256 byte symbols plus {specials}: use at least "
            f"{257 + len(extra)}",
        )
    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenization regex splits words, numbers and whitespace runs before merging.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=extra,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False, **kwargs: Any):
    """Load a pretrained tokenizer with ``AutoTokenizer`` (a directory, or a Hub id when online).

    A tokenizer without a padding token gets its EOS as padding (needed for batches).
    ``trust_remote_code`` is always passed to transformers (never left unset, which would ask
    on standard input): a tokenizer whose ``tokenizer_config.json`` names Python code of its
    own (``auto_map``) loads only with ``trust_remote_code=True``.

    Raises:
        UserError: nothing loadable at ``name_or_path``; the tokenizer needs its own code and
            ``trust_remote_code`` is False; or it has no EOS token.
    """
    from transformers import AutoTokenizer

    from llmkit.security import is_remote_code_error, remote_code_error

    if "gguf_file" not in kwargs:
        _check_tokenizer_source(str(name_or_path))
    try:
        tok = AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as err:
        if is_remote_code_error(err):
            raise remote_code_error(str(name_or_path)) from None
        raise UserError(
            f"cannot load a tokenizer from {name_or_path}: {str(err).splitlines()[0]}",
            "give a directory holding tokenizer.json (or tokenizer_config.json), or a Hub id",
        ) from err
    if tok.eos_token_id is None:
        raise UserError(
            f"the tokenizer at {name_or_path} has no EOS token",
            "documents are separated by EOS; use a tokenizer that defines eos_token",
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


#: Files one of which a tokenizer directory holds (transformers' fast and slow tokenizers:
#: tokenizers' JSON, the config, GPT-2's vocab/merges, BERT's vocab, SentencePiece models).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_TOKENIZER_HINT = (
    "give a directory holding tokenizer.json or tokenizer_config.json (a model's, or a "
    "`llmkit prepare` output), a .gguf model file, or a Hub id when online"
)


def _check_tokenizer_source(name: str) -> None:
    """Refuse what cannot hold a tokenizer before transformers tries, with a message that says
    why (transformers' own named a file as "not a valid JSON file", a directory without one
    as "Couldn't instantiate the backend tokenizer from one of: ", and spent five retries,
    about 40 s, on a Hub id while offline).

    Raises:
        UserError: a file (not a ``.gguf``, which :func:`llmkit.core.loading.
            load_source_tokenizer` reads); a directory with none of :data:`TOKENIZER_FILES`;
            a path that does not exist; a Hub id while the Hub is unreachable and the id is
            not in the local Hugging Face cache.
    """
    from llmkit.core.loading import _hub_offline, _looks_like_path, hub_status

    path = Path(name).expanduser()
    if path.is_file():
        raise UserError(f"tokenizer {name} is a file, not a tokenizer directory", _TOKENIZER_HINT)
    if path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(
                f"{name} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, ...)",
                _TOKENIZER_HINT,
            )
        return
    if _looks_like_path(name) or name.count("/") > 1 or not name.strip():
        raise UserError(f"tokenizer {name} does not exist", _TOKENIZER_HINT)
    reachable, why = hub_status()
    if reachable:
        return
    _hub_offline()  # no retries: the answer comes at once
    from huggingface_hub import try_to_load_from_cache

    cached = any(
        isinstance(try_to_load_from_cache(name, f), str)
        for f in ("tokenizer.json", "tokenizer_config.json")
    )
    if not cached:
        raise UserError(
            f"cannot load a tokenizer from {name}: there is no such directory, the Hub is not "
            f"reachable ({why}) and {name} is not in the local Hugging Face cache",
            _TOKENIZER_HINT,
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters.

    Source: openai/gpt-2 ``src/encoder.py`` (``bytes_to_unicode``); the same table is used by
    the ``tokenizers`` ByteLevel pre-tokenizer.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


def token_byte_lengths(tokenizer) -> np.ndarray:
    """Number of UTF-8 bytes each token id stands for, as an int64 array of shape (vocab,).

    Bits per byte sums these over the target tokens (the method of nanochat's
    ``get_token_bytes``): special tokens (EOS, padding) count 0 bytes. For a byte-level BPE the
    count is exact — the bytes of all tokens of a text add up to ``len(text.encode())``; for a
    SentencePiece vocabulary ``▁`` counts as one space byte and ``<0xNN>`` as one byte.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    lengths = np.zeros(size, dtype=np.int64)
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    if _is_byte_level(tokenizer):
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        for token, idx in vocab.items():
            if idx in special:
                continue
            if all(c in inverse for c in token):
                lengths[idx] = len(token)
            else:  # an added, non-special token stored as plain text
                lengths[idx] = len(token.encode("utf-8"))
        return lengths
    for token, idx in vocab.items():
        if idx in special:
            continue
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            lengths[idx] = 1
        else:
            lengths[idx] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Yield lists of ``size`` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
