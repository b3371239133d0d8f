"""The on-disk layout ``llmkit prepare`` writes and ``train`` / ``eval`` read.

::

    DIR/
      manifest.json            inputs, settings, every stage's counts, tokens per split
      tokenizer.json ...       the tokenizer (``AutoTokenizer.from_pretrained(DIR)`` loads it)
      train/                   ``datasets.Dataset.save_to_disk``: one column ``input_ids``,
      validation/              each row exactly ``block_size`` token ids (int32)
      dataset_dict.json        {"splits": [...]}: ``datasets.load_from_disk(DIR)`` gives a
                               DatasetDict of both splits

The two splits hold whole documents (a document is never split between them); within a split,
documents are concatenated with one EOS after each and cut into blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import UserError

MANIFEST = "manifest.json"
#: ``DatasetDict.save_to_disk``'s index of the splits.
DATASET_DICT = "dataset_dict.json"
SPLITS = ("train", "validation")


@dataclass
class PreparedData:
    """A prepared directory, loaded (datasets are memory-mapped arrow, not read into memory)."""

    path: Path
    train: Any  # datasets.Dataset, rows of block_size int32 ids
    validation: Any  # datasets.Dataset (may have 0 rows)
    tokenizer: Any
    manifest: dict

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return int(self.manifest["settings"]["block_size"])


def is_prepared(path: str | Path) -> bool:
    """True when ``path`` looks like a directory written by ``llmkit prepare``."""
    p = Path(path)
    return (p / MANIFEST).is_file() and (p / "train").is_dir()


def read_manifest(path: str | Path) -> dict:
    """The manifest of a prepared directory.

    Raises:
        UserError: ``path`` is not a directory written by ``llmkit prepare``.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist", "run `llmkit prepare INPUT --output DIR` first")
    if not is_prepared(p):
        raise UserError(
            f"{p} is not a prepared data directory (no manifest.json and train/)",
            "run `llmkit prepare INPUT --output DIR` and point at DIR",
        )
    try:
        return json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {p / MANIFEST}: {err}", "rerun llmkit prepare") from err


def load_prepared(path: str | Path) -> PreparedData:
    """Load the splits, tokenizer and manifest of a prepared directory.

    Raises:
        UserError: ``path`` is not a prepared directory.
    """
    from datasets import load_from_disk

    from llmkit.data.tokenizer import load_tokenizer

    p = Path(path)
    manifest = read_manifest(p)
    splits = {}
    for name in SPLITS:
        if (p / name).is_dir():
            splits[name] = load_from_disk(str(p / name))
        else:
            splits[name] = None
    if splits["validation"] is None:
        splits["validation"] = splits["train"].select([])
    return PreparedData(
        path=p,
        train=splits["train"],
        validation=splits["validation"],
        tokenizer=load_tokenizer(p),
        manifest=manifest,
    )
