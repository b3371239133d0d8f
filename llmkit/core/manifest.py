"""The typed ``manifest.json`` of a prepared directory (:mod:`llmkit.core.prepared`).

``llmkit prepare`` writes it; ``llmkit train`` and ``llmkit eval`` read it through
:class:`Manifest` (``read_manifest`` in :mod:`llmkit.core.prepared`) instead of indexing a dict.

The file format is unchanged by this model: the fields are declared in the order the writer
puts them (for text data and chat data alike, a field one of them lacks is simply not set), and
:meth:`Manifest.to_json` dumps only the fields that were set, so a manifest read and written
back is byte-identical (``tests/test_core_manifest.py`` holds that on both kinds). Keys this
model does not know (a newer llmkit's) are kept, after the known ones.

Typed strictly are the fields a reader relies on (``settings.block_size``, ``settings.format``,
``tokenizer.trained``, ``splits.<name>.blocks``); the counts of the cleaning stages and the
inputs stay JSON objects, described field by field in the README's manifest section.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class _Part(BaseModel):
    """A JSON object of the manifest: unknown keys kept (``extra="allow"``), in their order."""

    model_config = ConfigDict(extra="allow")


class Settings(_Part):
    """``settings``: what ``llmkit prepare`` was asked to do (flags and config, resolved)."""

    format: Literal["text", "chat"] | None = None  # None (or absent): text (before chat data)
    vocab_size: int | None = None  # of a tokenizer prepare trained; None with --tokenizer
    tokenizer: str | None = None  # --tokenizer (a directory, .gguf or Hub id), or None
    block_size: StrictInt  # tokens per row of every split
    val_fraction: Any = None
    seed: Any = None
    split_on: Any = None
    text_field: Any = None
    encoding: Any = None
    max_document_bytes: Any = None
    chat_template: Any = None
    train_on: Any = None  # chat: "assistant" or "all"
    overlong: Any = None  # chat: "truncate" or "drop"
    num_proc: Any = None
    on_error: Any = None
    keep_dropped: Any = None
    plot: Any = None
    hub_split: Any = None
    normalization: Any = None
    cleaning: Any = None  # the resolved cleaning config (normalize, filters, dedup, pii)


class Tokenizer(_Part):
    """``tokenizer``: the tokenizer saved beside the splits."""

    trained: StrictBool = False  # True: a byte-level BPE prepare trained on the corpus
    path: str | None = None  # the pretrained tokenizer given, when not trained
    type: Any = None
    vocab_size: int | None = None  # len(tokenizer), added tokens included
    eos_token_id: Any = None
    bos_token_id: Any = None
    adds_bos: Any = None  # text data
    eos_added_by_tokenizer: Any = None  # text data
    pad_token_id: Any = None  # chat data
    chat_template: Any = None  # chat data
    end_of_turn: Any = None  # chat data
    added_tokens: Any = None  # chat data


class Split(_Part):
    """``splits.<name>``: the counts of one split."""

    documents: Any = None
    conversations: Any = None  # chat data
    bytes: Any = None
    tokens: Any = None
    blocks: StrictInt | None = None  # rows written (checked against the arrow files)
    tail_tokens: Any = None  # text data: tokens after the last whole block
    answer_tokens: Any = None  # chat data: target tokens
    conversations_written: Any = None  # chat data
    skipped: Any = None  # chat data
    answers_located: Any = None  # chat data: answers found, by rule (llmkit.data.sft)
    packing: Any = None  # chat data


class Chat(_Part):
    """``chat`` (chat data only): the template, its end-of-turn token, the packing rules."""

    template: Any = None
    end_of_turn: Any = None
    train_on: Any = None
    answers_located: Any = None
    overlong: Any = None
    columns: Any = None
    cleaning: Any = None
    record_formats: Any = None


class Manifest(_Part):
    """The whole ``manifest.json``; see the module docstring for the order and the types."""

    llmkit_version: str | None = None
    created: str | None = None  # ISO 8601, UTC
    fingerprint: dict[str, Any] | None = None  # cleaning and full (llmkit.core.cache); None: hub
    inputs: Any = None  # one object per input file: path, size, sha256, documents...
    settings: Settings
    cache: Any = None  # whether the prepare cache was used or stored
    stages: Any = None  # counts of every stage: read, normalize, ..., by name
    length_histogram: Any = None
    splits: dict[str, Split] = Field(default_factory=dict)
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)
    chat: Chat | None = None
    warnings: list[str] = Field(default_factory=list)
    files: list[str] | None = None  # every file prepare wrote, relative to the directory

    @property
    def format(self) -> str:
        """``"text"`` or ``"chat"`` (a manifest without ``settings.format`` is text)."""
        return self.settings.format or "text"

    @property
    def block_size(self) -> int:
        """Tokens per row of every split."""
        return self.settings.block_size

    def split_blocks(self, name: str) -> int | None:
        """The number of rows the manifest counts for split ``name`` (None: not recorded)."""
        split = self.splits.get(name)
        return None if split is None else split.blocks

    def as_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object it was read from (set fields only, in order)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def to_json(self) -> str:
        """The text of ``manifest.json``: ``json.dumps(indent=2)`` and a newline, as prepare
        writes it."""
        return json.dumps(self.as_dict(), indent=2) + "\n"
