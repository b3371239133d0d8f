"""The on-disk layout ``llmkit prepare`` writes and ``train`` / ``eval`` read.

::

    DIR/
      manifest.json            inputs, settings, every stage's counts, tokens per split
      tokenizer.json ...       the tokenizer (``AutoTokenizer.from_pretrained(DIR)`` loads it;
                               for chat data with its ``chat_template``)
      train/                   ``datasets.Dataset.save_to_disk``, one row per block of
      validation/              exactly ``block_size`` tokens, int32 columns (see below)
      dataset_dict.json        {"splits": [...]}: ``datasets.load_from_disk(DIR)`` gives a
                               DatasetDict of both splits

``manifest.json`` is typed by :class:`llmkit.core.manifest.Manifest`.

Two kinds of data, told apart by ``manifest.settings.format`` (:attr:`PreparedData.format`; a
manifest without the key is text) and by the columns (:attr:`PreparedData.
has_labels`):

- **text** (documents): one column ``input_ids``. Within a split, documents are concatenated
  with one EOS after each and cut into blocks; every token is a target.
- **chat** (conversations, ``llmkit prepare --format chat``): three columns, each a row of
  ``block_size`` int32 values —

  - ``input_ids``: whole conversations rendered with the chat template, packed greedily in
    order (a conversation is never split between rows; one longer than ``block_size`` is
    truncated or dropped, ``settings.overlong``), then the tokenizer's pad token to the end;
  - ``labels``: the token id where the token is a training target — the assistant's answers
    and their end-of-turn token (``settings.train_on == "assistant"``) or every token of the
    conversations (``"all"``) — and -100 elsewhere: system and user turns, role markers,
    padding, and the first token of each conversation. Not shifted: ``labels[t]`` is the
    target of the prediction made at position ``t - 1``;
  - ``position_ids``: ``0, 1, ...`` restarting at each conversation (and for the padding),
    so that a model given them and no attention mask attends within each conversation only
    (:func:`llmkit.data.sft.packed_attention_mask`).

  ``manifest.chat`` names the template (``template``: ``"tokenizer"`` for the tokenizer's
  own, or ``"chatml"``), its ``end_of_turn`` token (the stop token when generating) and the
  counts of the packing per split (``splits.<name>.packing``).

The two splits hold whole documents or conversations (one is never split between them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.core.manifest import Manifest
from llmkit.errors import UserError

MANIFEST = "manifest.json"
#: ``DatasetDict.save_to_disk``'s index of the splits.
DATASET_DICT = "dataset_dict.json"
SPLITS = ("train", "validation")
#: The label of a position that is not a target: ``labels`` of chat data hold it where no loss
#: is taken, and scoring masks targets with it. -100 is PyTorch's ``cross_entropy``
#: ``ignore_index`` default (``torch.nn.functional.cross_entropy``), as transformers uses it.
#: Defined here, once, in a module without torch (prepare's packers use it).
IGNORE_INDEX = -100


@dataclass
class PreparedData:
    """A prepared directory, loaded (datasets are memory-mapped arrow, not read into memory)."""

    path: Path
    train: Any  # datasets.Dataset, rows of block_size int32 ids (+ labels, position_ids: chat)
    validation: Any  # datasets.Dataset (may have 0 rows), the same columns
    tokenizer: Any
    manifest: Manifest

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.manifest.block_size

    @property
    def format(self) -> str:
        """``"text"`` or ``"chat"`` (see the module docstring)."""
        return self.manifest.format

    @property
    def has_labels(self) -> bool:
        """True when the splits carry ``labels`` (-100 where no loss) and ``position_ids``
        columns besides ``input_ids``: chat data. Without them every token is a target."""
        return "labels" in self.train.column_names


def is_prepared(path: str | Path) -> bool:
    """True when ``path`` looks like a directory written by ``llmkit prepare``."""
    p = Path(path)
    return (p / MANIFEST).is_file() and (p / "train").is_dir()


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a prepared directory, typed (:class:`llmkit.core.manifest.Manifest`).

    Raises:
        UserError: ``path`` is not a directory written by ``llmkit prepare``; its manifest is
            not JSON, or lacks (or mistypes) a field readers rely on, naming the field.
    """
    from pydantic import ValidationError

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist", "run `llmkit prepare INPUT --output DIR` first")
    if not is_prepared(p):
        raise UserError(
            f"{p} is not a prepared data directory (no manifest.json and train/)",
            "run `llmkit prepare INPUT --output DIR` and point at DIR",
        )
    try:
        text = (p / MANIFEST).read_text(encoding="utf-8")
        return Manifest.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":  # "Invalid JSON: EOF while parsing ... column 19"
            detail = first["msg"].split(": ", 1)[-1].replace(" column ", ", column ")
            raise UserError(
                f"cannot read {p / MANIFEST}: not valid JSON ({detail})", "rerun llmkit prepare"
            ) from None
        where = ".".join(str(x) for x in first["loc"]) or "the top level"
        raise UserError(
            f"cannot read {p / MANIFEST}: {where}: {first['msg'].lower()}", "rerun llmkit prepare"
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {p / MANIFEST}: {err}", "rerun llmkit prepare") from err


#: What to do when prepared data and a model disagree on the vocabulary.
VOCAB_HINT = "prepare the data with --tokenizer pointing at the model (or its tokenizer)"


def check_same_vocabulary(
    data_vocab: Mapping[str, int], model_vocab: Mapping[str, int], data_path, model_name: str
) -> None:
    """Refuse data tokenized with another tokenizer than the model's — ``llmkit train`` and
    ``llmkit eval`` both call this, so they accept and refuse the same pairs.

    Every (token, id) of the model's vocabulary must be in the data's with the same id; the
    data's may add tokens after it (e.g. chat markers that ``prepare`` added). Equal sizes
    prove nothing: two BPEs of 512 tokens number different strings.

    Args:
        data_vocab: the prepared data's tokenizer's ``get_vocab()`` (added tokens included).
        model_vocab: the model's tokenizer's vocabulary, token -> id.
        data_path: the prepared directory (named in the error).
        model_name: the model (named in the error).

    Raises:
        UserError: "vocabulary mismatch", with how many tokens differ and one of them.
    """
    differ = [t for t, i in model_vocab.items() if data_vocab.get(t) != i]
    if differ:
        raise UserError(
            f"vocabulary mismatch: {data_path} was tokenized with another tokenizer than "
            f"{model_name} ({len(differ):,} of its {len(model_vocab):,} tokens differ, e.g. "
            f"{differ[0]!r})",
            VOCAB_HINT,
        )


def load_prepared(path: str | Path, *, trust_remote_code: bool = False) -> PreparedData:
    """Load the splits, tokenizer and manifest of a prepared directory.

    ``trust_remote_code``: let the saved tokenizer run Python code of its own (only a
    tokenizer that needed it when the data was prepared has any); False refuses such a one.

    Raises:
        UserError: ``path`` is not a prepared directory; its tokenizer needs its own code and
            ``trust_remote_code`` is False; a split is damaged (a truncated, missing or
            unreadable ``.arrow`` file or ``state.json``, or fewer blocks than the manifest
            counts), naming the file.
    """
    from datasets import load_from_disk

    from llmkit.core.tokenizer import load_tokenizer

    p = Path(path)
    manifest = read_manifest(p)
    splits = {}
    for name in SPLITS:
        if (p / name).is_dir():
            splits[name] = _load_split(p, name, manifest, load_from_disk)
        else:
            splits[name] = None
    if splits["validation"] is None:
        splits["validation"] = splits["train"].select([])
    return PreparedData(
        path=p,
        train=splits["train"],
        validation=splits["validation"],
        tokenizer=load_tokenizer(p, trust_remote_code=trust_remote_code),
        manifest=manifest,
    )


def damaged(path: Path, file: Path | str, reason: str) -> UserError:
    """The one-line error for a damaged prepared directory ``path``."""
    return UserError(
        f"prepared data {path} is damaged: {file} {reason}",
        f"rerun llmkit prepare with the same inputs and --output {path} --overwrite",
    )


def _load_split(p: Path, name: str, manifest: Manifest, load_from_disk) -> Any:
    """``load_from_disk(p / name)``, with a damaged split as one :func:`damaged` line.

    Arrow files are read whole when loaded (datasets maps them), so a truncated file fails
    here, not in the middle of a run; a file cut exactly between two record batches reads as
    fewer rows, so the rows are also counted against the manifest's ``splits.NAME.blocks``.
    """
    split = p / name
    try:
        ds = load_from_disk(str(split))
    except FileNotFoundError as err:
        missing = err.filename or split
        raise damaged(p, missing, "is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as err:  # pyarrow's errors derive from these
        raise damaged(p, _bad_file(split), f"cannot be read ({_short(err)})") from None
    expected = manifest.split_blocks(name)
    if expected is not None and len(ds) != expected:
        files = sorted(split.glob("*.arrow"))
        where = files[-1] if len(files) == 1 else split
        raise damaged(
            p, where, f"holds {len(ds):,} blocks where {MANIFEST} counts {expected:,} (truncated?)"
        )
    return ds


def _bad_file(split: Path) -> Path:
    """The first file of a split that does not read: an ``.arrow`` file that is not a whole
    Arrow stream, else its ``state.json`` / ``dataset_info.json``, else the directory."""
    import pyarrow as pa

    for file in sorted(split.glob("*.arrow")):
        try:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, ValueError):
            return file
    for name in ("state.json", "dataset_info.json"):
        try:
            json.loads((split / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return split / name
    return split


def _short(err: BaseException, limit: int = 120) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
